"""`implicit-lm eval harness`: lm-eval on the tiny saved models over the offline local tasks (every request type)."""

from __future__ import annotations

import json
import math

import pytest
from conftest import run_module

pytest.importorskip("lm_eval")

from implicit_lm.eval.harness import LOCAL_TASKS, LOCAL_TASKS_DIR, PAPER_TASKS, expand_task_names, main  # noqa: E402

CAP = 6  # --eval-max-iterations in these tests: the random models need more, so the cap is reached
pytestmark = pytest.mark.filterwarnings("ignore:Fixed-point solver did not converge")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def run(tmp_path, model, *options: str) -> dict:
    output = tmp_path / "results.json"
    payload = main(["--model", str(model), "--bootstrap-iters", "0", "--output", str(output), *options])
    assert json.loads(output.read_text()) == payload
    return payload


def check_metrics(tasks: dict, names: tuple[str, ...], limit: int) -> None:
    for name in names:
        assert tasks[name]["samples"]["effective"] == limit
    assert 0 <= tasks["implicit_local_choice"]["metrics"]["acc"] <= 1
    assert 0 <= tasks["implicit_local_choice"]["metrics"]["acc_norm"] <= 1
    assert 0 <= tasks["implicit_local_lastword"]["metrics"]["acc"] <= 1
    assert tasks["implicit_local_lastword"]["metrics"]["perplexity"] > 1
    word_perplexity = tasks["implicit_local_text"]["metrics"]["word_perplexity"]
    assert math.isfinite(word_perplexity) and word_perplexity > 1
    assert 0 <= tasks["implicit_local_continue"]["metrics"]["exact_match"] <= 1


def test_task_aliases():
    assert expand_task_names("paper") == list(PAPER_TASKS)
    assert expand_task_names("local, piqa,local") == [*LOCAL_TASKS, "piqa"]


def test_help(capsys):
    assert run_module("implicit_lm.eval.harness", "--help") == 0
    out = capsys.readouterr().out
    assert "--tasks" in out and "--eval-max-iterations" in out and "lambada_openai" in out


def test_local_tasks(saved_model, tmp_path, monkeypatch):
    """All four request types with a solver override: metrics, and per-task statistics within the cap (generation
    adds per-token statistics for its sequential decoding steps). Runs from another directory."""
    monkeypatch.chdir(tmp_path)
    options = ["--tasks", "local", "--limit", "2", "--batch-size", "2", "--eval-max-iterations", str(CAP)]
    payload = run(tmp_path, saved_model, *options)
    metadata, tasks = payload["metadata"], payload["tasks"]
    assert metadata["tasks"] == list(LOCAL_TASKS)
    assert metadata["model"]["implicit"] and metadata["model"]["solver"]["eval_max_iterations"] == CAP
    check_metrics(tasks, LOCAL_TASKS, limit=2)
    for name in LOCAL_TASKS:
        stats = tasks[name]["solver_stats"]["per_sequence"]
        assert stats["count"] >= 2 and 1 <= stats["iterations_mean"] and stats["iterations_max"] <= CAP
    assert tasks["implicit_local_choice"]["solver_stats"]["per_token"] is None
    per_token = tasks["implicit_local_continue"]["solver_stats"]["per_token"]
    assert per_token["count"] >= 2 and 1 <= per_token["iterations_max"] <= CAP


def test_sequential_mode(saved_model, tmp_path):
    """`--inference-mode sequential` reaches the config: loglikelihoods solve token by token."""
    options = ["--tasks", "implicit_local_lastword", "--limit", "1", "--eval-max-iterations", str(CAP)]
    payload = run(tmp_path, saved_model, *options, "--inference-mode", "sequential")
    assert payload["metadata"]["model"]["solver"]["inference_mode"] == "sequential"
    stats = payload["tasks"]["implicit_local_lastword"]["solver_stats"]
    assert stats["per_sequence"] is None
    assert stats["per_token"]["count"] > 1 and 1 <= stats["per_token"]["iterations_max"] <= CAP


