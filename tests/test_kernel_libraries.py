"""Our dispatch into the real mamba-ssm and causal-conv1d code, on the CPU.

mamba-ssm's Triton SSD kernels (`mamba_chunk_scan_combined`, what `kernels.ssd_chunk_scan` runs on a GPU) run here in
Triton's interpreter, with three shims kept in this file: a stub for its CUDA extension module (imported by its
`__init__`, never called by the SSD path), its autotuner taking the first config instead of timing them, and
`torch.cuda.device(...)` as a null context. causal-conv1d's CUDA entry point cannot run without CUDA, so its own
plain-PyTorch reference `causal_conv1d_ref` (same arguments) stands in for it, which checks our calling convention
against the library's own definition of the operation. What neither can show on the CPU (the CUDA extensions'
numerics, speed) is left to benchmarks/gpu_check.sh.

The libraries are installed without their CUDA builds in the kernel-libraries leg of tests/run_matrix.sh (versions
pinned there), which sets IMPLICIT_LM_REQUIRE_KERNEL_LIBRARIES=1 so that a library that fails to import fails these
tests; elsewhere they are skipped.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import types
import warnings

import pytest
import torch
from conftest import tiny_mamba2

from modeling_implicit import ConvergenceWarning, kernels, mamba2_ops
from modeling_implicit.compat import output_cache

REQUIRED = os.environ.get("IMPLICIT_LM_REQUIRE_KERNEL_LIBRARIES") == "1"


def _import(module: str, extension: str):
    """`module` with its CUDA extension module stubbed when that is missing (the libraries import it at the top)."""
    try:
        importlib.import_module(extension)
    except ImportError:
        sys.modules[extension] = types.ModuleType(extension)
    try:
        return importlib.import_module(module)
    except ImportError as error:
        if REQUIRED:
            raise
        pytest.skip(f"{module} is not installed: {error}")


@pytest.fixture
def mamba_ssm(monkeypatch):
    """mamba-ssm's `mamba_chunk_scan_combined`, runnable in Triton's interpreter, wired into our dispatch."""
    from triton.runtime import autotuner

    ssd = _import("mamba_ssm.ops.triton.ssd_combined", "selective_scan_cuda")

    def first_config(self, *args, **kwargs):  # what the autotuner would run, without timing every config
        config = self.configs[0]
        if config.pre_hook is not None:
            config.pre_hook({**dict(zip(self.arg_names, args)), **kwargs, **config.all_kwargs()})
        return self.fn.run(*args, **kwargs, **config.all_kwargs())

    monkeypatch.setattr(autotuner.Autotuner, "run", first_config)
    monkeypatch.setattr(torch.cuda, "device", lambda *args, **kwargs: contextlib.nullcontext())
    monkeypatch.setattr(kernels, "mamba_chunk_scan_combined", ssd.mamba_chunk_scan_combined)
    return ssd.mamba_chunk_scan_combined


@pytest.fixture
def causal_conv1d(monkeypatch):
    """causal-conv1d's reference in place of its CUDA entry point, wired into our dispatch."""
    interface = _import("causal_conv1d.causal_conv1d_interface", "causal_conv1d_cuda")
    monkeypatch.setattr(kernels, "causal_conv1d_fn", interface.causal_conv1d_ref)
    return interface.causal_conv1d_ref


@pytest.fixture
def on_any_device(monkeypatch):
    """The dispatch takes a library wherever it is present (on a GPU it also needs CUDA tensors)."""
    monkeypatch.setattr(kernels, "_fast", lambda tensor, implementation: implementation is not None)


def scan_inputs(seq_len: int, padded: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    batch, heads, head_dim, groups, state = 2, 4, 8, 2, 8

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    x = randn(batch, seq_len, heads, head_dim)
    dt = torch.nn.functional.softplus(randn(batch, seq_len, heads) - 1).clamp(0.01, 0.5)
    if padded:  # as the mixer pads: no time step and no input at padding (left), so the state carries through
        pad = min(3, seq_len - 1)
        dt[0, :pad] = 0
        x[0, :pad] = 0
    A = -torch.rand(heads, generator=generator) - 0.5
    B, C = randn(batch, seq_len, groups, state), randn(batch, seq_len, groups, state)
    return x, dt, A, B, C, randn(heads), randn(batch, heads, head_dim, state)


# Every case costs seconds in the interpreter: chunk boundaries inside, at and beyond the sequence, each combined
# with one of the other conditions.
@pytest.mark.parametrize("seq_len,chunk_size,initial,padded", [
    (10, 4, True, True), (8, 4, False, False), (1, 4, True, False), (5, 8, False, True), (17, 16, True, True)])
def test_the_chunk_scan_through_mamba_ssm_equals_the_reference(mamba_ssm, on_any_device, seq_len, chunk_size,
                                                               initial, padded):
    """Outputs and final states of mamba-ssm's Triton SSD kernels called by our dispatch, against our PyTorch
    reference: chunk boundaries inside, at and beyond the sequence, an initial state, left padding."""
    x, dt, A, B, C, D, start = scan_inputs(seq_len, padded)
    initial_state = start if initial else None
    assert kernels.ssd_chunk_scan.backend(x, dt, A, B, C, D, chunk_size, initial_state) == "mamba_ssm"
    y, final = kernels.ssd_chunk_scan(x, dt, A, B, C, D, chunk_size, initial_state)
    expected_y, expected_final = mamba2_ops.ssd_chunk_scan(x, dt, A, B, C, D, chunk_size, initial_state)
    assert y.dtype == final.dtype == torch.float32
    torch.testing.assert_close(y, expected_y, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(final, expected_final, atol=2e-5, rtol=2e-5)


def test_the_convolution_through_causal_conv1d_equals_the_reference(causal_conv1d, on_any_device):
    generator = torch.Generator().manual_seed(1)
    x, weight, bias = (torch.randn(2, 12, 9, generator=generator), torch.randn(12, 4, generator=generator),
                       torch.randn(12, generator=generator))
    assert kernels.causal_conv1d_silu.backend(x, weight, bias, None) == "causal_conv1d"
    out, state = kernels.causal_conv1d_silu(x, weight, bias, None)
    expected_out, expected_state = mamba2_ops.causal_conv1d_silu(x, weight, bias, None)
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(state, expected_state)


def test_a_model_through_the_real_libraries_equals_the_reference(mamba_ssm, causal_conv1d, on_any_device):
    """A whole implicit Mamba2 prefill with left padding, time-step limits (the clamp after softplus) and a chunk
    boundary inside the sequence: logits, iterations and committed states as on the PyTorch path."""
    # One layer and a fixed two iterations (no early stop): every evaluation of f is a scan in the interpreter.
    model = tiny_mamba2(time_step_limit=(0.02, 0.4), chunk_size=4, num_hidden_layers=1, eval_max_iterations=2,
                        early_stop=False)
    tokens = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # two iterations: not converged, on both paths alike
        with pytest.MonkeyPatch.context() as reference_path:
            reference_path.setattr(kernels, "_fast", lambda tensor, implementation: False)
            expected = model(tokens, attention_mask=mask, use_cache=True)
        got = model(tokens, attention_mask=mask, use_cache=True)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.solver_stats.iterations, expected.solver_stats.iterations)
    for a, b in zip(output_cache(got).states, output_cache(expected).states):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)

