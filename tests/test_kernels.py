"""Fused kernels against their PyTorch references (Triton in interpreter mode on the CPU), the dispatch layer, and the
fast-inference paths that must not change results: chunked convergence tests, CUDA-graph decoding (uncaptured on
the CPU), warm start and Anderson acceleration."""

import os
import subprocess
import sys
import warnings
from dataclasses import replace

import pytest
import torch
from conftest import ROOT, tiny_llama, tiny_mamba2

import modeling_implicit as mi
from modeling_implicit import kernels, mamba2_ops, modeling_implicit_utils
from modeling_implicit.compat import output_cache
from modeling_implicit.solver import solve_fixed_point
from modeling_implicit.solver_ops import SolveState, picard_update_reference

triton_kernels = pytest.importorskip("modeling_implicit.triton_kernels", reason="triton is not installed")
# Compiled on a GPU when run there with TRITON_INTERPRET=0 (benchmarks/gpu_check.sh), else in the interpreter (CI).
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
assert DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1", "conftest sets TRITON_INTERPRET on the CPU"

FAMILIES = {"mamba2": tiny_mamba2, "llama": tiny_llama}


def ids(batch=3, length=7, seed=0):
    return torch.randint(3, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- the fused Picard update -------------------------------------------------------------------------------------


def picard_case(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=generator).to(dtype)
    fz = (0.9 * z.float() + 0.05 * torch.randn(shape, generator=generator)).to(dtype)
    fz[1] = z[1]  # residual 0: converges now
    if shape[0] > 3:
        fz[3] = float("nan")  # diverges at this step
    z, fz = z.to(DEVICE), fz.to(DEVICE)
    state = SolveState.start(z)
    state = replace(state, out=torch.zeros_like(z), step=torch.tensor(4, device=DEVICE),
                    iterations=torch.full((shape[0],), 4, device=DEVICE))
    state.active[0] = False  # stopped earlier: untouched
    state.residual[0] = 0.01
    return state, fz


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 1, 7), (4, 3, 33), (4, 5, 8001)])  # odd sizes; the last spans 3 programs
@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
def test_fused_picard_update_matches_reference(shape, dtype, stop_mode):
    state, fz = picard_case(shape, dtype)
    expected = picard_update_reference(state, fz, 0.8, 0.05, stop_mode)
    copied = replace(state, **{name: getattr(state, name).clone() for name in (
        "z", "out", "active", "iterations", "residual", "converged", "diverged_at")}, step=state.step + 1)
    got = triton_kernels.picard_update(copied, fz, 0.8, 0.05, stop_mode)
    z, out = got.z, got.out
    active, iterations, residual, converged, diverged_at = (
        got.active, got.iterations, got.residual, got.converged, got.diverged_at)
    ulp = 0 if dtype == torch.float32 else torch.finfo(dtype).eps  # rounding the float32 update: one unit apart
    torch.testing.assert_close(z, expected.z, atol=ulp, rtol=max(ulp, 1e-6), equal_nan=True)
    assert torch.equal(out.isnan(), expected.out.isnan())
    torch.testing.assert_close(out, expected.out, equal_nan=True)
    torch.testing.assert_close(residual, expected.residual, rtol=1e-5, atol=1e-7, equal_nan=True)
    for name, got in (("active", active), ("iterations", iterations), ("converged", converged),
                      ("diverged_at", diverged_at)):
        assert torch.equal(got, getattr(expected, name)), name
    assert not active[1] and converged[1] and iterations[0] == 4 and iterations[2] == 5
    if shape[0] > 3:
        assert diverged_at.tolist() == [0, 0, 0, 5]