def test_group(saved_models, tmp_path):
    """A group runs in one call: its subtasks' metrics, the statistics on the group's entry."""
    options = ["--tasks", "implicit_local", "--limit", "1", "--eval-max-iterations", str(CAP)]
    tasks = run(tmp_path, saved_models["mamba2"], *options)["tasks"]
    assert tasks["implicit_local"]["subtasks"] == list(LOCAL_TASKS)
    assert tasks["implicit_local"]["solver_stats"]["per_sequence"]["count"] >= len(LOCAL_TASKS)
    assert all("solver_stats" not in tasks[name] for name in LOCAL_TASKS)


def test_include_path_tag(saved_models, tmp_path):
    """A user's task folder: a task deriving from a local one, run through its tag (statistics on the tag's entry)."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "extra.yaml").write_text(
        f"include: {LOCAL_TASKS_DIR / 'implicit_local_choice.yaml'}\ntask: extra_choice\ntag: extra_tag\n"
    )
    options = ["--tasks", "extra_tag", "--include-path", str(folder), "--limit", "2", "--eval-max-iterations", str(CAP)]
    tasks = run(tmp_path, saved_models["llama"], *options)["tasks"]
    assert 0 <= tasks["extra_choice"]["metrics"]["acc"] <= 1
    assert tasks["extra_tag"]["subtasks"] == ["extra_choice"]
    assert tasks["extra_tag"]["solver_stats"]["per_sequence"]["count"] == 4  # 2 examples x 2 choices


def test_explicit_baseline(explicit_baseline, tmp_path):
    payload = run(tmp_path, explicit_baseline, "--tasks", "local", "--limit", "2")
    model = payload["metadata"]["model"]
    assert model["model_type"] == "llama" and not model["implicit"] and "solver" not in model
    check_metrics(payload["tasks"], LOCAL_TASKS, limit=2)
    assert all("solver_stats" not in entry for entry in payload["tasks"].values())


def exit_message(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2
    return capsys.readouterr().err


def test_unknown_task(saved_models, capsys):
    error = exit_message(capsys, ["--model", str(saved_models["llama"]), "--tasks", "implicit_local_choise,hellaswg"])
    assert "Unknown tasks 'implicit_local_choise' (did you mean implicit_local_choice" in error
    assert "'hellaswg' (did you mean hellaswag" in error
    assert "Local tasks: " + ", ".join(LOCAL_TASKS) in error and "Traceback" not in error


def test_bad_model(explicit_baseline, tmp_path, capsys):
    error = exit_message(capsys, ["--model", str(tmp_path / "missing"), "--tasks", "local"])
    assert "does not exist" in error
    error = exit_message(capsys, ["--model", str(explicit_baseline), "--tasks", "local", "--eval-max-iterations", "4"])
    assert "'llama' model, not an implicit one" in error and "eval_max_iterations" in error


def test_bad_tasks(saved_models, capsys):
    model = str(saved_models["mamba2"])
    error = exit_message(capsys, ["--model", model, "--tasks", "local,implicit_local"])
    assert (
        "Task 'implicit_local_choice' is requested twice, by 'implicit_local_choice' and by 'implicit_local'" in error
    )
    error = exit_message(capsys, ["--model", model, "--tasks", "local", "--include-path", "nowhere"])
    assert "--include-path nowhere is not a folder" in error
    assert "--tasks ' , ' names no task" in exit_message(capsys, ["--model", model, "--tasks", " , "])


def test_generation_respects_the_task_limit(saved_models, tmp_path):
    """A `max_new_tokens` in the model's generation config must not override the task's `max_gen_toks` (8)."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(saved_models["mamba2"], folder)
    generation = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**generation, "max_new_tokens": 40}))
    options = ["--tasks", "implicit_local_continue", "--limit", "2", "--batch-size", "1", "--eval-max-iterations", "3"]
    payload = run(tmp_path, folder, *options)
    # One prefill per request, then at most 8 - 1 single-token decoding steps.
    assert payload["tasks"]["implicit_local_continue"]["solver_stats"]["per_token"]["count"] <= 2 * 7


BUNDLED_WORD_PROBLEM_MODELS = ("implicit-mamba2-a5", "implicit-mamba2-s5", "mamba2-16layer-a5", "mamba2-16layer-s5")


