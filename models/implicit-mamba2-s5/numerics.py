"""Precision rules shared by the models, their reference ops and the solver."""

from __future__ import annotations

import torch

# Added to ||z|| in the relative residual; keeps an all-zero sample (pure padding, f(0) = 0) at residual 0.
NORM_EPS = 1e-8


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in float32 when it is narrower (bfloat16, float16), unchanged otherwise: reductions, recurrent states
    and residuals are accumulated in float32, and a float64 model stays float64 throughout."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()