def test_solver_with_the_fused_update_matches_the_reference(monkeypatch):
    model = tiny_mamba2(tolerance=1e-5).to(DEVICE)
    tokens = ids().to(DEVICE)
    for mode in ("simultaneous", "sequential"):
        model.config.inference_mode = mode
        with torch.no_grad():
            expected = model(tokens)
            monkeypatch.setattr(kernels, "fused_picard_update_available", lambda z: z.is_contiguous())
            fused = model(tokens)
            monkeypatch.undo()
        torch.testing.assert_close(fused.logits, expected.logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(fused.solver_stats.iterations, expected.solver_stats.iterations), mode


# --- the fused Mamba2 decode step ----------------------------------------------------------------------------------


def decode_case(batch, heads, head_dim, state_size, groups, width, dtype, bias, padded, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(DEVICE)

    conv_dim = heads * head_dim + 2 * groups * state_size
    layers = 2  # states are views into the cache's stacked (batch, layers, ...) tensors
    conv_states = randn(batch, layers, conv_dim, width - 1).to(dtype)
    ssm_states = randn(batch, layers, heads, head_dim, state_size)
    projected = randn(batch, conv_dim + heads + 5).to(dtype)  # xbc and dt are slices of the in-projection
    keep = (torch.arange(batch, device=DEVICE) != 1).float() if padded else None
    xbc = projected[:, :conv_dim] * (1 if keep is None else keep[:, None].to(dtype))
    arguments = dict(
        dt=projected[:, conv_dim : conv_dim + heads], keep=keep, conv_state=conv_states[:, 1],
        conv_weight=randn(conv_dim, width), conv_bias=randn(conv_dim) if bias else None, dt_bias=randn(heads),
        A_log=randn(heads), D=randn(heads), ssm_state=ssm_states[:, 1], num_heads=heads, head_dim=head_dim,
        state_size=state_size, n_groups=groups, time_step_limit=(0.0, float("inf")),
    )
    return xbc, arguments, (conv_states, ssm_states)


@pytest.mark.parametrize(
    "batch,heads,head_dim,state_size,groups,width,dtype,bias,padded",
    [
        (3, 4, 12, 10, 2, 4, torch.float32, True, True),
        (3, 4, 12, 10, 2, 4, torch.bfloat16, True, True),
        (2, 3, 64, 16, 1, 3, torch.float32, False, False),
        (1, 2, 100, 7, 2, 2, torch.float16, True, False),  # head_dim spans two program blocks
    ],
)
def test_fused_decode_step_matches_reference(batch, heads, head_dim, state_size, groups, width, dtype, bias, padded):
    xbc, arguments, committed = decode_case(batch, heads, head_dim, state_size, groups, width, dtype, bias, padded)
    before = [t.clone() for t in committed]
    expected = mamba2_ops.mamba2_decode_step_reference(xbc, **arguments)
    got = triton_kernels.mamba2_decode_step(xbc, **arguments)
    for name, a, b in zip(("y", "conv_state", "ssm_state"), got, expected):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5, msg=name)
    assert all(torch.equal(a, b) for a, b in zip(before, committed)), "the committed states were written"
    if padded:  # a padded token leaves the SSM state as it was
        torch.testing.assert_close(got[2][1], committed[1][1, 1])


def test_model_decoding_with_the_fused_step_matches_the_reference(monkeypatch):
    # Few tokens, heads and groups and a loose tolerance: the interpreter runs every program of every launch in Python.
    model = tiny_mamba2(tolerance=1e-3, num_hidden_layers=1, hidden_size=16, n_groups=1).to(DEVICE)
    tokens = ids(batch=2, length=4).to(DEVICE)
    mask = torch.ones_like(tokens)
    mask[0, :2] = 0
    settings = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_scores=True)
    expected = model.generate(tokens, attention_mask=mask, **settings)
    fused_step = kernels.mamba2_decode_step_triton
    monkeypatch.setattr(kernels, "_fast", lambda tensor, implementation: implementation is fused_step)
    assert kernels.backends(DEVICE)["mamba2_decode_step"] == "triton"
    fused = model.generate(tokens, attention_mask=mask, **settings)
    assert torch.equal(fused.sequences, expected.sequences)
    for a, b in zip(fused.scores, expected.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# --- dispatch ------------------------------------------------------------------------------------------------------


def test_dispatch_picks_pytorch_on_cpu(monkeypatch):
    if torch.cuda.is_available():
        fast = kernels.backends("cuda")
        assert fast["mamba2_decode_step"] == fast["picard_update"] == "triton"
    assert set(kernels.backends("cpu").values()) == {"torch"}
    monkeypatch.setenv("IMPLICIT_LM_KERNELS", "torch")
    assert not kernels.kernels_enabled()


def test_cuda_only_packages_are_never_required():
    """With mamba-ssm, causal-conv1d, flash-attn and triton all unimportable, the models load and run on PyTorch."""
    script = (
        "import sys\n"
        "for name in ('mamba_ssm', 'causal_conv1d', 'flash_attn', 'triton'):\n"
        "    sys.modules[name] = None\n"
        "import torch, modeling_implicit as mi\n"
        "from modeling_implicit import kernels\n"
        "assert kernels.mamba2_decode_step_triton is None and kernels.mamba_chunk_scan_combined is None\n"
        "assert kernels.causal_conv1d_fn is None and set(kernels.backends('cpu').values()) == {'torch'}\n"
        "config = mi.ImplicitMamba2Config(vocab_size=16, hidden_size=16, num_hidden_layers=1, state_size=4,"
        " head_dim=8)\n"
        "model = mi.ImplicitMamba2ForCausalLM(config).eval()\n"
        "print(model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False).shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "torch.Size([1, 5])" in result.stdout


def test_library_kernels_are_called_with_the_reference_conventions(monkeypatch):
    """The mamba-ssm and causal-conv1d paths, with stand-ins that follow the libraries' signatures and return types
    (computed by the references), give the reference results: the argument plumbing is right. For the legs without
    the libraries; tests/test_kernel_libraries.py runs mamba-ssm's real Triton kernels (interpreted) and causal-conv1d's
    own reference where they are installed, and only causal-conv1d's CUDA entry point stays unrun on a CPU."""
    calls = []

    def chunk_scan(x, dt, A, B, C, chunk_size, D=None, initial_states=None, return_final_states=False):
        calls.append("scan")
        y, final = mamba2_ops.ssd_chunk_scan(x, dt, A, B, C, D, chunk_size, initial_states)
        return y.to(x.dtype), final

    def conv(x, weight, bias=None, activation=None):
        calls.append("conv")
        assert activation == "silu" and weight.dim() == 2
        return mamba2_ops.causal_conv1d_silu(x, weight, bias, None)[0]

    model = tiny_mamba2()
    tokens = ids()
    with torch.no_grad():
        expected = model(tokens, use_cache=True)
        monkeypatch.setattr(kernels, "mamba_chunk_scan_combined", chunk_scan)
        monkeypatch.setattr(kernels, "causal_conv1d_fn", conv)
        monkeypatch.setattr(kernels, "_fast", lambda tensor, implementation: implementation in (chunk_scan, conv))
        got = model(tokens, use_cache=True)
    assert {"scan", "conv"} <= set(calls)
    torch.testing.assert_close(got.logits, expected.logits)
    for a, b in zip(output_cache(got).states, output_cache(expected).states):
        torch.testing.assert_close(a, b)


# --- chunked convergence tests and CUDA-graph decoding -------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["simultaneous", "sequential"])
@pytest.mark.parametrize("skip_converged_rows", [False, True])
def test_convergence_check_interval_does_not_change_results(family, mode, skip_converged_rows):
    model = FAMILIES[family](inference_mode=mode, skip_converged_rows=skip_converged_rows)
    tokens = ids()
    mask = torch.ones_like(tokens)
    mask[1, :2] = 0
    results = {}
    for interval in (1, 4):
        model.config.convergence_check_interval = interval
        with torch.no_grad():
            results[interval] = model(tokens, attention_mask=mask)
    first, second = results[1].solver_stats, results[4].solver_stats
    if not skip_converged_rows:  # the whole batch evaluated every time: bitwise
        assert torch.equal(results[1].logits, results[4].logits)
        for name in ("iterations", "residual", "converged"):
            assert torch.equal(getattr(first, name), getattr(second, name))
    else:
        # Rows set aside at other tests run in other batch shapes: rounding can move a convergence test by an
        # iteration, and in sequential mode the next tokens start from states that differ within the tolerance.
        torch.testing.assert_close(results[1].logits, results[4].logits, atol=1e-4, rtol=1e-4)
        assert (first.iterations - second.iterations).abs().float().mean() <= 1


def test_interval_divergence_is_still_reported():
    def fn(z):
        return torch.where(torch.arange(2)[:, None] == 1, z * float("nan"), 0.5 * z + 1), None

    settings = mi.SolverSettings(max_iterations=50, tolerance=1e-9, stop_mode="rel", damping=1.0, solver="picard",
                                 anderson_memory=3, phantom_steps=1, phantom_damping=1.0, backward="phantom",
                                 convergence_check_interval=8)
    with torch.no_grad(), pytest.raises(mi.SolverDivergenceError, match=r"sample\(s\) \[1\].*iteration 1"):
        solve_fixed_point(fn, torch.zeros(2, 3), settings)


@pytest.fixture
def graph_decoding(monkeypatch):
    """On a GPU, CUDA-graph decoding as users get it; on the CPU the same static-buffer path, run uncaptured."""
    if DEVICE == "cpu":  # only the device requirement is lifted: every guard on the config stays
        monkeypatch.setattr(modeling_implicit_utils, "can_capture_graphs", lambda embeds: not torch.is_grad_enabled())


@pytest.mark.parametrize("family", FAMILIES)
def test_graph_decoding_equals_eager(graph_decoding, family):
    model = FAMILIES[family](solver="picard", tolerance=1e-4, eval_max_iterations=400,
                             convergence_check_interval=3).to(DEVICE)
    tokens = ids().to(DEVICE)
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0
    settings = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_scores=True)
    # A graph evaluates the whole batch until its last row stops: the eager path that does the same.
    model.config.skip_converged_rows = False
    expected = model.generate(tokens, attention_mask=mask, **settings)
    model.config.cuda_graph_decoding = True
    graphed = model.generate(tokens, attention_mask=mask, **settings)
    assert torch.equal(graphed.sequences, expected.sequences)
    graphs = model.base_model._decode_graphs.graphs
    if family == "mamba2":  # fixed-size states: one graph serves every token after the first, bitwise eager
        assert all(torch.equal(a, b) for a, b in zip(graphed.scores, expected.scores))
        assert len(graphs) == 1
    else:  # attention over the whole key/value buffers, masked: eager within rounding, a graph per buffer width
        for a, b in zip(graphed.scores, expected.scores):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert len(graphs) >= 1


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_decoding_a_position_again_after_rolling_back_equals_eager(graph_decoding, family, graphs):
    """Decoding the same position twice (Llama: `crop(-1)`; Mamba2, whose recurrent state cannot be cropped: restoring
    a snapshot) repeats a graph's key, so the second decode runs through the static buffers. It must give the eager
    logits: the static cache once forgot the committed length (0.22 off for Llama)."""
    model = FAMILIES[family](solver="picard", tolerance=1e-6, eval_max_iterations=400).to(DEVICE)
    model.config.cuda_graph_decoding = graphs
    tokens = ids(batch=2, length=5).to(DEVICE)
    with torch.no_grad():
        cache = output_cache(model(tokens[:, :-1], use_cache=True))
        eager = model.base_model.make_cache()
        eager.restore(cache.snapshot())
        model.config.cuda_graph_decoding = False
        expected = model(tokens[:, -1:], cache=eager, use_cache=True).logits
        model.config.cuda_graph_decoding = graphs
        before = cache.snapshot()
        decoded = []
        for _ in range(3):
            decoded.append(model(tokens[:, -1:], cache=cache, use_cache=True).logits)
            if family == "llama":
                cache.crop(-1)
            else:
                cache.restore(before)
            assert cache.get_seq_length() == 4
    for logits in decoded:
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    if graphs:
        assert len(model.base_model._decode_graphs.graphs) == 1


@pytest.mark.parametrize("setting", ["explicit", "anderson", "reference loop", "noise"])
def test_graph_decoding_is_left_out_where_a_graph_cannot_replay_the_step(graph_decoding, setting):
    """Asked for, graph decoding still runs eager where the step is no static graph: an explicit model (no solve),
    Anderson (its history grows), a reference loop (not our per-sample loop), Mamba2's noise study (fresh draws)."""
    overrides = {"explicit": dict(implicit=False), "anderson": dict(solver="anderson"),
                 "reference loop": dict(inference_loop="torchdeq_reference"),
                 "noise": dict(state_noise_db=20.0)}[setting]
    model = tiny_mamba2(tolerance=1e-4, eval_max_iterations=100, prefill_mode="sequential",
                        **{"solver": "picard", **overrides}).to(DEVICE)
    tokens = ids(batch=2, length=3).to(DEVICE)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", mi.ConvergenceWarning)
        cache = output_cache(model(tokens, use_cache=True))
        model.config.cuda_graph_decoding = True
        for _ in range(2):
            model(tokens[:, -1:], cache=cache, use_cache=True)
    assert getattr(model.backbone, "_decode_graphs", None) is None


def test_graph_decoding_caps_iterations_exactly(graph_decoding):
    """A cap that is not a multiple of the interval is honoured exactly (the remainder runs uncaptured)."""
    model = tiny_mamba2(tolerance=1e-12, eval_max_iterations=7, convergence_check_interval=3,
                        prefill_mode="sequential").to(DEVICE)
    tokens = ids(batch=2, length=3).to(DEVICE)
    with torch.no_grad(), warnings.catch_warnings():  # graphs are recorded only without an autograd tape
        warnings.simplefilter("ignore", mi.ConvergenceWarning)
        cache = output_cache(model(tokens, use_cache=True))
        model.config.cuda_graph_decoding = True
        for _ in range(3):
            out = model(tokens[:, -1:], cache=cache, use_cache=True)
    assert out.solver_stats.iterations.tolist() == [[7], [7]]
    assert len(model.backbone._decode_graphs.graphs) == 1


# --- fewer iterations for the same fixed point ---------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_warm_start_and_anderson_reach_the_same_outputs(family):
    model = FAMILIES[family](solver="picard", tolerance=1e-6, eval_max_iterations=800, inference_mode="sequential")
    tokens = ids()
    mask = torch.ones_like(tokens)
    mask[2, :2] = 0
    outputs = {}
    for solver, warm_start in (("picard", False), ("picard", True), ("anderson", False), ("anderson", True)):
        model.config.update(dict(solver=solver, warm_start=warm_start))
        with torch.no_grad():
            outputs[solver, warm_start] = model(tokens, attention_mask=mask)
    reference = outputs["picard", False]
    for key, output in outputs.items():
        assert output.solver_stats.converged[mask.bool()].all(), key
        torch.testing.assert_close(output.logits[mask.bool()], reference.logits[mask.bool()], atol=1e-4, rtol=1e-4)
    # Padding restarts from zero and converges at once, warm start or not.
    assert (outputs["picard", True].solver_stats.iterations[2, :2] == 1).all()
    assert outputs["anderson", False].solver_stats.iterations.sum() < reference.solver_stats.iterations.sum()


def test_warm_start_point_follows_the_cache():
    model = tiny_mamba2(warm_start=True)
    with torch.no_grad():
        cache = output_cache(model(ids(batch=2, length=4), use_cache=True))
    assert cache.fixed_point.shape == (2, 1, 32)
    last = cache.fixed_point.clone()
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(cache.fixed_point, last.flip(0))
    cache.reset()
    assert cache.fixed_point is None
    llama = tiny_llama(warm_start=True)
    with torch.no_grad():
        cache = output_cache(llama(ids(batch=1, length=4), use_cache=True))
    cache.crop(-1)
    assert cache.fixed_point is None and cache.get_seq_length() == 3
