"""Triton kernels for what no library provides to an implicit model. Each has a PyTorch reference it is tested against
(on the CPU under `TRITON_INTERPRET=1`):

- `picard_update`: the solver's bookkeeping fused into one pass (reference: `solver_ops.picard_update_reference`).
- `mamba2_decode_step`: one token of a Mamba2 mixer's convolution and SSM against committed states that it reads and
  never writes (reference: `mamba2_ops.mamba2_decode_step_reference`).

Only `kernels.py` imports this module, guarded: without triton it is never loaded.
"""

from __future__ import annotations

from typing import Any

import torch

from .numerics import NORM_EPS

try:  # a try block: transformers' remote-code import check skips it, so machines without triton load the model
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("triton_kernels needs triton; kernels.py imports it only when triton is present") from error

# Elements of one sample each program of `picard_update` reduces, and the block it loads them in.
_UPDATE_BLOCK = 1024
_UPDATE_SPAN = 16 * _UPDATE_BLOCK


@triton.jit
def _picard_update_kernel(
    z_ptr, fz_ptr, out_ptr,
    active_ptr, iterations_ptr, residual_ptr, converged_ptr, diverged_at_ptr, step_ptr,
    partial_ptr, ticket_ptr,
    features, span, damping, tolerance, norm_eps,
    RELATIVE: tl.constexpr, BLOCK: tl.constexpr,
):
    sample = tl.program_id(0)
    part = tl.program_id(1)
    parts = tl.num_programs(1)
    active = tl.load(active_ptr + sample) != 0
    row = sample.to(tl.int64) * features
    start = part * span
    # Stopped samples are neither read nor written: their span is empty.
    stop = tl.where(active, tl.minimum(start + span, features), start)
    diff_sq = tl.zeros([BLOCK], dtype=tl.float32)
    z_sq = tl.zeros([BLOCK], dtype=tl.float32)
    for offset in range(start, stop, BLOCK):
        index = offset + tl.arange(0, BLOCK)
        mask = index < stop
        z = tl.load(z_ptr + row + index, mask=mask, other=0.0).to(tl.float32)
        fz = tl.load(fz_ptr + row + index, mask=mask, other=0.0).to(tl.float32)
        diff = fz - z
        diff_sq += diff * diff
        z_sq += z * z
        tl.store(z_ptr + row + index, ((1 - damping) * z + damping * fz).to(z_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + row + index, fz.to(out_ptr.dtype.element_ty), mask=mask)
    tl.atomic_add(partial_ptr + 2 * sample, tl.sum(diff_sq, axis=0))
    tl.atomic_add(partial_ptr + 2 * sample + 1, tl.sum(z_sq, axis=0))
    # The last program of a sample to arrive (its ticket) finishes the reduction and updates the masks: one launch, no
    # separate reduction kernel. It reads the sums atomically (adding 0), past any stale cache line.
    ticket = tl.atomic_add(ticket_ptr + sample, 1)
    if ticket == parts - 1:
        diff_norm = tl.sqrt(tl.atomic_add(partial_ptr + 2 * sample, 0.0))
        z_norm = tl.sqrt(tl.atomic_add(partial_ptr + 2 * sample + 1, 0.0))
        if active:
            if RELATIVE:
                res = diff_norm / (z_norm + norm_eps)
            else:
                res = diff_norm
            step = tl.load(step_ptr)
            tl.store(iterations_ptr + sample, step)
            tl.store(residual_ptr + sample, res)
            if (res != res) | (tl.abs(res) == float("inf")):  # NaN or infinite: remember the first such step
                if tl.load(diverged_at_ptr + sample) == 0:
                    tl.store(diverged_at_ptr + sample, step)
            if res < tolerance:
                tl.store(converged_ptr + sample, 1)
                tl.store(active_ptr + sample, 0)


def picard_update(state: Any, fz: torch.Tensor, damping: float, tolerance: float, stop_mode: str) -> Any:
    """`solver_ops.picard_update_reference` (same arguments and results) in one pass, writing `state`'s tensors in place
    and returning it: for each sample active before the call, `out = fz`, `z = (1 - damping) z + damping fz`, its
    residual, `iterations = state.step` (the step this update makes, already advanced by the caller), the first
    non-finite step in `diverged_at`, and `converged`/`active` updated."""
    z, out = state.z, state.out
    fz = fz.contiguous()
    batch = z.shape[0]
    features = z[0].numel()
    for name, tensor in (("z", z), ("fz", fz), ("out", out)):
        if not tensor.is_contiguous() or tensor.shape != z.shape:
            raise ValueError(f"picard_update: {name} must be contiguous with shape {tuple(z.shape)}")
    parts = triton.cdiv(features, _UPDATE_SPAN)
    partial = torch.zeros(batch, 2, dtype=torch.float32, device=z.device)
    ticket = torch.zeros(batch, dtype=torch.int32, device=z.device)
    _picard_update_kernel[(batch, parts)](
        z, fz, out,
        state.active.view(torch.uint8), state.iterations, state.residual, state.converged.view(torch.uint8),
        state.diverged_at, state.step,
        partial, ticket,
        features, _UPDATE_SPAN, damping, tolerance, NORM_EPS,
        RELATIVE=stop_mode == "rel", BLOCK=_UPDATE_BLOCK,
    )
    return state


@triton.jit
def _softplus(x):
    # log1p(exp(x)) without a log1p: Kahan's correction keeps small values accurate; torch's threshold of 20.
    e = tl.exp(x)
    u = 1.0 + e
    log1p = tl.where(u == 1.0, e, tl.log(u) * e / (u - 1.0))
    return tl.where(x > 20.0, x, log1p)


@triton.jit
def _mamba2_decode_step_kernel(
    xbc_ptr, dt_ptr, keep_ptr,
    conv_state_ptr, conv_weight_ptr, conv_bias_ptr,
    dt_bias_ptr, A_log_ptr, D_ptr, ssm_state_ptr,
    y_ptr, new_conv_state_ptr, new_ssm_state_ptr,
    stride_xbc_b, stride_dt_b,
    stride_cs_b, stride_cs_c, stride_cs_k,
    stride_ss_b, stride_ss_h, stride_ss_p, stride_ss_n,
    dt_min, dt_max,
    HEAD_DIM: tl.constexpr, STATE_SIZE: tl.constexpr, HEADS_PER_GROUP: tl.constexpr,
    INTERMEDIATE: tl.constexpr, GROUP_WIDTH: tl.constexpr, CONV_DIM: tl.constexpr, WIDTH: tl.constexpr,
    HAS_CONV_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    pb = tl.program_id(2)
    g = h // HEADS_PER_GROUP
    keep = 1.0
    if HAS_KEEP:
        keep = tl.load(keep_ptr + b).to(tl.float32)
    taps = tl.arange(0, BLOCK_K)
    # The conv window of a channel: the committed last WIDTH - 1 inputs, then this token's input.
    from_state = taps < WIDTH - 1
    is_token = taps == WIDTH - 1
    # The new conv state drops the oldest input: tap j holds window[j + 1].
    shift_from_state = taps < WIDTH - 2
    shift_is_token = taps == WIDTH - 2

    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < HEAD_DIM
    n = tl.arange(0, BLOCK_N)
    n_mask = n < STATE_SIZE
    x_ch = h * HEAD_DIM + p
    b_ch = INTERMEDIATE + g * STATE_SIZE + n
    c_ch = INTERMEDIATE + GROUP_WIDTH + g * STATE_SIZE + n
    x = _conv_silu(x_ch, p_mask, b, xbc_ptr, stride_xbc_b, conv_state_ptr, stride_cs_b, stride_cs_c, stride_cs_k,
                   conv_weight_ptr, conv_bias_ptr, taps, from_state, is_token, WIDTH, HAS_CONV_BIAS) * keep
    B = _conv_silu(b_ch, n_mask, b, xbc_ptr, stride_xbc_b, conv_state_ptr, stride_cs_b, stride_cs_c, stride_cs_k,
                   conv_weight_ptr, conv_bias_ptr, taps, from_state, is_token, WIDTH, HAS_CONV_BIAS) * keep
    C = _conv_silu(c_ch, n_mask, b, xbc_ptr, stride_xbc_b, conv_state_ptr, stride_cs_b, stride_cs_c, stride_cs_k,
                   conv_weight_ptr, conv_bias_ptr, taps, from_state, is_token, WIDTH, HAS_CONV_BIAS) * keep

    # Candidate conv states: x channels by every program, B and C channels by the first program of their group.
    _shift_conv_state(x_ch, p_mask, b, xbc_ptr, stride_xbc_b, conv_state_ptr, stride_cs_b, stride_cs_c, stride_cs_k,
                      new_conv_state_ptr, CONV_DIM, WIDTH, taps, shift_from_state, shift_is_token)
    if (h % HEADS_PER_GROUP == 0) & (pb == 0):
        _shift_conv_state(b_ch, n_mask, b, xbc_ptr, stride_xbc_b, conv_state_ptr, stride_cs_b, stride_cs_c,
                          stride_cs_k, new_conv_state_ptr, CONV_DIM, WIDTH, taps, shift_from_state, shift_is_token)
        _shift_conv_state(c_ch, n_mask, b, xbc_ptr, stride_xbc_b, conv_state_ptr, stride_cs_b, stride_cs_c,
                          stride_cs_k, new_conv_state_ptr, CONV_DIM, WIDTH, taps, shift_from_state, shift_is_token)

    dt = _softplus(tl.load(dt_ptr + b * stride_dt_b + h).to(tl.float32) + tl.load(dt_bias_ptr + h).to(tl.float32))
    dt = tl.minimum(tl.maximum(dt, dt_min), dt_max) * keep
    A = -tl.exp(tl.load(A_log_ptr + h).to(tl.float32))
    D = tl.load(D_ptr + h).to(tl.float32)
    decay = tl.exp(dt * A)

    pn_mask = p_mask[:, None] & n_mask[None, :]
    state_offsets = b * stride_ss_b + h * stride_ss_h + p[:, None] * stride_ss_p + n[None, :] * stride_ss_n
    state = tl.load(ssm_state_ptr + state_offsets, mask=pn_mask, other=0.0).to(tl.float32)
    state = state * decay + (dt * x)[:, None] * B[None, :]
    head = b * tl.num_programs(1) + h  # outputs are fresh contiguous (b, h, p[, n]) buffers
    tl.store(new_ssm_state_ptr + (head * HEAD_DIM + p[:, None]) * STATE_SIZE + n[None, :], state, mask=pn_mask)
    y = tl.sum(state * C[None, :], axis=1) + D * x
    tl.store(y_ptr + head * HEAD_DIM + p, y, mask=p_mask)


@triton.jit
def _conv_silu(channels, mask, b, xbc_ptr, stride_xbc_b, state_ptr, stride_b, stride_c, stride_k,
               weight_ptr, bias_ptr, taps, from_state, is_token, WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr):
    window_mask = mask[:, None] & from_state[None, :]
    window = tl.load(state_ptr + b * stride_b + channels[:, None] * stride_c + taps[None, :] * stride_k,
                     mask=window_mask, other=0.0).to(tl.float32)
    token = tl.load(xbc_ptr + b * stride_xbc_b + channels, mask=mask, other=0.0).to(tl.float32)
    window = tl.where(is_token[None, :], token[:, None], window)
    weight = tl.load(weight_ptr + channels[:, None] * WIDTH + taps[None, :],
                     mask=mask[:, None] & (taps[None, :] < WIDTH), other=0.0).to(tl.float32)
    out = tl.sum(window * weight, axis=1)
    if HAS_BIAS:
        out += tl.load(bias_ptr + channels, mask=mask, other=0.0).to(tl.float32)
    return out / (1.0 + tl.exp(-out))


@triton.jit
def _shift_conv_state(channels, mask, b, xbc_ptr, stride_xbc_b, state_ptr, stride_b, stride_c, stride_k,
                      new_state_ptr, CONV_DIM: tl.constexpr, WIDTH: tl.constexpr, taps, shift_from_state,
                      shift_is_token):
    old = tl.load(state_ptr + b * stride_b + channels[:, None] * stride_c + (taps[None, :] + 1) * stride_k,
                  mask=mask[:, None] & shift_from_state[None, :], other=0.0)
    token = tl.load(xbc_ptr + b * stride_xbc_b + channels, mask=mask, other=0.0)
    new = tl.where(shift_is_token[None, :], token[:, None].to(old.dtype), old)
    store_mask = mask[:, None] & (taps[None, :] < WIDTH - 1)
    tl.store(new_state_ptr + (b * CONV_DIM + channels[:, None]) * (WIDTH - 1) + taps[None, :],
             new.to(new_state_ptr.dtype.element_ty), mask=store_mask)


def mamba2_decode_step(
    xbc: torch.Tensor,
    dt: torch.Tensor,
    keep: torch.Tensor | None,
    conv_state: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    dt_bias: torch.Tensor,
    A_log: torch.Tensor,
    D: torch.Tensor,
    ssm_state: torch.Tensor,
    num_heads: int,
    head_dim: int,
    state_size: int,
    n_groups: int,
    time_step_limit: tuple[float, float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See `mamba2_ops.mamba2_decode_step_reference`: same arguments, same results, one launch per layer."""
    batch, conv_dim = xbc.shape
    width = conv_weight.shape[-1]
    intermediate = num_heads * head_dim
    if xbc.stride(-1) != 1 or dt.stride(-1) != 1:
        raise ValueError("mamba2_decode_step: xbc and dt must be contiguous in their last dimension")
    y = torch.empty(batch, num_heads, head_dim, dtype=torch.float32, device=xbc.device)
    new_conv_state = torch.empty(batch, conv_dim, width - 1, dtype=xbc.dtype, device=xbc.device)
    new_ssm_state = torch.empty(batch, num_heads, head_dim, state_size, dtype=torch.float32, device=xbc.device)
    block_p = min(triton.next_power_of_2(head_dim), 64)
    grid = (batch, num_heads, triton.cdiv(head_dim, block_p))
    _mamba2_decode_step_kernel[grid](
        xbc, dt, keep if keep is not None else xbc,
        conv_state, conv_weight.contiguous(), conv_bias if conv_bias is not None else conv_weight,
        dt_bias, A_log, D, ssm_state,
        y, new_conv_state, new_ssm_state,
        xbc.stride(0), dt.stride(0),
        *conv_state.stride(),
        *ssm_state.stride(),
        float(time_step_limit[0]), float(time_step_limit[1]),
        HEAD_DIM=head_dim, STATE_SIZE=state_size, HEADS_PER_GROUP=num_heads // n_groups,
        INTERMEDIATE=intermediate, GROUP_WIDTH=n_groups * state_size, CONV_DIM=conv_dim, WIDTH=width,
        HAS_CONV_BIAS=conv_bias is not None, HAS_KEEP=keep is not None,
        BLOCK_P=block_p, BLOCK_N=triton.next_power_of_2(state_size), BLOCK_K=triton.next_power_of_2(width),
    )
    return y, new_conv_state, new_ssm_state
