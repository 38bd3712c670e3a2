"""The paper's learning-rate schedule: linear warm-up, constant, then square-root decay to a minimum.

The paper (App. D.3) follows Hägele et al. (2024), "Scaling Laws and Compute-Optimal Training Beyond Fixed Training
Durations": warm up linearly to the peak, hold it, then decay as

    lr = min_lr + (peak - min_lr) * (1 - sqrt((step - decay_start) / (total_steps - decay_start)))

to a minimum learning rate of 1e-5. The paper starts the decay with the free phase of the curriculum for Llama
(`decay_start` = the free phase's first step, after 80% of the steps), to prevent the instability their high spectral
norm causes, and after 90% of training for the SSMs (Mamba2), whose spectral norm of about one permits larger updates
at a high rate for longer. A constant rate until the decay keeps intermediate
checkpoints usable as starting points for runs of other lengths.
"""

from __future__ import annotations

import functools
import math

import torch


def _check_steps(total_steps: int, warmup_steps: int, decay_start: int) -> None:
    for name, value in (("total_steps", total_steps), ("warmup_steps", warmup_steps), ("decay_start", decay_start)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}.")
    if total_steps < 1:
        raise ValueError(f"total_steps must be positive, got {total_steps}.")
    if not 0 <= warmup_steps <= decay_start <= total_steps:
        raise ValueError(
            "Need 0 <= warmup_steps <= decay_start <= total_steps, got "
            f"warmup_steps={warmup_steps}, decay_start={decay_start}, total_steps={total_steps}."
        )


def lr_multiplier(step: int, *, total_steps: int, warmup_steps: int, decay_start: int, min_ratio: float) -> float:
    """Learning rate at optimizer step `step` (0-based: the number of steps taken) as a fraction of the peak.

    - `step < warmup_steps`: `step / warmup_steps` (transformers' convention: the first update has rate 0);
    - `warmup_steps <= step < decay_start`: 1;
    - `step >= decay_start`: `min_ratio + (1 - min_ratio) * (1 - sqrt((step - decay_start) / (total_steps -
      decay_start)))`, which reaches `min_ratio` at `total_steps` and stays there.

    `min_ratio` is `min_lr / peak`, in [0, 1].
    """
    _check_steps(total_steps, warmup_steps, decay_start)
    if not 0 <= min_ratio <= 1:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}.")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}.")
    if step < warmup_steps:
        return step / warmup_steps
    if step < decay_start:
        return 1.0
    if step >= total_steps:
        return min_ratio
    progress = (step - decay_start) / (total_steps - decay_start)
    return min_ratio + (1 - min_ratio) * (1 - math.sqrt(progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int, decay_start: int, min_lr: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` following `lr_multiplier`, with each parameter group's current `lr` as its peak and `min_lr` (an
    absolute learning rate; the paper's is 1e-5) as the floor of every group. Call `scheduler.step()` after
    every optimizer step."""
    _check_steps(total_steps, warmup_steps, decay_start)
    if not math.isfinite(min_lr) or min_lr < 0:
        raise ValueError(f"min_lr must be a finite number >= 0, got {min_lr}.")
    multipliers = []
    for index, group in enumerate(optimizer.param_groups):
        peak = group["lr"]
        if not peak > 0:
            raise ValueError(f"Parameter group {index} has learning rate {peak}: the peak must be > 0.")
        if min_lr > peak:
            raise ValueError(f"min_lr={min_lr} exceeds the peak learning rate {peak} of parameter group {index}.")
        multipliers.append(
            functools.partial(
                lr_multiplier,
                total_steps=total_steps,
                warmup_steps=warmup_steps,
                decay_start=decay_start,
                min_ratio=min_lr / peak,
            )
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multipliers)

