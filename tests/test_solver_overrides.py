"""Solver settings per call: `model(..., solver_overrides={...})` and `generate(..., solver_overrides=...)` change how
one call finds the fixed point and leave `model.config` as it is; `early_stop=False` states a fixed iteration count."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_modeling_common import ids

import modeling_implicit as mi


def test_overrides_equal_the_configured_settings_and_leave_the_config_alone(make_model):
    model = make_model()
    before = model.config.to_dict()
    overrides = {"inference_mode": "sequential", "eval_max_iterations": 300, "tolerance": 1e-5}
    tokens = ids()
    with torch.no_grad():
        overridden = model(tokens, solver_overrides=overrides)
        configured = make_model(**overrides)(tokens)
    assert model.config.to_dict() == before
    torch.testing.assert_close(overridden.logits, configured.logits, atol=0, rtol=0)
    assert overridden.solver_stats.iterations.shape == tokens.shape  # sequential: one solve per token


def test_generate_passes_overrides_to_every_step(make_model):
    model = make_model()
    tokens = ids(length=4)
    fixed = {"early_stop": False, "eval_max_iterations": 3, "prefill_mode": "sequential"}
    with torch.no_grad():
        out = model.generate(tokens, max_new_tokens=3, do_sample=False, solver_overrides=fixed,
                             return_dict_in_generate=True, output_logits=True)
        expected = model.generate(tokens, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                                  output_logits=True)
    assert out.sequences.shape == expected.sequences.shape
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(out.logits, expected.logits))  # 3 iterations, not converged


def test_a_fixed_iteration_count_is_stated_and_runs_exactly(make_model):
    model = make_model(tolerance=10.0)  # a tolerance every first iterate meets: early stopping would stop at once
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", mi.ConvergenceWarning)  # a fixed count is no convergence failure
        stats = model(ids(), solver_overrides={"early_stop": False, "eval_max_iterations": 7}).solver_stats
        early = model(ids()).solver_stats
    assert stats.iterations.tolist() == [7, 7] and not stats.converged.any()
    assert (early.iterations <= 2).all()  # from z = 0 the second iterate already meets it


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"hidden_size": 8}, r"\['hidden_size'\] cannot be set per call"),
        ({"tolerance": -1.0}, "tolerance=-1.0"),
        ({"inference_mode": "parallel"}, "inference_mode='parallel'"),
        ({"early_stop": "no"}, "early_stop='no'"),
    ],
)
def test_bad_overrides_are_named(make_model, overrides, match):
    model = make_model()
    with pytest.raises(ValueError, match=match):
        model(ids(), solver_overrides=overrides)
    assert model.config.tolerance != -1.0
