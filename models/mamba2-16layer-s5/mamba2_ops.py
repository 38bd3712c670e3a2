"""Pure-PyTorch Mamba2 operations: the reference implementations every fused kernel is tested against.

All functions are side-effect free: states come in as arguments and new states are returned, never written in place,
because a fixed-point iteration evaluates the same token many times against the same committed state.
Shapes: b = batch, l = sequence, h = heads, p = head_dim, g = groups, n = state_size, c = channels, k = conv kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .numerics import at_least_float32


def causal_conv1d_silu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution followed by SiLU.

    Args:
        x: `(b, c, l)` inputs.
        weight: `(c, k)` filters.
        bias: `(c,)` or `None`.
        state: `(b, c, k - 1)` the inputs preceding `x` (zeros at the start of a sequence), or `None` for zeros.

    Returns:
        `(b, c, l)` outputs and the new state `(b, c, k - 1)`: the last `k - 1` inputs.
    """
    width = weight.shape[-1]
    if state is None:
        state = x.new_zeros(x.shape[0], x.shape[1], width - 1)
    padded = torch.cat([state.to(x.dtype), x], dim=-1)
    out = F.conv1d(padded, weight.unsqueeze(1).to(x.dtype), bias, groups=x.shape[1])
    return F.silu(out), padded[..., padded.shape[-1] - (width - 1) :]


def _segment_sum(x: torch.Tensor) -> torch.Tensor:
    """`out[..., i, j] = sum(x[..., j+1 : i+1])` for `i >= j`, `-inf` above the diagonal; stable (no differences of
    cumulative sums)."""
    length = x.shape[-1]
    x = x[..., None].expand(*x.shape, length)
    strict_lower = torch.tril(torch.ones(length, length, dtype=torch.bool, device=x.device), diagonal=-1)
    x = x.masked_fill(~strict_lower, 0)
    sums = torch.cumsum(x, dim=-2)
    lower = torch.tril(torch.ones(length, length, dtype=torch.bool, device=x.device), diagonal=0)
    return sums.masked_fill(~lower, -torch.inf)


