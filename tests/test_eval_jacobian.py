"""`implicit-lm eval jacobian`: eq. (10) of Theorem 1 against autograd through the fixed-point iteration."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import run_module, tiny_mamba2
from implicit_lm.eval import jacobian

TOKENS = "3,17,5,21"  # three context tokens, then the measured one
TINY = dict(num_hidden_layers=1, hidden_size=16, head_dim=4, state_size=2, n_groups=1, vocab_size=32)  # 8 heads


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    """A tiny one-layer implicit Mamba2 (float64) and its Hub-layout folder."""
    model = tiny_mamba2(seed=0, **TINY).double()
    folder = tmp_path_factory.mktemp("jacobian-model")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def run(one_layer, tmp_path_factory):
    """One CLI run on the tiny model: its returned payload and output folder."""
    output_dir = tmp_path_factory.mktemp("jacobian-out")
    payload = jacobian.main(["--model", str(one_layer[1]), "--tokens", TOKENS, "--output-dir", str(output_dir)])
    return payload, output_dir


def test_theorem_agrees_with_autograd(run):
    payload, _ = run
    assert payload["tolerance"] == 1e-10  # the float64 default
    assert payload["fixed_point"]["residual"] < payload["tolerance"]
    assert payload["fixed_point"]["spectral_radius_dF_dz"] < 1
    for part in ("full", "per_head"):
        assert payload["agreement"][part]["relative_difference_max"] < 1e-3, payload["agreement"]
    # The general implicit-function form and eq. (10) term by term (Λ + diag(h) dΛ/dz dφ/dh + du/dz dφ/dh).
    assert payload["lambda_u_form_vs_general_abs_difference_max"] < 1e-12


def test_only_the_implicit_transition_is_non_diagonal(run):
    mass = run[0]["off_diagonal_mass"]
    assert mass["implicit"]["full"] > 1e-5 and mass["implicit"]["per_head"] > 1e-6, mass
    assert mass["explicit"]["full"] < 1e-12 and mass["explicit"]["per_head"] < 1e-12, mass


def test_explicit_transition_is_exp_dt_A(run, one_layer):
    """The explicit diagonal is exp(dt A) of each head, broadcast over its head_dim x state_size variables, with dt
    recomputed here from the weights (explicit: the block sees the token's embedding, no injection)."""
    payload, _ = run
    model = one_layer[0]
    block = model.backbone.layers[0]
    mixer = block.mixer
    with torch.no_grad():
        embedding = model.backbone.embeddings(torch.tensor([payload["tokens"][-1]]))
        dt = F.softplus(mixer.in_proj(block.norm(embedding))[0, -mixer.num_heads :] + mixer.dt_bias)
        decay = torch.exp(-dt * torch.exp(mixer.A_log))
    torch.testing.assert_close(torch.tensor(payload["explicit_decay_per_head"], dtype=torch.float64), decay)
    assert payload["explicit_decay_spread_within_heads"] == 0


def test_outputs(run):
    payload, output_dir = run
    written = json.loads((output_dir / "jacobian.json").read_text())
    assert written == payload
    for key in ("metadata", "tokens", "state", "fixed_point", "context_iterations", "agreement", "off_diagonal_mass",
                "explicit_decay_per_head", "per_head_jacobians"):
        assert key in written
    assert written["state"] == {
        "num_heads": 8,
        "head_dim": 4,
        "state_size": 2,
        "size": 64,
        "per_head_selection": written["state"]["per_head_selection"],
        "per_head_indices": list(range(0, 64, 8)),
    }
    assert len(written["context_iterations"]) == 3
    assert torch.tensor(written["per_head_jacobians"]["autograd"]).shape == (8, 8)
    assert written["metadata"]["model"]["model_type"] == "implicit_mamba2"
    assert (output_dir / "jacobian.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figure7_model():
    model = jacobian.figure7_model(seed=0)
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.head_dim, config.state_size) == (1, 64, 8, 4)
    assert config.num_heads == 16 and model.dtype == torch.float64
    jacobian.check_model(model)


@pytest.fixture(scope="module")
def explicit_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jacobian-explicit")
    tiny_mamba2(seed=0, implicit=False, **TINY).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--tokens", TOKENS], "exactly one of --model PATH and --random-init"),
        (["{one_layer}", "--random-init"], "exactly one of --model PATH and --random-init"),
        (["{llama}", "--tokens", TOKENS], "needs an implicit Mamba2"),
        (["{mamba2}", "--tokens", TOKENS], "has 2 layers; eq. (10) is stated for one implicit SSM layer"),
        (["{explicit}", "--tokens", TOKENS], "the model is explicit (implicit=False)"),
        (["{one_layer}", "--tokens", "3,32"], "token ids in [3, 32], outside the model's vocabulary [0, 32)"),
        (["{one_layer}", "--tokens=-1,3"], "outside the model's vocabulary"),
        (["{one_layer}", "--tokens", "5"], "need at least 2 tokens"),
        (["{one_layer}", "--length", "1"], "need at least 2 tokens"),
        (["{one_layer}", "--tokens", "3,x"], "expected comma-separated integer token ids"),
        (["{one_layer}", "--dtype", "float16"], "need float64 (recommended) or float32"),
        (["{one_layer}", "--damping", "0"], "--damping 0.0: must be in (0, 1]"),
        (["{one_layer}", "--tolerance", "0"], "--tolerance 0.0: must be > 0"),
        (["{one_layer}", "--max-iterations", "0"], "--max-iterations must be positive"),
        pytest.param(
            ["{one_layer}", "--tokens", TOKENS, "--max-iterations", "3"],
            "did not converge in 3 iterations",
            marks=pytest.mark.filterwarnings("ignore:Fixed-point solver did not converge"),  # the context's solves
        ),
    ],
)
def test_bad_input_exits_2(arguments, message, one_layer, saved_models, explicit_folder, tmp_path, capsys):
    folders = {"one_layer": one_layer[1], "explicit": explicit_folder, **saved_models}
    argv = ["--output-dir", str(tmp_path)]
    for argument in arguments:
        if argument.startswith("{"):
            argv += ["--model", str(folders[argument[1:-1]])]
        else:
            argv.append(argument)
    with pytest.raises(SystemExit) as exit_info:
        jacobian.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "jacobian.json").exists()


def test_help(capsys):
    assert run_module("implicit_lm.eval.jacobian", "--help") == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--random-init", "--tokens", "--length", "--tolerance", "--output-dir"):
        assert flag in out
