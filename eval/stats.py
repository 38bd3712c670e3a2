"""Solver statistics of every forward of a model, collected and summarised (iterations, residuals, convergence)."""

from __future__ import annotations

from typing import Any

import torch


class SolverStatsRecorder:
    """Collects `solver_stats` from every forward of a model (a forward hook), so evaluation code that only sees
    logits (lm-eval, generate) still reports iterations and residuals.

    Simultaneous-mode forwards give one value per sequence, sequential-mode forwards one per token; `summary()`
    reports them separately."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.per_sequence: list[dict[str, torch.Tensor]] = []
        self.per_token: list[dict[str, torch.Tensor]] = []
        self._handle = None

    def _hook(self, module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        stats = getattr(output, "solver_stats", None)
        if stats is None:
            return
        record = {
            "iterations": stats.iterations.detach().flatten().cpu(),
            "residual": stats.residual.detach().float().flatten().cpu(),
            "converged": stats.converged.detach().flatten().cpu(),
        }
        (self.per_token if stats.iterations.dim() == 2 else self.per_sequence).append(record)

    def __enter__(self) -> SolverStatsRecorder:
        self._handle = self.model.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()

    def summary(self) -> dict[str, Any]:
        return {
            "per_sequence": summarize_stats(self.per_sequence),
            "per_token": summarize_stats(self.per_token),
        }


PERCENTILES = (50, 90, 99)


def summarize_stats(records: list[dict[str, torch.Tensor]]) -> dict[str, Any] | None:
    """Mean, percentiles and maximum of iterations; mean and maximum final residual; converged fraction."""
    if not records:
        return None
    iterations = torch.cat([r["iterations"] for r in records]).double()
    residual = torch.cat([r["residual"] for r in records]).double()
    converged = torch.cat([r["converged"] for r in records])
    quantiles = torch.quantile(iterations, torch.tensor([p / 100 for p in PERCENTILES], dtype=torch.float64))
    return {
        "count": int(iterations.numel()),
        "iterations_mean": iterations.mean().item(),
        **{f"iterations_p{p}": q.item() for p, q in zip(PERCENTILES, quantiles)},
        "iterations_max": int(iterations.max().item()),
        "residual_mean": residual.mean().item(),
        "residual_max": residual.max().item(),
        "converged_fraction": converged.float().mean().item(),
    }