def ssd_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba2's selective state-space scan in chunked (SSD) form, parallel over the sequence.

    Computes `h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T`, `y_t = h_t C_t + D x_t` for all `t` at once.

    Args:
        x: `(b, l, h, p)` inputs.
        dt: `(b, l, h)` time steps, already passed through softplus, clamped and masked (`dt = 0` leaves the state
            untouched, which is how padding is skipped).
        A: `(h,)` negative decay rates.
        B, C: `(b, l, g, n)` input and output projections.
        D: `(h,)` skip connection.
        chunk_size: tokens per chunk.
        initial_state: `(b, h, p, n)` state before the first token, or `None` for zeros.

    Returns:
        `y` `(b, l, h, p)` in float32 and the final state `(b, h, p, n)` in float32.
    """
    batch, length, heads, head_dim = x.shape
    groups = B.shape[2]
    # A sequence shorter than a chunk is one chunk of its own length: padding it would cost O(chunk_size^2).
    chunk_size = min(chunk_size, length)
    x, dt = at_least_float32(x), at_least_float32(dt)
    B = at_least_float32(B).repeat_interleave(heads // groups, dim=2)
    C = at_least_float32(C).repeat_interleave(heads // groups, dim=2)
    pad = (-length) % chunk_size
    x_dt = F.pad(x * dt[..., None], (0, 0, 0, 0, 0, pad))
    decay = F.pad(dt * at_least_float32(A), (0, 0, 0, pad))  # zero log-decay on padding: state passes through unchanged
    B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (B, C))
    chunks = (length + pad) // chunk_size

    x_dt = x_dt.reshape(batch, chunks, chunk_size, heads, head_dim)
    B = B.reshape(batch, chunks, chunk_size, heads, -1)
    C = C.reshape(batch, chunks, chunk_size, heads, -1)
    decay = decay.reshape(batch, chunks, chunk_size, heads).permute(0, 3, 1, 2)  # (b, h, c, l)
    decay_cumsum = torch.cumsum(decay, dim=-1)

    # 1. Outputs within each chunk (the quadratic, attention-like form).
    within = torch.exp(_segment_sum(decay))  # (b, h, c, l, s)
    scores = torch.einsum("bclhn,bcshn->bhcls", C, B) * within
    y_diag = torch.einsum("bhcls,bcshp->bclhp", scores, x_dt)

    # 2. State contributed by each chunk, decayed to the chunk's end.
    to_end = torch.exp(decay_cumsum[..., -1:] - decay_cumsum)  # (b, h, c, l)
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, to_end, x_dt)

    # 3. Recurrence over chunks gives the state entering each chunk.
    if initial_state is None:
        initial_state = chunk_states.new_zeros(batch, heads, head_dim, chunk_states.shape[-1])
    chunk_states = torch.cat([at_least_float32(initial_state)[:, None], chunk_states], dim=1)
    across = torch.exp(_segment_sum(F.pad(decay_cumsum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    entering = torch.einsum("bhzc,bchpn->bzhpn", across, chunk_states)
    entering, final_state = entering[:, :-1], entering[:, -1]

    # 4. Contribution of the entering state to each position.
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, entering, torch.exp(decay_cumsum))

    y = (y_diag + y_off).reshape(batch, chunks * chunk_size, heads, head_dim)[:, :length]
    return y + x * at_least_float32(D)[:, None], final_state


def ssd_step(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the scan: `x (b, h, p)`, `dt (b, h)`, `B, C (b, g, n)`, `state (b, h, p, n)`.

    Returns `y (b, h, p)` and the new state, both float32; `state` is not modified.
    """
    heads, groups = x.shape[1], B.shape[1]
    x, dt = at_least_float32(x), at_least_float32(dt)
    B = at_least_float32(B).repeat_interleave(heads // groups, dim=1)
    C = at_least_float32(C).repeat_interleave(heads // groups, dim=1)
    decay = torch.exp(dt * at_least_float32(A))[..., None, None]
    new_state = at_least_float32(state) * decay + (dt[..., None] * x)[..., None] * B[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", new_state, C) + x * at_least_float32(D)[:, None]
    return y, new_state


def gated_rms_norm(
    x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int
) -> torch.Tensor:
    """Mamba2's output norm: `RMSNorm(x * silu(gate))` with the statistics taken per group of `group_size` channels."""
    dtype = gate.dtype
    hidden = at_least_float32(x) * F.silu(at_least_float32(gate))
    grouped = hidden.unflatten(-1, (-1, group_size))
    grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    return weight * grouped.flatten(-2).to(dtype)


def time_step(
    dt: torch.Tensor, dt_bias: torch.Tensor, limit: tuple[float, float], keep: torch.Tensor | None
) -> torch.Tensor:
    """Mamba2's time step `clamp(softplus(dt + dt_bias), *limit)` in float32, zero where `keep` (same shape as `dt`
    without the heads) is 0, so that padding neither feeds nor decays the state."""
    dt = F.softplus(at_least_float32(dt) + at_least_float32(dt_bias)).clamp(*limit)
    return dt if keep is None else dt * keep[..., None].to(dt.dtype)


def mamba2_decode_step_reference(
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
    """One token of a Mamba2 mixer between its in-projection and its gated norm, in sequential mode.

    Args:
        xbc: `(b, c)` this token's convolution input (x, B and C channels; already zero for padding).
        dt: `(b, h)` this token's raw time step (before `dt_bias` and softplus).
        keep: `(b,)` 1 for a real token and 0 for padding, or `None` (no padding).
        conv_state: `(b, c, k - 1)` the committed last inputs of the convolution; read, never written.
        conv_weight: `(c, k)`, conv_bias: `(c,)` or `None`; dt_bias, A_log, D: `(h,)`.
        ssm_state: `(b, h, p, n)` the committed SSM state; read, never written.

    Returns:
        `y (b, h, p)` (float32, before the gated norm), the candidate conv state `(b, c, k - 1)` in the dtype of
        `xbc`, and the candidate SSM state `(b, h, p, n)` in float32.
    """
    batch = xbc.shape[0]
    window = torch.cat([conv_state.to(xbc.dtype), xbc[..., None]], dim=-1)
    conv = (at_least_float32(window) * at_least_float32(conv_weight)).sum(-1)
    if conv_bias is not None:
        conv = conv + at_least_float32(conv_bias)
    xbc_out = F.silu(conv)
    if keep is not None:
        xbc_out = xbc_out * keep[:, None].to(xbc_out.dtype)
    group_width = n_groups * state_size
    x, B, C = xbc_out.split([num_heads * head_dim, group_width, group_width], dim=-1)
    y, new_ssm_state = ssd_step(
        x.view(batch, num_heads, head_dim),
        time_step(dt, dt_bias, time_step_limit, keep),
        -torch.exp(at_least_float32(A_log)),
        B.view(batch, n_groups, state_size),
        C.view(batch, n_groups, state_size),
        D,
        ssm_state,
    )
    return y, window[..., 1:], new_ssm_state


def gaussian_noise(
    x: torch.Tensor,
    snr_db: float,
    mode: str,
    generator: torch.Generator | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x` with Gaussian noise at a signal-to-noise ratio of `snr_db` (the noise study of the
    markschoene/implicit_languagemodels fork): additive `x + sigma * eps` with `sigma = RMS(x) * 10 ** (-dB / 20)`, the
    RMS taken over the whole tensor (batch included), or multiplicative `x * (1 + sigma * eps)` with
    `sigma = 10 ** (-dB / 20)`. `snr_db <= 0` means no noise. `rows` (`(batch,)`, 0/1) limits the noise to the samples
    whose token is real, so padding never changes a sample's state."""
    if snr_db <= 0:
        return x
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    if rows is not None:
        eps = eps * rows.view(-1, *([1] * (x.dim() - 1))).to(eps.dtype)
    scale = 10.0 ** (-snr_db / 20.0)
    compute = at_least_float32(x)
    if mode == "additive":
        noisy = compute + compute.pow(2).mean().sqrt() * scale * eps
    else:
        noisy = compute * (1 + scale * eps)
    return noisy.to(x.dtype)

