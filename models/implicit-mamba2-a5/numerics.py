"""Precision rules shared by the models, their reference ops and the solver."""

from __future__ import annotations

import torch


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in float32 when it is narrower (bfloat16, float16), unchanged otherwise: reductions, recurrent states
    and residuals are accumulated in float32, and a float64 model stays float64 throughout."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()
