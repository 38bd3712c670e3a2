import json
import math
import re
import warnings

import pytest
from conftest import tiny_llama_config, tiny_mamba2_config
from transformers import AutoConfig, AutoModelForCausalLM

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


# Wrong types, booleans in numeric fields and None in required ones are named with their value, never a TypeError.
WRONG_TYPES = [
    ("damping", "0.5"),
    ("damping", None),
    ("phantom_damping", True),
    ("layer_norm_epsilon", "x"),
    ("initializer_range", None),
    ("tolerance", True),
    ("tolerance", "0.1"),
    ("max_iterations", True),
    ("max_iterations", 2.0),
    ("eval_max_iterations", None),
    ("convergence_check_interval", "1"),
    ("vocab_size", 64.0),
    ("residual_in_fp32", 1),
    ("pad_token_id", "0"),
    ("eos_token_id", [2, "3"]),
]
MAMBA2_WRONG_TYPES = [
    ("time_step_min", None),
    ("time_step_max", "0.1"),
    ("time_step_floor", "a"),
    ("time_step_limit", ("a", 1)),
    ("time_step_limit", None),
    ("A_init_range", None),
    ("latent_noise_db", True),
    ("state_size", True),
    ("use_bias", "no"),
]
LLAMA_WRONG_TYPES = [
    ("attention_dropout", None),
    ("attention_dropout", "0"),
    ("intermediate_size", True),
    ("num_key_value_heads", 2.0),
    ("max_position_embeddings", "64"),
    ("rope_parameters", "default"),
    ("hidden_act", None),
    ("mlp_bias", "no"),
]


@pytest.mark.parametrize(
    "make_config, field, value",
    [(tiny_mamba2_config, *case) for case in WRONG_TYPES + MAMBA2_WRONG_TYPES]
    + [(tiny_llama_config, *case) for case in WRONG_TYPES + LLAMA_WRONG_TYPES],
)
def test_wrong_types_raise_naming_field_and_value(make_config, field, value):
    with pytest.raises(ValueError, match=re.escape(f"Invalid config value {field}={value!r}: must be")):
        make_config(**{field: value})


def test_an_alias_names_the_field_it_sets():
    with pytest.raises(ValueError, match=re.escape("layer_norm_epsilon='x'")):
        tiny_llama_config(rms_norm_eps="x")


def test_solver_overrides_refuse_booleans_in_numeric_fields():
    with pytest.raises(ValueError, match=re.escape("tolerance=True")):
        tiny_mamba2_config().with_overrides({"tolerance": True})


@pytest.mark.parametrize("key, meant", [("toleranse", "tolerance"), ("max_iteration", "max_iterations"),
                                        ("dampng", "damping")])
def test_a_misspelt_field_warns_naming_the_field_meant(key, meant):
    with pytest.warns(mi.UnknownConfigKeyWarning, match=rf"{key}=0\.5 is not a field.*did you mean '{meant}'"):
        config = tiny_mamba2_config(**{key: 0.5})
    assert getattr(config, meant) != 0.5  # the field meant keeps its value: hence the warning


HUB_EXTRAS = {
    "architectures": ["ImplicitMamba2ForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_implicit_mamba2.ImplicitMamba2Config"},
    "torch_dtype": "float32",
    "transformers_version": "5.10.1",
    "_name_or_path": "someone/implicit-model",
    "_commit_hash": "0" * 40,
    "model_type": "implicit_mamba2",
    "rope_theta": 10000.0,
    "max_length": 20,
    "early_stopping": True,
    "time_step_rank": 16,
    "my_own_note": "kept",
}


@pytest.mark.parametrize("make_config", [tiny_mamba2_config, tiny_llama_config])
def test_extra_keys_of_transformers_and_the_hub_are_accepted_silently(make_config):
    extras = {**HUB_EXTRAS, "model_type": make_config().model_type}
    with warnings.catch_warnings():
        warnings.simplefilter("error", mi.UnknownConfigKeyWarning)
        config = make_config(**extras)
        type(config).from_dict({**config.to_dict(), **extras})
    assert config.my_own_note == "kept"


@pytest.fixture
def saved_model(tmp_path, make_model):
    """A saved tiny model of the family under test and its (local) class."""
    model = make_model()
    model.save_pretrained(tmp_path)
    return tmp_path, type(model)


LOADERS = {
    "AutoModelForCausalLM": lambda folder, cls, **kw: AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=True, **kw
    ).config,
    "AutoConfig": lambda folder, cls, **kw: AutoConfig.from_pretrained(folder, trust_remote_code=True, **kw),
    "local model class": lambda folder, cls, **kw: cls.from_pretrained(folder, **kw).config,
    "local config class": lambda folder, cls, **kw: cls.config_class.from_pretrained(folder, **kw),
}


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_from_pretrained_validates_its_keyword_overrides(saved_model, loader):
    load = LOADERS[loader]
    with pytest.raises(ValueError, match=re.escape("tolerance=-1")):
        load(*saved_model, tolerance=-1)
    with pytest.raises(ValueError, match=re.escape("damping='0.5'")):
        load(*saved_model, damping="0.5")
    config = load(*saved_model, tolerance=1e-3, eval_max_iterations=7)
    assert (config.tolerance, config.eval_max_iterations) == (1e-3, 7)


def test_a_misspelt_key_in_config_json_or_from_pretrained_warns(tmp_path):
    config = tiny_mamba2_config()
    config.save_pretrained(tmp_path)
    with pytest.warns(mi.UnknownConfigKeyWarning, match="toleranse=0.1 is not a field.*did you mean 'tolerance'"):
        AutoConfig.from_pretrained(tmp_path, trust_remote_code=True, toleranse=0.1)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "toleranse": 0.1}))
    with pytest.warns(mi.UnknownConfigKeyWarning, match="toleranse=0.1 is not a field.*did you mean 'tolerance'"):
        loaded = mi.ImplicitMamba2Config.from_pretrained(tmp_path)
    assert loaded.tolerance == config.tolerance
