"""Model cards: rendering for both families, Hub metadata, the paper's numbers, and validation."""

import re
import warnings

import pytest
import torch
from implicit_lm.model_cards import PAPER_ARCHITECTURES, PAPER_RESULTS, render_model_card, validate_model_card
from implicit_lm.model_cards.paper_results import PRESETS

import modeling_implicit as mi


def mamba2_config(**overrides) -> mi.ImplicitMamba2Config:
    return mi.ImplicitMamba2Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8, head_dim=8, **overrides
    )


def llama_config(**overrides) -> mi.ImplicitLlamaConfig:
    return mi.ImplicitLlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, **overrides
    )


CONFIGS = {"mamba2": mamba2_config, "llama": llama_config}
MODELS = {"mamba2": mi.ImplicitMamba2ForCausalLM, "llama": mi.ImplicitLlamaForCausalLM}


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_card_renders_and_validates(family):
    card = render_model_card(CONFIGS[family](), repo_id="org/tiny-implicit")
    metadata = validate_model_card(card)

    assert metadata["license"] == "mit"
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "text-generation"
    assert {"implicit-lm", "deep-equilibrium", family} <= set(metadata["tags"])
    assert metadata["datasets"] == ["EleutherAI/the_pile_deduplicated"]
    assert "base_model" not in metadata
    assert 'AutoModelForCausalLM.from_pretrained("org/tiny-implicit", trust_remote_code=True)' in card
    assert 'AutoTokenizer.from_pretrained("EleutherAI/gpt-neox-20b")' in card
    for usage in ("solver_stats", '"eval_max_iterations":', '"tolerance":', '"solver": "anderson"',
                  "solver_overrides=overrides", '"inference_mode": "sequential"'):
        assert usage in card
    assert "model.config." not in card  # settings per call, never by changing the loaded model's config
    # The solver example runs as written on a model of this config.
    example = re.findall(r"```python\n(.*?)```", card, re.S)[-1]
    model = MODELS[family](CONFIGS[family]()).eval()
    namespace = {"torch": torch, "model": model, "inputs": {"input_ids": torch.randint(3, 64, (1, 5))}}  # block 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mi.ConvergenceWarning)
        exec(compile(example, "card example", "exec"), namespace)
    assert namespace["output_ids"].shape == (1, 25)
    assert namespace["outputs"].solver_stats.iterations.shape == (1, 5)  # sequential: one solve per token
    assert "| `hidden_size` | `32` |" in card
    assert "| `eval_max_iterations` | `96` |" in card
    assert "not re-measured" not in card  # no preset: no paper results
    assert "@inproceedings{schone2025implicit" in card
    assert "$" not in card  # every template placeholder was substituted


def test_metadata_arguments():
    card = render_model_card(
        llama_config(),
        repo_id="org/implicit-llama-1.3b",
        base_model="org/implicit-llama-1.3b-pretrain",
        license="apache-2.0",
        datasets=["my/data"],
        tokenizer="my/tokenizer",
    )
    metadata = validate_model_card(card)
    assert metadata["base_model"] == "org/implicit-llama-1.3b-pretrain"
    assert metadata["license"] == "apache-2.0"
    assert metadata["datasets"] == ["my/data"]
    assert 'AutoTokenizer.from_pretrained("my/tokenizer")' in card


def test_preset_card_has_paper_numbers():
    card = render_model_card(mamba2_config(), repo_id="org/implicit-mamba2-130m", preset="mamba2-130m-implicit")
    assert "as reported by the paper (not re-measured here)" in card
    assert "| D-Pile ppl↓ | 13.05 | 13.76 | 12.86 |" in card  # Table 1: Mamba2*, (4+1), (24+4) at 130M
    assert "| HellaSwag acc↑ | 0.3527 | 0.3628 | 0.3673 |" in card
    assert "| Inference Steps | 14 | 62 |" in card  # Table 6
    assert "| 16384 ppl↓ | 12.94 | 13.25 | 12.78 |" in card  # Table 7
    assert "**Mamba2(24+4)-ours** (this model)" in card
    assert "(24+4)" in card and "80%" in card  # the curriculum

    card = render_model_card(llama_config(), repo_id="org/implicit-llama-1.3b", preset="llama-1.3b-implicit")
    assert "| D-Pile ppl↓ | 7.99 | 7.66 | 7.24 |" in card
    assert "| Inference Steps | 13 | 69 |" in card
    assert "Table 7" not in card  # the paper has no Llama length extrapolation
    assert "(32+4)" in card and "32 attention heads of dimension 64" in card  # Table 3


def test_transcribed_numbers():
    assert PAPER_RESULTS["llama-370m-implicit"]["table_1"]["average_acc"] == 0.5003
    assert PAPER_RESULTS["llama-370m-implicit"]["table_6"] == {
        "source": "Table 6",
        "model": "Llama(32+4)",
        "size": "350M",
        "d_pile_ppl": 9.43,
        "inference_steps": 57,
        "relative_difference": 0.037,
    }
    assert PAPER_RESULTS["mamba2-760m-explicit"]["table_7"]["ppl_16384"] == 12.56
    assert "relative_wall_clock_time" not in PAPER_RESULTS["mamba2-370m-pretrain"]["table_1"]  # printed "-"
    assert "table_6" not in PAPER_RESULTS["mamba2-1.3b-explicit"]
    assert PAPER_ARCHITECTURES["mamba2-1.3b"]["num_hidden_layers"] == 48
    assert PAPER_ARCHITECTURES["llama-760m"]["head_dim"] == 96