@pytest.mark.parametrize("name", BUNDLED_WORD_PROBLEM_MODELS)
def test_every_bundled_tokenizer_has_bos_eos_and_pad(name):
    from conftest import ROOT
    from transformers import AutoTokenizer

    folder = ROOT / "models" / name
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    config = json.loads((folder / "config.json").read_text())
    generation = json.loads((folder / "generation_config.json").read_text())
    for kind in ("bos", "eos", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id")
        assert token_id is not None and token_id < config["vocab_size"]
        assert config[f"{kind}_token_id"] == generation[f"{kind}_token_id"] == token_id
    elements = "01234 12034 01342"
    assert tokenizer.decode(tokenizer(elements)["input_ids"]).split() == elements.split()


LM_EVAL_TASKS = {  # lm-eval's three request types, over a local JSON Lines file (no Hub)
    "wp_loglikelihood": {"output_type": "loglikelihood", "doc_to_text": "{{context}}",
                         "doc_to_target": " {{continuation}}", "metric_list": [{"metric": "acc"}]},
    "wp_rolling": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                   "metric_list": [{"metric": "word_perplexity"}]},
    "wp_generate": {"output_type": "generate_until", "doc_to_text": "{{context}}",
                    "doc_to_target": " {{continuation}}", "metric_list": [{"metric": "exact_match"}],
                    "generation_kwargs": {"until": ["</s>"], "max_gen_toks": 2, "do_sample": False}},
}


@pytest.mark.e2e  # lm-eval's own CLI in a subprocess
def test_lm_evals_own_hf_model_runs_every_request_type_on_a_bundled_model(tmp_path):
    """`lm_eval --model hf` with no extra arguments: it needs BOS (rolling log-likelihood's prefix) and EOS
    (generate_until) from the tokenizer; the bundled word-problem tokenizers once had neither."""
    import subprocess
    import sys

    from conftest import ROOT

    data = tmp_path / "problems.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in [
        {"context": "01234 12034", "continuation": "12034", "text": "01234 12034 12034 01342"},
        {"context": "12034 12034", "continuation": "20134", "text": "12034 20134 01234"},
    ]) + "\n")
    for task, fields in LM_EVAL_TASKS.items():
        spec = {"task": task, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
                "test_split": "test", **fields}
        (tmp_path / f"{task}.yaml").write_text(json.dumps(spec))  # JSON is YAML
    output = tmp_path / "out"
    command = [sys.executable, "-m", "lm_eval", "--model", "hf",
               "--model_args", f"pretrained={ROOT / 'models' / 'implicit-mamba2-a5'},trust_remote_code=True",
               "--tasks", ",".join(LM_EVAL_TASKS), "--include_path", str(tmp_path), "--batch_size", "2",
               "--device", "cpu", "--output_path", str(output)]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (results_file,) = output.rglob("results*.json")
    results = json.loads(results_file.read_text())["results"]
    assert results["wp_loglikelihood"]["acc,none"] == 1.0  # the implicit A5 model tracks the product
    assert math.isfinite(results["wp_rolling"]["word_perplexity,none"])
    assert "exact_match,none" in results["wp_generate"]


def test_scores_do_not_depend_on_the_batch_size(saved_model, tmp_path):
    """lm-eval right-pads log-likelihood batches without a mask; our harness gives the model the mask, so padding
    never enters a row's convergence test (without it, one log-likelihood moved by 0.11 nats between sizes 1 and 4)."""
    options = ["--tasks", "implicit_local_lastword,implicit_local_choice", "--limit", "4",
               "--eval-max-iterations", "400", "--tolerance", "1e-3"]
    results = {}
    for size in ("1", "4"):
        (tmp_path / size).mkdir()
        results[size] = run(tmp_path / size, saved_model, *options, "--batch-size", size)["tasks"]
    for task in ("implicit_local_lastword", "implicit_local_choice"):
        one, four = results["1"][task]["metrics"], results["4"][task]["metrics"]
        assert one.keys() == four.keys()
        for metric, value in one.items():
            assert four[metric] == pytest.approx(value, rel=1e-5, abs=1e-7), (task, metric)
