"""The experiment scripts that train the bundled models, end to end at toy size: training subprocesses, evaluation,
results files, bundling with model cards, and continuing a finished run without retraining."""

from __future__ import annotations

import json

import pytest
import torch
from implicit_lm.model_cards import validate_model_card


pytestmark = pytest.mark.e2e  # each trains and evaluates whole (toy-sized) experiments


def stage_steps(log_path) -> list[int]:
    return [record["step"] for record in map(json.loads, log_path.read_text().splitlines()) if "loss" in record]


def test_state_tracking_experiment(tmp_path, monkeypatch):
    from implicit_lm.tasks.word_problems import element_names
    from implicit_lm.training import state_tracking_experiment as experiment
    from transformers import AutoModelForCausalLM, pipeline

    # Short test lengths: the toy models are untrained, so their sequential solves take many iterations per token.
    monkeypatch.setattr(experiment, "EVAL_LENGTHS", (8, 16))
    monkeypatch.setattr(experiment, "DUALITY_LENGTHS", (8, 16))
    monkeypatch.setattr(experiment, "VALIDATION_LENGTH", 16)
    # One long stage for the explicit baseline (each stage is a subprocess; the default stages have their own test).
    monkeypatch.setattr(experiment, "EXPLICIT_LONG_STAGES", {"A5": ((3000, 1e-3),)})
    run, bundle = tmp_path / "run", tmp_path / "models"
    arguments = ["--output-dir", str(run), "--groups", "A5", "--models", "implicit-mamba2,mamba2-16layer",
                 "--seeds", "0,1", "--steps-scale", "0.002", "--num-samples", "3", "--duality-samples", "2",
                 "--hidden-size", "16", "--baseline-hidden-size", "16", "--bundle-dir", str(bundle),
                 "--no-compile"]  # compiling a toy 16-layer stack takes longer than training it
    threads = torch.get_num_threads()
    payload = experiment.main(arguments)
    assert torch.get_num_threads() == threads  # evaluation used every core, then gave the setting back
    evaluation = payload["evaluations"]["A5"]
    results = evaluation["results"]
    assert list(results) == ["implicit-mamba2", "mamba2-16layer"]
    implicit, explicit = results["implicit-mamba2"], results["mamba2-16layer"]
    assert [(row["length"], row["mode"]) for row in explicit["rows"]] == [(8, "explicit"), (16, "explicit")]
    # Sequential on the test set, then simultaneous with caps 2L and the model's own on the duality set.
    assert [(row["length"], row["mode"], row.get("cap_per_token"), row["num_samples"]) for row in implicit["rows"]] == [
        (8, "sequential", None, 3), (16, "sequential", None, 3), (8, "simultaneous", 2.0, 2),
        (8, "simultaneous", None, 2), (16, "simultaneous", 2.0, 2), (16, "simultaneous", None, 2)]
    simultaneous = [row for row in implicit["rows"] if row["mode"] == "simultaneous"]
    assert all(0 <= row["agreement"] <= 1 for row in simultaneous)
    assert [row["iteration_cap"] for row in simultaneous] == [128, 128, 128, 128]  # 2L < the model's own cap here
    for entry in results.values():
        assert all(seconds > 0 for seconds in entry["stage_seconds"])
    # Two seeds trained; the one with the better validation accuracy is kept, with the mean and spread of both.
    seeds = evaluation["seeds"]
    assert set(seeds["validation_accuracy"]) == {"implicit-mamba2-seed0", "implicit-mamba2-seed1"}
    assert seeds["validation_accuracy"][seeds["kept"]] == max(seeds["validation_accuracy"].values())
    assert implicit["seed"] == int(seeds["kept"].removeprefix("implicit-mamba2-seed"))
    accuracies = [seeds["test_accuracy"][name][16] for name in seeds["test_accuracy"]]
    assert seeds["per_length"][16]["mean"] == pytest.approx(sum(accuracies) / 2)
    assert seeds["per_length"][16]["max"] == max(accuracies)
    # Stage 1 trains 2000 * 0.002 steps on length 8, stages 2 and 3 800 and 1200 * 0.002 on length 32; the
    # explicit baseline shares stages 1 and 2, then trains its own stage 3 (3000 * 0.002 steps).
    implicit_dir = run / "a5" / "implicit-mamba2-seed0"
    assert stage_steps(implicit_dir / "stage-1" / "train_log.jsonl") == [1, 2, 3, 4]
    assert stage_steps(implicit_dir / "stage-2" / "train_log.jsonl") == [1, 2]
    assert stage_steps(implicit_dir / "stage-3" / "train_log.jsonl") == [1, 2]
    assert stage_steps(run / "a5" / "mamba2-16layer" / "stage-3" / "train_log.jsonl") == [1, 2, 3, 4, 5, 6]
    assert not (run / "a5" / "mamba2-16layer" / "stage-4").exists()
    assert not any(spec["compiled"] for spec in payload["specs"]["A5"].values())
    stage_2 = json.loads((implicit_dir / "stage-2-curriculum.json").read_text())["phases"][0]
    assert (stage_2["max_iterations"], stage_2["phantom_steps"]) == (32, 4)
    assert not (run / "a5" / "mamba2-16layer" / "stage-1-curriculum.json").exists()  # explicit: no solver settings
    report = (run / "results.md").read_text()
    assert "| implicit-mamba2 |" in report and "same as sequential" in report and "mean +- std" in report
    assert (run / "length_generalization.png").stat().st_size > 0

    for name, implicit_model in (("implicit-mamba2-a5", True), ("mamba2-16layer-a5", False)):
        folder = bundle / name
        recorded = json.loads((folder / "state_tracking.json").read_text())
        assert recorded["implicit"] is implicit_model and recorded["train_length"] == 32
        assert len(recorded["rows"]) == (6 if implicit_model else 2)
        metadata = validate_model_card((folder / "README.md").read_text())
        assert "state-tracking" in metadata["tags"]
        (index,) = metadata["model-index"]  # the measured accuracies, one result per length
        assert [result["metrics"][0]["value"] for result in index["results"]] == [
            round(row["accuracy"], 4) for row in recorded["rows"] if row["mode"] != "simultaneous"]
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        assert model.config.implicit is implicit_model and model.config.vocab_size == 64
        assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (60, 61, 62)
        generated = pipeline("text-generation", model=str(folder), trust_remote_code=True)(
            "01342 10324 12034", max_new_tokens=1, do_sample=False, return_full_text=False)[0]["generated_text"]
        assert generated.strip() in element_names("A5")
    assert "mean +- std" in (bundle / "implicit-mamba2-a5" / "README.md").read_text()
    # The implicit bundle solves to the test tolerance its figures were measured at, not the training one.
    config = json.loads((bundle / "implicit-mamba2-a5" / "config.json").read_text())
    assert (config["tolerance"], config["prefill_mode"]) == (experiment.TEST_TOLERANCE, "sequential")
    # The untrained toy baseline's card says what its figures say.
    explicit_card = (bundle / "mamba2-16layer-a5" / "README.md").read_text()
    fit = next(row["accuracy"] for row in explicit["rows"] if row["length"] == 16)
    assert f"does not fit its training length ({fit:.3f} per-token accuracy at length 16" in explicit_card
    assert not list(bundle.glob(".*partial*"))

    # A second run finds every stage of every model finished, only evaluates again, and reports the recorded times.
    logs = sorted(run.glob("*/*/stage-*.log"))
    before = [log.stat().st_mtime_ns for log in logs]
    again = experiment.main(arguments)
    assert [log.stat().st_mtime_ns for log in logs] == before
    assert {name: entry["stage_seconds"] for name, entry in again["evaluations"]["A5"]["results"].items()} == {
        name: entry["stage_seconds"] for name, entry in results.items()}


