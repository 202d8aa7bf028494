"""mteb evaluation: an encoder around the Embedder, local task folders, named suites, scores."""

from harness.evaluation.run import EvalResult, evaluate_embedder

__all__ = ["EvalResult", "evaluate_embedder"]