def test_paper_results_keys_are_presets():
    assert len(PRESETS) == 24
    assert set(PAPER_RESULTS) <= set(PRESETS)
    assert set(PAPER_ARCHITECTURES) == {preset.rsplit("-", 1)[0] for preset in PRESETS}
    tables = {"table_1": "Table 1", "table_6": "Table 6", "table_7": "Table 7"}
    for records in PAPER_RESULTS.values():
        assert records and all(record["source"] == tables[table] for table, record in records.items())


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_renders(preset):
    family, _, variant = preset.split("-")
    config = CONFIGS[family](implicit=variant != "explicit")
    validate_model_card(render_model_card(config, repo_id=f"org/{preset}", preset=preset))


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_explicit_card(family):
    card = render_model_card(CONFIGS[family](implicit=False), repo_id="org/tiny-explicit")
    assert "explicit" in card and "| `implicit` | `False` |" in card
    assert "## Fixed-point solver" not in card
    assert "deep-equilibrium" not in validate_model_card(card)["tags"]


def test_bad_presets():
    with pytest.raises(ValueError, match="valid presets: .*mamba2-130m-explicit"):
        render_model_card(mamba2_config(), repo_id="org/x", preset="mamba2-125m-implicit")
    with pytest.raises(ValueError, match="llama"):
        render_model_card(mamba2_config(), repo_id="org/x", preset="llama-130m-implicit")
    with pytest.raises(ValueError, match="implicit=True"):
        render_model_card(mamba2_config(), repo_id="org/x", preset="mamba2-130m-explicit")


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda card: card.replace("library_name: transformers", "library_name: timm"), "library_name"),
        (lambda card: card.replace("pipeline_tag: text-generation\n", ""), "pipeline_tag"),
        (lambda card: card.replace("license: mit", "license:"), "license"),
        (lambda card: card.replace("license: mit", "license: [mit"), "YAML"),
        (lambda card: card.split("---", 2)[2], "license"),  # no metadata block at all
    ],
)
def test_broken_metadata_fails_validation(edit, fragment):
    card = render_model_card(mamba2_config(), repo_id="org/x")
    with pytest.raises(ValueError, match=fragment):
        validate_model_card(edit(card))


def test_empty_tags_fail_validation():
    card = render_model_card(mamba2_config(), repo_id="org/x")
    start, end = card.index("tags:"), card.index("---", card.index("tags:"))
    with pytest.raises(ValueError, match="tags"):
        validate_model_card(card[:start] + "tags: []\n" + card[end:])


@pytest.mark.parametrize("name", ["implicit-mamba2-a5", "implicit-mamba2-s5", "mamba2-16layer-a5", "mamba2-16layer-s5"])
def test_bundled_cards_show_their_measured_figures_as_evaluation_results(name):
    """The Hub reads a card's `model-index`: the accuracies recorded in `state_tracking.json`, one per length."""
    import json

    from conftest import ROOT
    from huggingface_hub import ModelCard
    from implicit_lm.training.state_tracking_experiment import card_results

    folder = ROOT / "models" / name
    text = (folder / "README.md").read_text()
    validate_model_card(text)
    card = ModelCard(text)
    figures = json.loads((folder / "state_tracking.json").read_text())
    expected = card_results(figures["group"], figures["rows"])
    assert card.data.model_name == name and len(expected) >= 4
    assert [(r.dataset_config, r.metric_type, r.metric_value) for r in card.data.eval_results] == [
        (r.dataset_config, r.metric_type, r.metric_value) for r in expected]
    by_length = {row["length"]: row["accuracy"] for row in figures["rows"] if row["mode"] != "simultaneous"}
    assert card.data.eval_results[0].metric_value == pytest.approx(by_length[min(by_length)], abs=1e-4)


def test_the_bundled_story_card_is_rendered_from_its_figures():
    """The checked-in card is exactly what the experiment's renderer writes from `stories.json` (no drift)."""
    import json

    from conftest import ROOT
    from implicit_lm.training.stories_experiment import stories_card

    from modeling_implicit import ImplicitMamba2Config

    folder = ROOT / "models" / "implicit-mamba2-stories"
    figures = json.loads((folder / "stories.json").read_text())
    assert (folder / "README.md").read_text() == stories_card(ImplicitMamba2Config.from_pretrained(folder),
                                                              folder.name, figures)


def test_every_bundled_card_has_hub_metadata_and_sets_solvers_per_call():
    """Every bundled card: validated metadata with `model-index` results; implicit models show `solver_overrides`
    in their usage and no card tells users to assign solver settings to `model.config`."""
    import re

    from conftest import ROOT
    from huggingface_hub import ModelCard

    folders = sorted(path.parent for path in (ROOT / "models").glob("*/README.md"))
    assert len(folders) >= 7
    for folder in folders:
        text = (folder / "README.md").read_text()
        metadata = validate_model_card(text)
        card = ModelCard(text)
        assert card.data.eval_results, f"{folder.name}: no model-index results"
        assert not re.search(r"model\.config\.\w+\s*=[^=]", text), f"{folder.name} assigns to model.config"
        if "deep-equilibrium" in metadata["tags"]:
            assert "solver_overrides" in text, f"{folder.name}: usage without solver_overrides"