def test_explicit_baselines_train_compiled_in_long_stages(tmp_path):
    """The default recipe: the explicit stack trains stages 1-2 of the implicit model and long stages of its own at
    length 32 (their third at half the learning rate on A5, at the full one on S5), every stage compiled; the implicit
    model's are not, and on S5 it has a fourth stage."""
    from implicit_lm.training import state_tracking_experiment as experiment

    a5 = {spec.name: spec for spec in experiment.default_specs("A5", 128, 64)}["mamba2-16layer"]
    assert [stage.seq_len for stage in a5.stages] == [8, 32, 32, 32, 32]
    assert [(stage.steps, stage.learning_rate) for stage in a5.stages[2:]] == [(3000, 1e-3), (6000, 1e-3), (4000, 5e-4)]
    specs = {spec.name: spec for spec in experiment.default_specs("S5", 128, 64)}
    explicit, implicit = specs["mamba2-16layer"], specs["implicit-mamba2-seed0"]
    assert [(stage.steps, stage.learning_rate) for stage in explicit.stages[2:]] == [
        (3000, 1e-3), (6000, 1e-3), (4000, 1e-3), (6000, 1e-3), (4000, 5e-4)]
    assert explicit.stages[0].learning_rate == 1e-3  # S5's explicit stack stalls at stage 1's 3e-3
    for index in range(7):
        command, output = experiment.stage_command(explicit, index, tmp_path / "explicit", "S5", 64)
        assert "--compile" in command and output.name == f"stage-{index + 1}"
    (tmp_path / "implicit").mkdir()  # the implicit stages write their curriculum files there
    command, _ = experiment.stage_command(implicit, 2, tmp_path / "implicit", "S5", 64)
    assert "--compile" not in command
    # On S5, lower-learning-rate passes at length 32, each trained from the previous stage's weights: a fourth and a
    # fifth; A5's model has three stages.
    assert [(stage.seq_len, stage.steps, stage.learning_rate) for stage in implicit.stages] == [
        (8, 4000, 3e-3), (32, 800, 1e-3), (32, 1200, 5e-4), (32, 1500, 2e-4), (32, 3000, 1e-4)]
    command, output = experiment.stage_command(implicit, 3, tmp_path / "implicit", "S5", 64)
    assert command[command.index("--model") + 1] == str(tmp_path / "implicit" / "stage-3" / "final")
    assert output.name == "stage-4" and command[command.index("--learning-rate") + 1] == "0.0002"
    a5_implicit = {spec.name: spec for spec in experiment.default_specs("A5", 128, 64)}["implicit-mamba2-seed0"]
    assert len(a5_implicit.stages) == 3
    # Without --seeds each group trains the seeds its bundled model was kept from; --seeds applies to every group.
    assert experiment.parse_args(["--output-dir", str(tmp_path)]).seeds == {"A5": (0,), "S5": (0,)}
    assert experiment.parse_args(["--output-dir", str(tmp_path), "--seeds", "2,2,3"]).seeds == {
        "A5": (2, 3), "S5": (2, 3)}
    uncompiled = experiment.default_specs("S5", 128, 64, compile_explicit=False)
    assert not any(spec.compiled for spec in uncompiled)


