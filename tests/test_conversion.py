"""Conversion of reference checkpoints, imports of explicit pretrained weights, presets and dry-run publishing."""

import json
import pickle

import pytest
import torch
from implicit_lm.conversion import convert_reference, import_pretrained, publish
from implicit_lm.conversion.export import verification_logits
from implicit_lm.conversion.presets import PRESETS, preset_reference_config
from implicit_lm.conversion.reference import (
    ConversionError,
    WeightNormSettings,
    config_from_reference,
    fold_weight_norm,
    model_class,
    write_reference_checkpoint,
)
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

VARIANTS = [f"{family}-{variant}" for family in ("mamba2", "llama") for variant in ("explicit", "implicit", "pretrain")]
# Conversions verify in this interpreter (conftest's verify_in_process), except one round trip per family.
pytestmark = pytest.mark.usefixtures("verify_in_process")
ROUND_TRIPS = [pytest.param(variant, marks=pytest.mark.fresh_interpreter) if variant.endswith("implicit") else variant
               for variant in VARIANTS]


def tiny_reference(family_variant: str) -> dict:
    """A preset's reference config shrunk to a CPU-test size (vocabulary padding, solver and norm settings kept)."""
    family, variant = family_variant.split("-")
    reference = preset_reference_config(f"{family}-130m-{variant}")
    backbone = reference["backbone_config"]
    backbone.update(d_model=32, n_layer=2)
    reference.update(d_embed=32, n_tokens=61, vocab_size=61)
    if family == "mamba2":
        backbone["block_cfg"] = {"d_state": 8, "expand": 2, "headdim": 8, "ngroups": 2, "chunk_size": 4}
    else:
        backbone.update(block_cfg={"n_head": 4}, d_inner=96)
    return reference


def run_convert(*argv: str) -> float:
    return convert_reference.convert(convert_reference.build_parser().parse_args(list(argv)))


@pytest.mark.parametrize("family_variant", ROUND_TRIPS)
def test_round_trip_reproduces_the_source_logits(tmp_path, family_variant):
    reference = tiny_reference(family_variant)
    file_format = "safetensors" if family_variant.endswith("implicit") else "torch"
    source = write_reference_checkpoint(reference, tmp_path / "src", seed=1, file_format=file_format, shards=2)
    difference = run_convert("--src", str(tmp_path / "src"), "--dst", str(tmp_path / "dst"), "--max-shard-size", "20KB")
    assert difference <= 1e-4

    files = {p.name for p in (tmp_path / "dst").iterdir()}
    assert {"config.json", "generation_config.json", "README.md", "model.safetensors.index.json"} <= files
    assert {"modeling_implicit_utils.py", "solver.py"} <= files
    config = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert config["model_type"] == f"implicit_{family_variant.split('-')[0]}"
    assert config["implicit"] == (not family_variant.endswith("explicit"))
    assert "AutoModelForCausalLM" in config["auto_map"]
    if reference["pad_vocab"]:
        assert config["vocab_size"] == 64  # padded like the reference embedding
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "dst").eval()
    torch.testing.assert_close(verification_logits(converted), verification_logits(source), atol=1e-5, rtol=1e-5)


def test_weight_norm_folding_matches_torchdeq_semantics():
    v = torch.randn(5, 1, 3, dtype=torch.float64)
    g = torch.rand(5, 1, 1, dtype=torch.float64) + 0.1
    folded = fold_weight_norm(v, g, WeightNormSettings())
    assert torch.allclose(folded.flatten(1).norm(dim=1), g.flatten())
    no_scale = fold_weight_norm(v, None, WeightNormSettings(learn_scale=False, target_norm=2.0))
    assert torch.allclose(no_scale.flatten(1).norm(dim=1), torch.full((5,), 2.0, dtype=torch.float64))
    clipped = fold_weight_norm(v, g * 100, WeightNormSettings(clip=True, clip_value=0.5))
    assert torch.allclose(clipped, v * 0.5)


