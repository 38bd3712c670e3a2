"""The reference-compatible inference loops (`inference_loop`, formerly `stop_rule`), checked against small loops
written here step by step from the reference codebases' documented semantics (microsoft/implicit_languagemodels'
inference loop; the standalone code's `fixed_point_iter` and `_sequential_step`), run on the model's own f."""

from __future__ import annotations

import argparse

import pytest
import torch
from conftest import tiny_llama, tiny_mamba2
from implicit_lm.conversion.reference import write_reference_checkpoint
from test_conversion import run_convert, tiny_reference
from test_modeling_common import fixed_point_function, ids
from transformers import AutoModelForCausalLM

FAMILIES = {"mamba2": tiny_mamba2, "llama": tiny_llama}
SETTINGS = dict(solver="picard", damping=0.8, tolerance=0.05, eval_max_iterations=24)


def global_loop(fn, z0, max_iter, tol, damping):
    """microsoft/implicit_languagemodels (and the standalone `_sequential_step`): damp, then test one batch norm."""
    z, count = z0, -1
    for count in range(max_iter - 1):
        z_next = fn(z)[0]
        diff_rel = (z_next - z).norm() / (1e-6 + z.norm())
        z = (1 - damping) * z + damping * z_next
        if diff_rel < tol:
            break
    out, aux = fn(z)
    return out, aux, count + 1


def best_per_sample_loop(fn, x0, max_iter, tol, beta):
    """The standalone `fixed_point_iter`: damped iterates, per-sample residual against the new iterate, best kept."""
    x, best_x = x0, x0.clone()
    best_rel = torch.full((x0.shape[0],), float("inf"))
    best_step = torch.zeros(x0.shape[0], dtype=torch.long)
    for k in range(max_iter):
        fx = beta * fn(x)[0] + (1 - beta) * x
        rel = (fx - x).flatten(1).norm(dim=1) / (fx.flatten(1).norm(dim=1) + 1e-9)
        for sample in range(x0.shape[0]):
            if rel[sample] < best_rel[sample]:
                best_rel[sample], best_step[sample], best_x[sample] = rel[sample], k + 1, fx[sample]
        x = fx
        if rel.max() < tol:
            break
    return best_x, best_step




@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rule", ["torchdeq_reference", "standalone_reference"])
def test_simultaneous_mode_follows_the_reference_loop(family, rule):
    model = FAMILIES[family](inference_loop=rule, **SETTINGS)
    tokens = ids(batch=3, length=7)
    with torch.no_grad():
        fn = fixed_point_function(model.base_model, tokens)
        z0 = torch.zeros(3, 7, model.config.hidden_size)
        if rule == "torchdeq_reference":
            expected, _, steps = global_loop(fn, z0, 24, 0.05, 0.8)
            steps = torch.full((3,), steps)
        else:
            expected, steps = best_per_sample_loop(fn, z0, 24, 0.05, 0.8)
        out = model.base_model(tokens)
    torch.testing.assert_close(out.last_hidden_state, expected, atol=1e-5, rtol=1e-5)
    assert out.solver_stats.iterations.tolist() == steps.tolist()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rule", ["torchdeq_reference", "standalone_reference"])
def test_sequential_mode_follows_the_reference_step(family, rule):
    """Per token: the global loop against the committed states, and the final undamped call's states committed."""
    model = FAMILIES[family](inference_loop=rule, inference_mode="sequential", **SETTINGS)
    tokens = ids(batch=2, length=5)
    backbone = model.base_model
    cache = backbone.make_cache()
    expected, steps = [], []
    with torch.no_grad():
        for t in range(5):
            fn = fixed_point_function(backbone, tokens[:, t : t + 1], cache)
            out, aux, count = global_loop(fn, torch.zeros(2, 1, model.config.hidden_size), 24, 0.05, 0.8)
            cache.commit(aux[0], 1)
            expected.append(out)
            steps.append(count)
        got = backbone(tokens)
    torch.testing.assert_close(got.last_hidden_state, torch.cat(expected, dim=1), atol=1e-5, rtol=1e-5)
    assert got.solver_stats.iterations.tolist() == [steps, steps]


