"""Corpus building for the harness: MGH synthesis, mining and the difficulty audit.

``synth`` never imports ``harness``; the corpus format lives in :mod:`synth.corpus`.
"""

__version__ = "0.1.0"