def test_unknown_missing_and_misshaped_keys_are_all_listed(tmp_path):
    reference = tiny_reference("mamba2-implicit")
    write_reference_checkpoint(reference, tmp_path / "src")
    weights = load_file(tmp_path / "src" / "model.safetensors")
    weights["backbone.layers.0.mixer.surprise"] = torch.zeros(3)
    del weights["backbone.layers.1.mixer.A_log"]
    weights["backbone.layers.0.mixer.D"] = torch.zeros(7)
    save_file(weights, tmp_path / "src" / "model.safetensors")
    with pytest.raises(ConversionError) as error:
        run_convert("--src", str(tmp_path / "src"), "--dst", str(tmp_path / "dst"))
    message = str(error.value)
    assert "unknown source keys: backbone.layers.0.mixer.surprise (3,)" in message
    assert "missing from the source: backbone.layers.1.mixer.A_log (8,)" in message
    assert (
        "shape mismatch for backbone.layers.0.mixer.D -> backbone.layers.0.mixer.D: source (7,), expected (8,)"
        in message
    )
    assert not (tmp_path / "dst").exists()


def test_unsupported_reference_fields_are_refused():
    reference = tiny_reference("mamba2-implicit")
    reference["backbone_config"]["block_cfg"].update(D_has_hdim=True, mystery=1)
    reference["deq_params"]["training"]["ift"] = True
    with pytest.raises(ConversionError) as error:
        config_from_reference(reference)
    assert "D_has_hdim=True" in str(error.value) and "mystery" in str(error.value) and "ift" in str(error.value)


def test_pickles_with_code_are_never_unpickled(tmp_path):
    reference = tiny_reference("llama-explicit")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps(reference))

    class Payload:
        def __reduce__(self):
            return (print, ("executed",))

    with open(tmp_path / "src" / "pytorch_model.bin", "wb") as file:
        pickle.dump({"word_emb.emb.weight": Payload()}, file)
    with pytest.raises(ConversionError, match="weights_only=True"):
        run_convert("--src", str(tmp_path / "src"), "--dst", str(tmp_path / "dst"))