def test_reference_rules_couple_the_rows_of_a_batch():
    """With the reference loops a sample's iterations depend on its batch mates; with ours they do not."""
    tokens = ids(batch=4, length=6)
    for rule, coupled in (("per_sample", False), ("torchdeq_reference", True)):
        model = tiny_mamba2(inference_loop=rule, **{**SETTINGS, "tolerance": 1e-4, "eval_max_iterations": 200})
        with torch.no_grad():
            alone = torch.cat([model(tokens[i : i + 1]).solver_stats.iterations for i in range(4)])
            together = model(tokens).solver_stats.iterations
        assert (not torch.equal(alone, together)) == coupled, (rule, alone, together)
        assert (together.unique().numel() == 1) == coupled  # the reference batch stops together


@pytest.mark.usefixtures("verify_in_process")
def test_a_converted_checkpoint_reproduces_the_reference_at_its_own_settings(tmp_path):
    """The torchdeq-layout checkpoint at the reference's settings (f_tol 0.05, tau 0.8, eval cap 4 x f_max_iter):
    the reloaded model with inference_loop='torchdeq_reference' gives the reference loop's logits and iteration counts."""
    reference = tiny_reference("mamba2-implicit")
    source = write_reference_checkpoint(reference, tmp_path / "src", seed=4)
    run_convert("--src", str(tmp_path / "src"), "--dst", str(tmp_path / "dst"))
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "dst", inference_loop="torchdeq_reference").eval()
    config = converted.config
    tokens = ids(batch=2, length=8, vocab=61)
    with torch.no_grad():
        fn = fixed_point_function(source.base_model, tokens)
        z, _, steps = global_loop(fn, torch.zeros(2, 8, config.hidden_size), config.eval_max_iterations,
                                  config.tolerance, config.damping)
        expected = source.lm_head(z)
        got = converted(tokens)
    assert (config.tolerance, config.damping) == (0.05, 0.8)
    torch.testing.assert_close(got.logits, expected, atol=1e-4, rtol=0)
    assert got.solver_stats.iterations.tolist() == [steps, steps]


def test_invalid_inference_loops_are_refused():
    with pytest.raises(ValueError, match="inference_loop='nearest'"):
        tiny_mamba2(inference_loop="nearest")
    with pytest.raises(ValueError, match="inference_loop='torchdeq_reference'.*anderson"):
        tiny_mamba2(inference_loop="torchdeq_reference", solver="anderson")


def test_the_old_name_stop_rule_still_works_everywhere(tmp_path, capsys):
    """`stop_rule`, the field's name before `inference_loop`, is still read: as a keyword, from a saved config.json,
    as a `from_pretrained` override and a per-call override, and as the evaluation commands' `--stop-rule`; what is
    saved uses the new name."""
    import json

    from implicit_lm.eval.arguments import add_model_arguments, solver_overrides

    model = tiny_mamba2(stop_rule="torchdeq_reference")
    assert model.config.inference_loop == model.config.stop_rule == "torchdeq_reference"
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["inference_loop"] == "torchdeq_reference" and "stop_rule" not in saved
    saved["stop_rule"] = saved.pop("inference_loop")  # a folder saved by an earlier release
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.inference_loop == "torchdeq_reference"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, stop_rule="standalone_reference")
    assert reloaded.config.inference_loop == "standalone_reference"
    with pytest.raises(ValueError, match="inference_loop='nearest'"):
        AutoModelForCausalLM.from_pretrained(tmp_path, stop_rule="nearest")

    tokens = ids(batch=2, length=5)
    with torch.no_grad():
        expected = tiny_mamba2(inference_loop="per_sample")(tokens).solver_stats.iterations
        per_call = model(tokens, solver_overrides={"stop_rule": "per_sample"}).solver_stats.iterations
    assert torch.equal(per_call, expected) and model.config.inference_loop == "torchdeq_reference"

    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    for flag in ("--stop-rule", "--inference-loop"):
        args = parser.parse_args(["--model", "m", flag, "standalone_reference"])
        assert solver_overrides(args) == {"inference_loop": "standalone_reference"}
