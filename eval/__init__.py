"""Evaluation commands (`implicit-lm eval <name>`) for implicit models: lm-eval harness, perplexity, duality of the
two modes, solver dynamics, state tracking."""
