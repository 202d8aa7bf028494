"""Negative Matters ablation harness: train, pool, evaluate and sweep LLM text embeddings."""

__version__ = "0.1.0"