def test_a_model_resumes_after_its_last_finished_stage(tmp_path, monkeypatch):
    """Stages up to the last one with a `final/` folder count as done even when their own folders are gone (a model
    resumed from its bundled weights): only the later stages run, from that stage's weights, and the recorded times
    of the earlier ones are reported."""
    from implicit_lm.training import state_tracking_experiment as experiment

    spec = {s.name: s for s in experiment.default_specs("S5", 16, 16)}["implicit-mamba2-seed0"]
    model_dir = tmp_path / "s5" / spec.name
    (model_dir / "stage-3" / "final").mkdir(parents=True)
    (model_dir / "stage-3" / "final" / "config.json").write_text("{}")
    for index in range(3):
        (model_dir / f"stage-{index + 1}.log.seconds.json").write_text(json.dumps({"seconds": 10.0 * (index + 1)}))
    ran = []

    real_run_logged = experiment.run_logged

    def run_logged(command, log_path, threads, done=None):
        if done is not None and done.exists():  # the real one's answer: the recorded time
            return real_run_logged(command, log_path, threads, done)
        ran.append((log_path.name, command[command.index("--model") + 1]))
        return 1.5

    monkeypatch.setattr(experiment, "run_logged", run_logged)
    timing = experiment.train_model(spec, tmp_path / "s5", "S5", batch_size=4, threads=1)
    assert ran == [("stage-4.log", str(model_dir / "stage-3" / "final")),
                   ("stage-5.log", str(model_dir / "stage-4" / "final"))]
    assert timing["stage_seconds"] == [10.0, 20.0, 30.0, 1.5, 1.5]


def test_state_tracking_experiment_rejects_bad_arguments(tmp_path, capsys):
    from implicit_lm.training import state_tracking_experiment as experiment

    for arguments, message in (
        (["--models", "implicit-mamba2,transformer"], "unknown ['transformer']"),
        (["--groups", "A5,Z3"], "unknown ['Z3']"),
        (["--seeds", "0,x"], "--seeds takes comma-separated integers"),
        (["--models", "implicit-mamba2", "--bundle-dir", str(tmp_path / "m")], "needs the models ['mamba2-16layer']"),
        (["--steps-scale", "0"], "--steps-scale must be positive"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            experiment.main(["--output-dir", str(tmp_path / "run"), *arguments])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_stories_experiment(tmp_path):
    from implicit_lm.training import stories_experiment as experiment
    from transformers import pipeline

    run, bundle = tmp_path / "run", tmp_path / "models"
    payload = experiment.main(["--output-dir", str(run), "--num-stories", "40", "--hidden-size", "32", "--seq-len",
                               "64", "--batch-size", "2", "--steps", "3", "--stories-per-length", "2",
                               "--bundle-dir", str(bundle)])
    results = payload["results"]
    assert set(results) == {"implicit-mamba2", "mamba2-2layer"}
    assert [row["events"] for row in results["implicit-mamba2"]["rows"]] == list(experiment.EVAL_LENGTHS)
    assert all(row["answer_iterations_mean"] >= 1 for row in results["implicit-mamba2"]["rows"])
    assert all(row["answer_iterations_mean"] is None for row in results["mamba2-2layer"]["rows"])
    assert len((run / "train.jsonl").read_text().splitlines()) == 40
    assert stage_steps(run / "implicit-mamba2" / "train" / "train_log.jsonl") == [1, 2, 3]
    assert (run / "stories.png").stat().st_size > 0

    folder = bundle / "implicit-mamba2-stories"
    recorded = json.loads((folder / "stories.json").read_text())
    assert [row["events"] for row in recorded["rows"]] == list(experiment.EVAL_LENGTHS)
    validate_model_card((folder / "README.md").read_text())
    generator = pipeline("text-generation", model=str(folder), trust_remote_code=True)
    text = generator("mary went to the kitchen . where is mary ?", max_new_tokens=2, do_sample=False,
                     return_full_text=False)
    assert len(text[0]["generated_text"].split()) == 2
