"""`compile_decoding`: the solver iterations of a single-token step compiled by torch.compile over the static buffers
of `decode_graphs.py`. Compiled decoding gives eager decoding's ids (logits within 1e-5; eager evaluating the whole
batch, as a graph does), with and without padding, for both families, compiles one graph for a whole generation
(Llama: one per key/value buffer width), and stays eager where a graph cannot serve. `compile_simultaneous`: the
whole-sequence stack compiled, eager's results and gradients.

The fast tests compile with the `aot_eager` backend (the same tracing, `fullgraph`: any graph break fails; no code
generation); the e2e tests compile with inductor, what users get."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import tiny_llama, tiny_mamba2

from modeling_implicit import ConvergenceWarning, decode_graphs
from modeling_implicit.compat import output_cache

FAMILIES = {"mamba2": tiny_mamba2, "llama": tiny_llama}


def recording_compiles(monkeypatch, module, hook: str, **options):
    """`compile_with(backend)`: patches our compile hook `module.hook` to compile through `backend` (with `options`)
    and returns the list of what it compiled during the test."""
    compiled = []

    def compile_with(backend: str):
        def compile_hook(function):
            compiled.append(function)
            return torch.compile(function, backend=backend, **options)

        monkeypatch.setattr(module, hook, compile_hook)
        return compiled

    return compile_with


@pytest.fixture
def compiles(monkeypatch):
    """The decode chunks compiled during a test, through `backend` (aot_eager unless a test asks for inductor)."""
    return recording_compiles(monkeypatch, decode_graphs, "compile_chunk", fullgraph=True, dynamic=False)


def decode(model, tokens, mask, max_new_tokens=8, **overrides):
    # min_new_tokens: no row stops at EOS, so every step decodes the whole batch
    settings = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True, output_scores=True,
                    pad_token_id=0, solver_overrides=overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.generate(tokens, attention_mask=mask, **settings)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padded", [False, True])
def test_compiled_decoding_gives_the_eager_ids_and_logits(compiles, family, padded):
    compiled = compiles("aot_eager")
    model = FAMILIES[family](solver="picard", tolerance=1e-5, eval_max_iterations=300, convergence_check_interval=3)
    tokens = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    if padded:
        mask[0, :2] = 0
    expected = decode(model, tokens, mask, skip_converged_rows=False)  # a graph evaluates the whole batch
    got = decode(model, tokens, mask, compile_decoding=True)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.scores, expected.scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    graphs = model.base_model._decode_graphs.graphs
    assert graphs and all(graph.compiled is not None for graph in graphs.values())
    if family == "mamba2":  # fixed-size states: one compiled chunk serves every token after the first
        assert len(graphs) == 1 and len(compiled) == 1
    else:  # attention over the whole key/value buffers: one chunk per buffer width (the cache doubles it)
        widths = {graph.states[0].shape[2] for graph in graphs.values()}
        assert len(compiled) == len(widths) <= 2


@pytest.mark.parametrize("setting", ["anderson", "training", "reference loop"])
def test_compiled_decoding_is_left_out_where_a_graph_cannot_serve(compiles, setting):
    compiled = compiles("aot_eager")
    overrides = {"anderson": dict(solver="anderson"), "training": {},
                 "reference loop": dict(inference_loop="torchdeq_reference")}[setting]
    model = tiny_mamba2(tolerance=1e-4, prefill_mode="sequential", **{"solver": "picard", **overrides})
    tokens = torch.randint(3, 64, (2, 3), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(), torch.set_grad_enabled(setting == "training"):
        warnings.simplefilter("ignore", ConvergenceWarning)
        cache = output_cache(model(tokens, use_cache=True))
        for _ in range(3):
            model(tokens[:, -1:], cache=cache, use_cache=True, solver_overrides={"compile_decoding": True})
    assert compiled == [] and getattr(model.backbone, "_decode_graphs", None) is None


@pytest.mark.e2e  # inductor compiles C++ (tens of seconds on 2 cores)
@pytest.mark.parametrize(("family", "new_tokens", "graphs"), [("mamba2", 256, 1), ("llama", 24, 3)])
def test_inductor_compiles_one_graph_per_shape_over_a_long_generation(compiles, family, new_tokens, graphs):
    """Mamba2: one graph for 256 tokens and another prompt of the same shapes. Llama: one per key/value buffer width
    (the prompt's 4 tokens leave room for 8, which doubles to 16 and 32 while 24 tokens are decoded)."""
    compiled = compiles("inductor")
    model = FAMILIES[family](solver="picard", tolerance=1e-5, eval_max_iterations=300, convergence_check_interval=2)
    tokens = torch.randint(3, 64, (3, 4), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(tokens)
    mask[1, :2] = 0
    torch._dynamo.utils.counters.clear()
    expected = decode(model, tokens, mask, max_new_tokens=new_tokens, skip_converged_rows=False)
    got = decode(model, tokens, mask, max_new_tokens=new_tokens, compile_decoding=True)
    assert torch.equal(got.sequences, expected.sequences) and got.sequences.shape == (3, 4 + new_tokens)
    for a, b in zip(got.scores, expected.scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if family == "mamba2":
        more = decode(model, tokens[:, :3], mask[:, :3], compile_decoding=True)  # another prompt, same shapes
        assert more.sequences.shape == (3, 3 + 8)
    assert len(compiled) == torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # no recompile


def test_past_the_recompile_limit_a_shape_decodes_eagerly(compiles, monkeypatch):
    """Every graph compiles the same code, and `fullgraph` turns torch's recompile limit into an error: the shapes
    past it decode eagerly, with a warning, and still give eager decoding's ids."""
    compiled = compiles("aot_eager")
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    torch._dynamo.reset()
    model = tiny_mamba2(solver="picard", tolerance=1e-5, eval_max_iterations=300)
    for batch in (2, 3):
        tokens = torch.randint(3, 64, (batch, 4), generator=torch.Generator().manual_seed(batch))
        mask = torch.ones_like(tokens)
        expected = decode(model, tokens, mask, max_new_tokens=4)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = decode(model, tokens, mask, max_new_tokens=4, compile_decoding=True)
        assert torch.equal(got.sequences, expected.sequences)
        limit_hit = [w for w in caught if "recompile limit" in str(w.message)]
        assert len(limit_hit) == (batch == 3)
    assert len(compiled) == 2
    torch._dynamo.reset()


# --- compile_simultaneous: the whole-sequence stack evaluation compiled -------------------------------------------


@pytest.fixture
def stack_compiles(monkeypatch):
    """The stack evaluations compiled during a test (`compile_simultaneous`), through `backend`."""
    from modeling_implicit import modeling_implicit_utils

    return recording_compiles(monkeypatch, modeling_implicit_utils, "compile_stack")


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_simultaneous_mode_and_prefill_give_the_eager_results(stack_compiles, family):
    compiled = stack_compiles("aot_eager")
    model = FAMILIES[family](tolerance=1e-5, eval_max_iterations=300)
    tokens = torch.randint(3, 64, (3, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(tokens)
    mask[2, :3] = 0
    results = {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for on in (False, True):
            # The whole batch at every evaluation: fewer shapes to trace (a smaller batch would recompile once)
            overrides = dict(compile_simultaneous=on, skip_converged_rows=False)
            full = model(tokens, attention_mask=mask, use_cache=False, solver_overrides=overrides)
            prefill = model(tokens[:, :4], attention_mask=mask[:, :4], use_cache=True, solver_overrides=overrides)
            rest = model(tokens[:, 4:], attention_mask=mask, cache=output_cache(prefill), use_cache=True,
                         solver_overrides=overrides)
            results[on] = (full, prefill, rest)
    for got, expected in zip(results[True], results[False]):
        torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(got.solver_stats.iterations, expected.solver_stats.iterations)
    assert len(compiled) == 1  # one compiled stack per backbone, whatever the shapes


def test_compiled_simultaneous_training_step_has_the_eager_gradients(stack_compiles):
    compiled = stack_compiles("aot_eager")
    gradients = {}
    for on in (False, True):
        model = tiny_mamba2(tolerance=1e-5, max_iterations=40)
        model.train()
        tokens = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(6))
        loss = model(tokens, labels=tokens, solver_overrides=dict(compile_simultaneous=on)).loss
        loss.backward()
        gradients[on] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert len(compiled) == 1  # the tape-free solve compiled; the phantom steps with a tape ran eagerly
    for a, b in zip(gradients[True], gradients[False]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
