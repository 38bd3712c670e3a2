"""`implicit-lm experiment language-model` end to end at toy size: corpus, both models trained on the same stream,
every measurement, the targets, the bundles; an interrupted run resumes instead of starting again."""

from __future__ import annotations

import json

import pytest
from test_training_data import documents

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.e2e  # trains two models and runs lm-eval's CLI


def test_language_model_experiment_end_to_end(tmp_path, monkeypatch):
    from implicit_lm.files import foreign_entries
    from implicit_lm.models import load_model
    from implicit_lm.training import corpus
    from implicit_lm.training import language_model_experiment as experiment

    records = documents(160)
    for record in records:  # documents long enough for the extrapolation rows (8 x 16 tokens)
        record["text"] = " ".join([record["text"]] * 40)
    monkeypatch.setitem(corpus.READERS, "kjv", lambda: iter({**r, "source": "kjv"} for r in records))
    monkeypatch.setitem(corpus.READERS, "python-docs", lambda: iter([]))
    real_build = corpus.build
    monkeypatch.setattr(corpus, "build", lambda folder, sources, vocab_size: real_build(folder, ["kjv"], 300))
    monkeypatch.setattr(experiment, "MODELS", tuple(
        experiment.LanguageModel(spec.name, spec.implicit, layers=1, hidden_size=32) for spec in experiment.MODELS))
    for name, value in {"TRAIN_LENGTH": 16, "BATCH_SIZE": 4, "EVAL_ROWS": 8, "EXTRAPOLATION_LENGTH": 128,
                        "EXTRAPOLATION_ROWS": 4, "DUALITY_ROWS": 4, "SOLVER_ROWS": 4, "ITERATION_CAPS": "1,4",
                        "LASTWORD_CONTEXT_WORDS": 8, "ROLLING_DOCUMENT_WORDS": 20, "SAVE_EVERY": 2}.items():
        monkeypatch.setattr(experiment, name, value)

    output, bundles = tmp_path / "run", tmp_path / "models"
    results = experiment.main(["--output-dir", str(output), "--steps", "4", "--bundle-dir", str(bundles)])

    logs = {spec.name: [json.loads(line) for line in (output / spec.name / "train" / "train_log.jsonl")
                        .read_text().splitlines() if '"loss"' in line] for spec in experiment.MODELS}
    assert [line["phase"] for line in logs["implicit-mamba2-english"]] == ["bounded"] * 3 + ["free"]
    assert all(line["iterations_max"] == 4 for line in logs["implicit-mamba2-english"][:3])
    assert (output / "implicit-mamba2-english" / "train" / "tensorboard").is_dir()
    for key in ("duality", "test_time_compute", "solvers", "throughput", "generations", "targets"):
        assert key in results, key
    assert set(results["solvers"]) == set(experiment.SOLVER_VARIANTS)
    assert results["throughput"]["expected_ratio"] > 1
    for spec in experiment.MODELS:
        extrapolation = results[f"perplexity/{spec.name}"]["extrapolation"]["extrapolation"]
        assert set(extrapolation) == {"1x", "2x", "4x", "8x"}
        for task, scores in results[f"lm_eval/{spec.name}"].items():  # lm-eval's own hf model and our harness
            for metric, value in scores["lm_eval_hf"].items():
                assert scores["implicit_lm_harness"][metric] == pytest.approx(value, rel=1e-4), (task, metric)
    assert (output / "results.md").read_text().count("| picard |") == 1
    for name in ("loss_curves.png", "extrapolation.png"):
        assert (output / name).stat().st_size > 1000

    for spec in experiment.MODELS:
        folder = bundles / spec.name
        assert foreign_entries(folder) == []  # a model folder implicit-lm may replace
        card = (folder / "README.md").read_text()
        assert "model-index" in card and "held-out perplexity" in card and "PSF" not in card
        model, tokenizer = load_model(str(folder))
        assert model.config.implicit == spec.implicit and tokenizer.eos_token == "</s>"

    # Started again, nothing is retrained or measured again.
    before = (output / "language_model.json").read_text()
    again = experiment.main(["--output-dir", str(output), "--steps", "4"])
    assert again["measure_seconds"] == json.loads(before)["measure_seconds"]
