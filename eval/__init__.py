"""Evaluation commands (`python -m eval.<name>`) for implicit models: lm-eval harness, perplexity, duality of the
two modes, solver dynamics, state tracking."""
