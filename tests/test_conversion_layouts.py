"""Conversion of the three public reference layouts: the torchdeq-era repo, its noise fork and the standalone
rewrite. The checkpoints are built here from the layouts' documented key names and weight-norm parametrizations (torch's
own `weight_norm` for the standalone one), independently of the converter's own checkpoint writer."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from implicit_lm.conversion.export import verification_logits
from implicit_lm.conversion.reference import (
    ConversionError,
    config_from_reference,
    detect_layout,
    model_class,
    write_reference_checkpoint,
)
from safetensors.torch import load_file, save_file
from test_conversion import run_convert, tiny_reference
from torch import nn
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.usefixtures("verify_in_process")  # conftest: verification without a fresh interpreter

# Our parameter names -> the standalone code's (implicit_llm: `word_emb`, `backbone.*`; tied head not saved).
STANDALONE_NAMES = {
    "mamba2": [
        (r"backbone\.embeddings\.weight", "word_emb.weight"),
        (r"backbone\.injection\.norm\.weight", "backbone.injection_norm.weight"),
        (r"backbone\.(.+)", "backbone.{0}"),
    ],
    "llama": [
        (r"model\.embed_tokens\.weight", "word_emb.weight"),
        (r"model\.norm\.weight", "backbone.norm_f.weight"),
        (r"model\.injection\.norm\.weight", "backbone.injection_norm.weight"),
        (r"model\.injection\.(weight|bias)", "backbone.injection.{0}"),
        (r"model\.layers\.(\d+)\.input_layernorm\.weight", "backbone.layers.{0}.norm.weight"),
        (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "backbone.layers.{0}.norm2.weight"),
        (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", "backbone.layers.{0}.mixer.wq.weight"),
        (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", "backbone.layers.{0}.mixer.wk.weight"),
        (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", "backbone.layers.{0}.mixer.wv.weight"),
        (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", "backbone.layers.{0}.mixer.out_proj.weight"),
        (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", "backbone.layers.{0}.mlp.w1.weight"),
        (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", "backbone.layers.{0}.mlp.w3.weight"),
        (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "backbone.layers.{0}.mlp.fc2.weight"),
    ],
}
# The nn.Linear weights of an implicit standalone backbone, which torch's weight_norm parametrizes (conv1d is not).
STANDALONE_LINEARS = re.compile(r"backbone\.(injection|layers\.\d+\.(mixer\.(in_proj|out_proj|wq|wk|wv)|mlp\.(w1|w3|fc2)))"
                                r"\.weight$")


def standalone_reference(family_variant: str, beta: float | None = 0.7, tau: float = 0.9, **solver) -> dict:
    """A tiny config in the standalone schema: `deq_params` = solver / training (grad, tau, beta) / regularization."""
    reference = tiny_reference(family_variant)
    if reference["backbone_type"] == "explicit":
        reference["deq_params"] = {}
    else:
        training = {"grad": 2, "tau": tau, **({} if beta is None else {"beta": beta})}
        reference["deq_params"] = {
            "solver": {"f_max_iter": 6, "f_tol": 0.05, **solver},
            "training": training,
            "regularization": {"jac_loss_weight": 0.0, "jac_loss_freq": 0.0},
        }
    reference["backbone_config"].update(do_weight_norm=True, mlp_type="llama_mlp" if "llama" in family_variant else None)
    if reference["backbone_config"]["mlp_type"] is None:
        del reference["backbone_config"]["mlp_type"]
    return reference


def standalone_name(family: str, name: str) -> str | None:
    for pattern, template in STANDALONE_NAMES[family]:
        match = re.fullmatch(pattern, name)
        if match:
            return template.format(*match.groups())
    return None


def write_standalone_checkpoint(reference: dict, folder, seed: int = 0) -> torch.nn.Module:
    """Our model with random weights, saved as the standalone code saves it: torch weight-norm parametrizations on
    the backbone's Linears (with directions rescaled per row, so that folding is a computation), plain conv1d, the
    tied head left out."""
    folder.mkdir(parents=True)
    config = config_from_reference(reference, "standalone")
    torch.manual_seed(seed)
    model = model_class(config)(config).eval()
    family = "llama" if "llama" in config.model_type else "mamba2"
    implicit = config.implicit
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        key = standalone_name(family, name)
        assert key is not None, name
        if implicit and STANDALONE_LINEARS.match(key):
            linear = nn.Linear(tensor.shape[1], tensor.shape[0], bias=False)
            linear.weight.data.copy_(tensor)
            parametrized = nn.utils.parametrizations.weight_norm(linear)
            parts = dict(parametrized.state_dict())
            scale = torch.rand(tensor.shape[0], 1, generator=generator) + 0.5
            stem = key[: -len(".weight")]
            state[f"{stem}.parametrizations.weight.original0"] = parts["parametrizations.weight.original0"]
            state[f"{stem}.parametrizations.weight.original1"] = parts["parametrizations.weight.original1"] * scale
        else:
            state[key] = tensor.clone()
    (folder / "config.json").write_text(json.dumps(reference, indent=2))
    save_file(state, folder / "model.safetensors")
    return model


@pytest.mark.parametrize("family_variant", ["mamba2-implicit", "llama-implicit", "mamba2-explicit", "llama-explicit"])
def test_standalone_checkpoints_convert_and_match(tmp_path, family_variant):
    reference = standalone_reference(family_variant)
    source = write_standalone_checkpoint(reference, tmp_path / "src", seed=3)
    keys = load_file(tmp_path / "src" / "model.safetensors").keys()
    assert "criterion.decoder.weight" not in keys and "word_emb.weight" in keys
    if family_variant.endswith("implicit"):
        assert any(key.endswith("parametrizations.weight.original0") for key in keys)
        assert not any(key.endswith("conv1d.parametrizations.weight.original0") for key in keys)
    assert detect_layout(reference, keys) == "standalone"
    difference = run_convert("--src", str(tmp_path / "src"), "--dst", str(tmp_path / "dst"))
    assert difference <= 1e-4
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "dst").eval()
    torch.testing.assert_close(verification_logits(converted), verification_logits(source), atol=1e-5, rtol=1e-5)
    config = converted.config
    assert config.converted_from["layout"] == "standalone"
    assert "markschoene/implicit-languagemodels-standalone" in (tmp_path / "dst" / "README.md").read_text()
    if family_variant.endswith("implicit"):
        assert config.converted_from["deq_params"] == reference["deq_params"]
        assert 'inference_loop="standalone_reference"' in (tmp_path / "dst" / "README.md").read_text()
        # beta damps the solver, tau only the phantom steps; eval_factor defaults to 1 in this codebase.
        assert (config.damping, config.phantom_damping, config.phantom_steps) == (0.7, 0.9, 2)
        assert (config.max_iterations, config.eval_max_iterations, config.tolerance) == (6, 6, 0.05)


def test_standalone_solver_fallbacks_and_caps():
    no_beta = config_from_reference(standalone_reference("mamba2-implicit", beta=None, tau=0.6), "standalone")
    assert no_beta.damping == no_beta.phantom_damping == 0.6  # beta falls back to tau
    factor = config_from_reference(standalone_reference("mamba2-implicit", eval_factor=4.0), "standalone")
    assert factor.eval_max_iterations == 24
    explicit_cap = config_from_reference(
        standalone_reference("mamba2-implicit", eval_factor=4.0, eval_f_max_iter=50), "standalone"
    )
    assert explicit_cap.eval_max_iterations == 50
    reference = standalone_reference("mamba2-implicit")
    del reference["deq_params"]["solver"]["f_tol"]
    del reference["deq_params"]["training"]["grad"]
    with pytest.raises(ConversionError) as error:
        config_from_reference(reference, "standalone")
    assert "solver.f_tol is missing" in str(error.value) and "training.grad is missing" in str(error.value)
    # The standalone code builds a gated MLP when mlp_type is not given: not a Llama block.
    llama = standalone_reference("llama-implicit")
    del llama["backbone_config"]["mlp_type"]
    with pytest.raises(ConversionError, match="mlp_type=None"):
        config_from_reference(llama, "standalone")


def test_torchdeq_layout_keeps_its_own_solver_semantics(tmp_path):
    reference = tiny_reference("mamba2-implicit")
    reference["deq_params"]["training"]["tau"] = 0.6
    config = config_from_reference(reference)
    assert config.converted_from["layout"] == "torchdeq"
    assert config.damping == config.phantom_damping == 0.6  # tau damps inference and phantom steps alike
    assert config.eval_max_iterations == 4 * config.max_iterations  # eval_factor defaults to 4 there


def noise_fork_reference(**noise) -> dict:
    reference = tiny_reference("mamba2-implicit")
    reference["backbone_config"]["block_cfg"].update(noise)
    return reference


def test_noise_fork_with_noise_off_converts(tmp_path):
    reference = noise_fork_reference(noise_mode="additive", state_noise_db=0.0, latent_noise_db=0.0)
    source = write_reference_checkpoint(reference, tmp_path / "src", seed=2)
    run_convert("--src", str(tmp_path / "src"), "--dst", str(tmp_path / "dst"))
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "dst").eval()
    torch.testing.assert_close(verification_logits(converted), verification_logits(source), atol=1e-5, rtol=1e-5)
    assert converted.config.converted_from["layout"] == "noise-fork"
    assert converted.config.converted_from["noise"] == {"noise_mode": "additive", "state_noise_db": 0.0,
                                                        "latent_noise_db": 0.0}


def test_active_noise_converts_with_its_settings_and_can_be_dropped(tmp_path):
    """The fork's released setting (40 dB additive) converts as it is: the converted model adds that noise on its
    sequential steps, repeatably with a seeded generator; --drop-noise converts the noise-free model."""
    reference = noise_fork_reference(noise_mode="additive", state_noise_db=40.0, latent_noise_db=40.0)
    write_reference_checkpoint(reference, tmp_path / "src", seed=2)
    run_convert("--src", str(tmp_path / "src"), "--dst", str(tmp_path / "noisy"))
    noisy = AutoModelForCausalLM.from_pretrained(tmp_path / "noisy", inference_mode="sequential").eval()
    assert (noisy.config.state_noise_db, noisy.config.latent_noise_db, noisy.config.noise_mode) == (40.0, 40.0,
                                                                                                    "additive")
    run_convert("--src", str(tmp_path / "src"), "--dst", str(tmp_path / "clean"), "--drop-noise")
    clean = AutoModelForCausalLM.from_pretrained(tmp_path / "clean", inference_mode="sequential").eval()
    assert not clean.config.noise_active and clean.config.converted_from["noise_dropped"] is True
    assert "were dropped at conversion" in (tmp_path / "clean" / "README.md").read_text()
    tokens = torch.randint(3, 61, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        runs = [noisy(tokens, noise_generator=torch.Generator().manual_seed(seed)).logits for seed in (5, 5, 6)]
        reference_logits = clean(tokens).logits
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    torch.testing.assert_close(runs[0][:, 0], reference_logits[:, 0])  # the first token takes no step: no noise
    assert 0 < (runs[0] - reference_logits).abs().max() < 0.5  # 40 dB: a small perturbation


def test_the_forks_defaults_fill_left_out_noise_fields():
    config = config_from_reference(noise_fork_reference(state_noise_db=30.0))
    assert (config.state_noise_db, config.latent_noise_db, config.noise_mode) == (30.0, 20.0, "multiplicative")
    with pytest.raises(ConversionError, match="noise_mode='gaussian'"):
        config_from_reference(noise_fork_reference(noise_mode="gaussian"))
    llama = tiny_reference("llama-implicit")
    llama["backbone_config"]["block_cfg"]["state_noise_db"] = 40.0
    with pytest.raises(ConversionError, match="Mamba2 blocks only"):
        config_from_reference(llama, "noise-fork")


def test_contradicting_layouts_get_one_clear_error(tmp_path):
    torchdeq = tiny_reference("mamba2-implicit")
    with pytest.raises(ConversionError, match="mix two layouts"):
        detect_layout(torchdeq, ["word_emb.weight", "backbone.injection.weight_g"])
    standalone = standalone_reference("mamba2-implicit")
    with pytest.raises(ConversionError, match="training.beta .* torchdeq-layout weights"):
        detect_layout(standalone, ["word_emb.emb.weight"])
    noisy = copy.deepcopy(standalone)
    noisy["backbone_config"]["block_cfg"]["state_noise_db"] = 40.0
    with pytest.raises(ConversionError, match="noise fields belong to the noise fork"):
        detect_layout(noisy, ["word_emb.weight"])
    with pytest.raises(ConversionError, match="unknown layout"):
        config_from_reference(torchdeq, "tensorflow")


def test_forcing_the_wrong_layout_lists_every_key_it_cannot_place(tmp_path):
    write_standalone_checkpoint(standalone_reference("mamba2-implicit"), tmp_path / "src")
    with pytest.raises(ConversionError) as error:
        run_convert("--src", str(tmp_path / "src"), "--dst", str(tmp_path / "dst"), "--layout", "torchdeq")
    message = str(error.value)
    assert "unknown source keys: backbone.injection.parametrizations.weight.original0" in message
    assert "word_emb.weight" in message and "missing from the source: backbone.embeddings.weight" in message
    assert not (tmp_path / "dst").exists()