def test_failed_or_interrupted_conversion_leaves_no_half_written_output(tmp_path, monkeypatch):
    reference = tiny_reference("llama-pretrain")
    write_reference_checkpoint(reference, tmp_path / "src")
    dst = tmp_path / "dst"
    run_convert("--src", str(tmp_path / "src"), "--dst", str(dst))
    before = {p.name: p.stat().st_mtime_ns for p in dst.iterdir()}

    with pytest.raises(FileExistsError, match="--overwrite"):
        run_convert("--src", str(tmp_path / "src"), "--dst", str(dst))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("implicit_lm.conversion.export._reload_logits", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_convert("--src", str(tmp_path / "src"), "--dst", str(dst), "--overwrite")
    assert {p.name: p.stat().st_mtime_ns for p in dst.iterdir()} == before  # the old output is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]  # no staging folder left behind

    monkeypatch.setattr("implicit_lm.conversion.export._reload_logits", lambda *a, **k: torch.full((1, 8, 61), 1e3))
    with pytest.raises(RuntimeError, match="differs from the source"):
        run_convert("--src", str(tmp_path / "src"), "--dst", str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()


def test_random_init_preset_and_dry_run_publish(tmp_path, capsys):
    reference = tiny_reference("mamba2-pretrain")
    write_reference_checkpoint(reference, tmp_path / "src")
    run_convert("--src", str(tmp_path / "src"), "--dst", str(tmp_path / "repo"), "--repo-id", "org/tiny")
    publish.main(["--folder", str(tmp_path / "repo"), "--repo-id", "org/tiny", "--dry-run", "--revision", "v1"])
    out = capsys.readouterr().out
    assert "Dry run, would send:" in out and "create_repo(repo_id='org/tiny'" in out
    assert "create_branch(repo_id='org/tiny', branch='v1'" in out and "model.safetensors" in out

    (tmp_path / "repo" / "README.md").write_text("no metadata here")
    (tmp_path / "repo" / "solver.py").unlink()
    with pytest.raises(publish.PublishError) as error:
        publish.validate_folder(tmp_path / "repo")
    assert "README.md" in str(error.value) and "solver.py is missing" in str(error.value)


def test_publish_validation_catches_index_inconsistency(tmp_path):
    reference = tiny_reference("llama-implicit")
    write_reference_checkpoint(reference, tmp_path / "src")
    run_convert("--src", str(tmp_path / "src"), "--dst", str(tmp_path / "repo"), "--max-shard-size", "20KB")
    index = json.loads((tmp_path / "repo" / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / "repo" / first).unlink()
    with pytest.raises(publish.PublishError, match=f"index lists {first}, which is missing"):
        publish.validate_folder(tmp_path / "repo")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_counts_match_the_paper(name):
    config = config_from_reference(PRESETS[name])
    with torch.device("meta"):
        model = model_class(config)(config)
    parameters = sum(p.numel() for p in model.parameters())
    nominal = {"130m": 130e6, "370m": 370e6, "760m": 760e6, "1.3b": 1.3e9}[name.split("-")[1]]
    assert abs(parameters / nominal - 1) < 0.06, parameters
    assert config.implicit == (not name.endswith("explicit"))
    if name.endswith("pretrain"):
        assert (config.max_iterations, config.phantom_steps) == (4, 1)


def test_random_init_from_a_preset_writes_a_complete_repo(tmp_path):
    run_convert(
        "--preset", "llama-130m-pretrain", "--random-init", "--dst", str(tmp_path / "repo"), "--dtype", "bfloat16"
    )
    config = json.loads((tmp_path / "repo" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["num_attention_heads"] == 12 and config["max_iterations"] == 4
    card = (tmp_path / "repo" / "README.md").read_text()
    assert "llama-130m-pretrain" in card or "(4+1)" in card
    publish.validate_folder(tmp_path / "repo")


@pytest.mark.parametrize("family", ["mamba2", "llama"])
def test_import_transformers_checkpoints_as_explicit_and_implicit(tmp_path, family):
    from transformers import LlamaConfig, LlamaForCausalLM, Mamba2Config, Mamba2ForCausalLM  # noqa: I001

    torch.manual_seed(0)
    if family == "mamba2":
        source = Mamba2ForCausalLM(Mamba2Config(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8, head_dim=8, num_heads=8, n_groups=2,
            chunk_size=4, tie_word_embeddings=True,
        ))
    else:
        source = LlamaForCausalLM(LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True,
        ))
    source.eval().save_pretrained(tmp_path / "src")
    common = ["--src", str(tmp_path / "src"), "--max-shard-size", "2GB"]
    import_pretrained.main([*common, "--dst", str(tmp_path / "explicit")])
    explicit = AutoModelForCausalLM.from_pretrained(tmp_path / "explicit").eval()
    tokens = torch.tensor([[5, 9, 13, 2, 40, 7]])
    with torch.no_grad():
        torch.testing.assert_close(explicit(tokens).logits, source(tokens).logits, atol=1e-5, rtol=1e-5)

    import_pretrained.main([*common, "--dst", str(tmp_path / "implicit"), "--implicit"])
    implicit = AutoModelForCausalLM.from_pretrained(tmp_path / "implicit").eval()
    assert implicit.config.implicit
    backbone = implicit.base_model
    first = backbone.layers[0]
    if family == "mamba2":
        expected_weight, expected_norm = first.mixer.in_proj.weight, first.norm.weight
    else:
        attention = first.self_attn
        expected_weight = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
        expected_norm = first.input_layernorm.weight
    assert torch.equal(backbone.injection.weight, expected_weight)
    assert torch.equal(backbone.injection.norm.weight, expected_norm) and not backbone.injection.bias.any()


def test_import_state_spaces_mamba2_layout(tmp_path):
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(0)
    source = Mamba2ForCausalLM(Mamba2Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8, head_dim=8, num_heads=8, n_groups=2,
        chunk_size=4, tie_word_embeddings=True,
    )).eval()
    (tmp_path / "src").mkdir()
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in source.state_dict().items()}
    torch.save(state, tmp_path / "src" / "pytorch_model.bin")
    (tmp_path / "src" / "config.json").write_text(json.dumps({
        "d_model": 32, "d_intermediate": 0, "n_layer": 2, "vocab_size": 60, "pad_vocab_size_multiple": 16,
        "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 8, "ngroups": 2, "chunk_size": 4},
        "rms_norm": True, "residual_in_fp32": True, "tie_embeddings": True,
    }))
    import_pretrained.main(["--src", str(tmp_path / "src"), "--dst", str(tmp_path / "dst")])
    imported = AutoModelForCausalLM.from_pretrained(tmp_path / "dst").eval()
    assert imported.config.vocab_size == 64  # padded to the multiple of 16, as mamba_ssm does
    tokens = torch.tensor([[5, 9, 13, 2, 40, 7]])
    with torch.no_grad():
        torch.testing.assert_close(imported(tokens).logits, source(tokens).logits, atol=1e-5, rtol=1e-5)

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(SystemExit):
        import_pretrained.main(["--src", str(tmp_path / "bad"), "--dst", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()
