import math

import pytest
from conftest import tiny_mamba2_config

import modeling_implicit as mi


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("tolerance", 0.0, "tolerance"),
        ("tolerance", -1e-3, "tolerance"),
        ("tolerance", math.nan, "tolerance"),
        ("max_iterations", 0, "max_iterations"),
        ("eval_max_iterations", -3, "eval_max_iterations"),
        ("damping", 0.0, "damping"),
        ("damping", 1.5, "damping"),
        ("phantom_damping", 0.0, "phantom_damping"),
        ("phantom_steps", 0, "phantom_steps"),
        ("solver", "broyden", "solver"),
        ("stop_mode", "relative", "stop_mode"),
        ("backward", "ift", "backward"),
        ("inference_mode", "parallel", "inference_mode"),
        ("prefill_mode", "chunked", "prefill_mode"),
        ("head_dim", 12, "head_dim"),
        ("n_groups", 3, "n_groups"),
        ("hidden_size", 0, "hidden_size"),
        ("time_step_limit", (0.5, 0.1), "time_step_limit"),
        ("anderson_memory", 0, "anderson_memory"),
    ],
)
def test_invalid_values_raise_naming_the_field(field, value, fragment):
    with pytest.raises(ValueError, match=fragment):
        tiny_mamba2_config(**{field: value})


def test_error_states_the_allowed_range():
    with pytest.raises(ValueError, match=r"damping=1\.5: must be in \(0, 1\]"):
        tiny_mamba2_config(damping=1.5)


def test_settings_changed_after_construction_are_checked_on_forward():
    import torch
    from conftest import tiny_mamba2

    model = tiny_mamba2()
    model.config.solver = "newton"
    with pytest.raises(ValueError, match="solver"):
        model(torch.tensor([[3, 4]]))


def test_derived_sizes_and_round_trip(tmp_path):
    config = tiny_mamba2_config()
    assert config.num_heads == 8
    assert config.conv_dim == 64 + 2 * 2 * 8
    assert config.in_proj_size == 64 + config.conv_dim + 8
    config.save_pretrained(tmp_path)
    loaded = mi.ImplicitMamba2Config.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.model_type == "implicit_mamba2"
