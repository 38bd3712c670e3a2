"""training.finetune end to end: accelerate with 2 CPU processes through both curriculum phases, exact resume after a
real kill, bad input refused before any work."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, build_tokenizer, tiny_mamba2
from safetensors.torch import load_file

TEXT = "mary went to the kitchen and john went to the garden . " * 40
CURRICULUM = {
    "phases": [
        {"name": "bounded", "fraction": 0.5, "max_iterations": 2, "tolerance": None, "phantom_steps": 1},
        {"name": "free", "fraction": 0.5, "max_iterations": 8, "tolerance": 0.05, "phantom_steps": 2},
    ]
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny implicit Mamba2 with a tokenizer, repetitive training text and a two-phase curriculum file."""
    root = tmp_path_factory.mktemp("finetune")
    tokenizer = build_tokenizer()
    model = tiny_mamba2(vocab_size=len(tokenizer), max_iterations=8, tolerance=0.05, eval_max_iterations=30)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "train.txt").write_text(TEXT)
    (root / "curriculum.json").write_text(json.dumps(CURRICULUM))
    return root


def command(workspace, output, *extra, launcher=(sys.executable, "-m", "implicit_lm.training.finetune")):
    return [*launcher, "--model", str(workspace / "model"), "--data", str(workspace / "train.txt"),
            "--output-dir", str(output), "--seq-len", "16", "--batch-size", "2", "--learning-rate", "3e-3",
            "--warmup-steps", "1", "--curriculum", str(workspace / "curriculum.json"), *map(str, extra)]


def run(args, **environment):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **environment}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def log_lines(output):
    return [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]


def weights(output):
    return load_file(output / "final" / "model.safetensors")


@pytest.mark.e2e  # real processes, killed or launched by accelerate
def test_two_processes_both_phases_loss_falls(workspace, tmp_path):
    output = tmp_path / "run"
    # accelerate's `--cpu` starts one process (several need an MPI host file); `--multi_gpu` with ACCELERATE_USE_CPU
    # starts two gloo processes.
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "-m", "implicit_lm.training.finetune")
    arguments = ("--max-steps", 12, "--eval-data", workspace / "train.txt", "--eval-every", 6, "--eval-batches", 2,
                 "--save-every", 6)
    result = run(command(workspace, output, *arguments, launcher=launcher), ACCELERATE_USE_CPU="true")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = log_lines(output)
    steps = [line for line in lines if "loss" in line]
    assert [line["step"] for line in steps] == list(range(1, 13))
    assert [line["phase"] for line in steps] == ["bounded"] * 6 + ["free"] * 6
    # The bounded phase runs exactly its cap (2 iterations + 1 phantom step); the free phase at most 8.
    assert all(line["iterations_max"] == 2 for line in steps[:6])
    assert all(line["iterations_max"] <= 8 for line in steps[6:])
    assert steps[-1]["loss"] < 0.85 * steps[0]["loss"]
    evals = [line for line in lines if "eval_loss" in line]
    assert [line["step"] for line in evals] == [6, 12] and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    # Each step consumed 2 processes x 2 rows.
    rows = len(build_tokenizer()(TEXT)["input_ids"]) // 16
    assert steps[0]["epoch"] == pytest.approx(4 / rows) and steps[2]["epoch"] == pytest.approx(12 / rows)
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(output / "final", trust_remote_code=True)
    assert trained.config.max_iterations == 8  # the last phase's settings are saved

    # The checkpoint holds the optimizer state once (DDP: the same on every process) and each process's RNG states.
    assert sorted(path.name for path in (output / "checkpoint-6").iterdir()) == [
        "model.safetensors", "optimizer.pt", "rng-0.json", "rng-1.json", "scheduler.json", "training_state.json"]
    # Resumed by two processes from it (as if killed after step 6), the run ends with the same weights and log.
    resumed = tmp_path / "resumed"
    shutil.copytree(output / "checkpoint-6", resumed / "checkpoint-6")
    shutil.copy(output / "train_log.jsonl", resumed / "train_log.jsonl")  # lines after step 6 are dropped
    result = run(command(workspace, resumed, *arguments, "--resume", launcher=launcher), ACCELERATE_USE_CPU="true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed from" in result.stderr
    expected, actual = weights(output), weights(resumed)
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    untimed = [[{k: v for k, v in line.items() if k != "seconds"} for line in log_lines(folder)]
               for folder in (output, resumed)]
    assert untimed[0] == untimed[1]


@pytest.mark.e2e  # real processes, killed or launched by accelerate
def test_killed_run_resumes_to_identical_weights(workspace, tmp_path):
    steps = 30
    reference = tmp_path / "uninterrupted"
    result = run(command(workspace, reference, "--max-steps", steps))
    assert result.returncode == 0, result.stderr[-3000:]

    output = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command(workspace, output, "--max-steps", steps, "--save-every", 4), cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(output.glob("checkpoint-8")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (output / "final").exists()

    resumed = run(command(workspace, output, "--max-steps", steps, "--save-every", 4, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from" in resumed.stderr
    expected, actual = weights(reference), weights(output)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    assert [line["loss"] for line in log_lines(output)] == [line["loss"] for line in log_lines(reference)]
    assert len(list(output.glob("checkpoint-*"))) <= 2  # --keep-checkpoints


def test_bad_input_is_refused_before_any_work(workspace, tmp_path, capsys, monkeypatch):
    from implicit_lm.training.finetune import main

    def error_of(*args):  # in-process: the errors come before any training work
        with pytest.raises(SystemExit) as exit_info:
            main(list(args[3:]))  # without the `python -m implicit_lm.training.finetune` launcher
        assert exit_info.value.code == 2
        assert not (tmp_path / "out" / "final").exists()
        return capsys.readouterr().err

    base = command(workspace, tmp_path / "out", "--max-steps", 4)
    missing = [a if a != str(workspace / "train.txt") else str(tmp_path / "missing.txt") for a in base]
    assert "does not exist" in error_of(*missing)
    (tmp_path / "tiny.txt").write_text("mary went")
    tiny = [a if a != str(workspace / "train.txt") else str(tmp_path / "tiny.txt") for a in base]
    assert "fewer than one sequence" in error_of(*tiny)
    (tmp_path / "bad_curriculum.json").write_text(json.dumps(
        {"phases": [{**CURRICULUM["phases"][0], "fraction": 0.5}, {**CURRICULUM["phases"][1], "fraction": 0.4}]}
    ))
    bad = [a if a != str(workspace / "curriculum.json") else str(tmp_path / "bad_curriculum.json") for a in base]
    assert "sum to 1" in error_of(*bad)
    assert "no config.json" in error_of(*[a if a != str(workspace / "model") else str(tmp_path) for a in base])
    with monkeypatch.context() as patch:  # processes that cannot see each other
        patch.setenv("WORLD_SIZE", "2")
        assert "ACCELERATE_USE_CPU=true" in error_of(*base)

    # A checkpoint of another run (different batch layout) is refused on resume, naming the difference.
    main(command(workspace, tmp_path / "other", "--max-steps", 4, "--save-every", 2)[3:])
    shutil.rmtree(tmp_path / "other" / "final")  # as if killed after its checkpoint (a finished run has nothing to do)
    message = error_of(*command(workspace, tmp_path / "other", "--max-steps", 4, "--batch-size", 3, "--resume"))
    assert "belongs to a different run" in message and "batch_size: checkpoint 2, now 3" in message
    assert "pass --resume" in error_of(*command(workspace, tmp_path / "other", "--max-steps", 4))


def test_fsdp_asked_for_but_not_set_up_is_refused(workspace, tmp_path, capsys, monkeypatch):
    """accelerate falls back from FSDP without a word where it cannot shard (here: one CPU process); the run would
    train unsharded. It is refused before any work, naming what accelerate set up instead."""
    from implicit_lm.training.finetune import main

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --use_fsdp` exports
    with pytest.raises(SystemExit) as exit_info:
        main(command(workspace, tmp_path / "out", "--max-steps", 2)[3:])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "FSDP was asked for" in message and "set up NO with 1 process(es)" in message
    assert not (tmp_path / "out").exists()


def test_report_to_tensorboard_logs_every_record_and_never_takes_a_foreign_folder(workspace, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from implicit_lm.training.finetune import main

    run_dir = tmp_path / "run"
    main(command(workspace, run_dir, "--max-steps", 3, "--report-to", "tensorboard")[3:])
    accumulators = [EventAccumulator(str(path.parent)).Reload()  # the scalars, and the run's settings (hparams)
                    for path in (run_dir / "tensorboard").rglob("events.out.tfevents.*")]
    (accumulator,) = [found for found in accumulators if "loss" in found.Tags()["scalars"]]
    losses = accumulator.Scalars("loss")
    assert [event.step for event in losses] == [1, 2, 3]
    assert [event.value for event in losses] == pytest.approx([line["loss"] for line in log_lines(run_dir)])
    assert "iterations_mean" in accumulator.Tags()["scalars"]
    # --overwrite deletes the tracker's folder with the rest of the run.
    main(command(workspace, run_dir, "--max-steps", 2, "--overwrite")[3:])
    assert not (run_dir / "tensorboard").exists()
    # A tensorboard/ folder that no run of ours wrote is neither written into nor deleted.
    other = tmp_path / "other"
    (other / "tensorboard").mkdir(parents=True)
    (other / "tensorboard" / "mine.txt").write_text("keep")
    for extra in ((), ("--overwrite",)):
        with pytest.raises(SystemExit):
            main(command(workspace, other, "--max-steps", 2, "--report-to", "tensorboard", *extra)[3:])
    assert [path.name for path in (other / "tensorboard").iterdir()] == ["mine.txt"]
    assert not (other / "final").exists()


def test_data_stream_is_reproducible_and_sharded():
    from implicit_lm.training.data import DataError, RowStream

    rows = torch.arange(10 * 4).view(10, 4)
    whole = RowStream(rows, batch_size=2, seed=3)
    shards = [RowStream(rows, batch_size=1, seed=3, num_processes=2, rank=r) for r in (0, 1)]
    for micro in range(12):  # crosses two epoch boundaries
        together = torch.cat([shard.batch(micro) for shard in shards])
        assert torch.equal(together, whole.batch(micro))
    first_epoch = torch.cat([whole.batch(m) for m in range(5)])
    assert sorted(first_epoch[:, 0].tolist()) == list(range(0, 40, 4))  # every row once per epoch
    assert torch.equal(RowStream(rows, 2, seed=3).batch(7), whole.batch(7))
    with pytest.raises(DataError, match="fewer than one batch"):
        RowStream(rows[:3], batch_size=2, seed=0, num_processes=2)


@pytest.mark.parametrize("name", ["accelerate_ddp.yaml", "accelerate_fsdp.yaml"])
def test_example_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "training" / name))
    assert config.distributed_type in ("MULTI_GPU", "FSDP")
    assert config.num_processes == 8


def test_activation_checkpointing_trains_the_same_weights(workspace, tmp_path):
    from implicit_lm.training.finetune import main

    plain = main(command(workspace, tmp_path / "plain", "--max-steps", 3)[3:])
    checkpointed = main(command(workspace, tmp_path / "ckpt", "--max-steps", 3, "--gradient-checkpointing")[3:])
    expected, actual = load_file(plain / "model.safetensors"), load_file(checkpointed / "model.safetensors")
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def test_lora_run_saves_a_merged_model_and_its_adapter(workspace, tmp_path):
    pytest.importorskip("peft")
    from implicit_lm.training.finetune import main
    from transformers import AutoModelForCausalLM

    final = main(command(workspace, tmp_path / "lora", "--max-steps", 3, "--lora-rank", 4)[3:])
    assert (final / "adapter" / "adapter_config.json").is_file()
    merged = load_file(final / "model.safetensors")
    base = load_file(workspace / "model" / "model.safetensors")
    assert not any("lora" in name for name in merged)
    changed = {name for name in base if not torch.equal(base[name], merged[name])}
    assert changed and all("in_proj" in name or "out_proj" in name for name in changed)  # only the adapted layers
    assert type(AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True)).__name__.startswith("Implicit")


def test_preset_model_source(tmp_path, capsys):
    from implicit_lm.training.finetune import load_model_and_tokenizer, main, parse_args

    args = parse_args(["--preset", "mamba2-130m-implicit", "--data", "x.npy", "--output-dir", str(tmp_path),
                       "--max-steps", "1"])
    model, tokenizer = load_model_and_tokenizer(args)
    assert model.config.hidden_size == 768 and model.config.num_hidden_layers == 24 and tokenizer is None
    with pytest.raises(SystemExit):
        main(["--preset", "mamba2-7b", "--data", "x.npy", "--output-dir", str(tmp_path), "--max-steps", "1"])
    assert "Unknown preset 'mamba2-7b'" in capsys.readouterr().err


def test_bf16_mixed_precision_on_cpu(workspace, tmp_path):
    # In a fresh process: accelerate's state is a per-process singleton fixed by the first Accelerator.
    result = run(command(workspace, tmp_path / "bf16", "--max-steps", 3, "--mixed-precision", "bf16"))
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [line["loss"] for line in log_lines(tmp_path / "bf16")]
    assert len(losses) == 3 and all(0 < loss < 10 for loss in losses)


def test_synthetic_word_problem_training(tmp_path):
    """`--data synthetic:A5`: per-position running-product labels, fresh batches every step, accuracy in the eval."""
    from implicit_lm.training.finetune import main

    tiny_mamba2(vocab_size=64, max_iterations=6, tolerance=0.05, eval_max_iterations=30).save_pretrained(
        tmp_path / "model"
    )
    args = ["--model", str(tmp_path / "model"), "--data", "synthetic:A5", "--eval-data", "synthetic:A5",
            "--eval-seq-len", "16", "--eval-batches", "2", "--output-dir", str(tmp_path / "run"), "--seq-len", "2",
            "--batch-size", "32", "--max-steps", "40", "--learning-rate", "1e-2"]
    main(args)
    lines = log_lines(tmp_path / "run")
    steps = [line for line in lines if "loss" in line]
    losses = [line["loss"] for line in steps]
    assert len(losses) == 40 and sum(losses[-5:]) < 0.85 * sum(losses[:5])  # the first position is learnt quickly
    evaluation = [line for line in lines if "eval_loss" in line][-1]
    assert 0 <= evaluation["eval_accuracy"] <= 1 and "eval_perplexity" not in evaluation
    with pytest.raises(SystemExit):  # the mixed task has 240 symbols, more than this vocabulary
        main([*args[:3], "synthetic:mixed:0.5", *args[4:6], "synthetic:mixed:0.5", *args[6:]])


# CI traces with aot_eager (dynamo and the autograd graphs, without inductor's code generation, which costs a minute
# on a 2-core machine); the inductor leg, which the state-tracking baselines train with, runs with -m slow.
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_training_matches_eager(tmp_path, monkeypatch, backend):
    """`--compile` (an explicit stack, as the state-tracking baselines train): the same losses and weights as the
    eager run to float tolerance, and the saved folder is the plain model's (no compile wrapper in the keys)."""
    from implicit_lm.training.finetune import main

    compile_in_place = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **options: compile_in_place(
        self, **{**options, "backend": backend}))

    tiny_mamba2(implicit=False, num_hidden_layers=1).save_pretrained(tmp_path / "model")
    args = ["--model", str(tmp_path / "model"), "--data", "synthetic:A5", "--seq-len", "8", "--batch-size", "4",
            "--max-steps", "3", "--learning-rate", "1e-2", "--weight-decay", "0"]
    main([*args, "--output-dir", str(tmp_path / "eager")])
    main([*args, "--output-dir", str(tmp_path / "compiled"), "--compile"])
    eager, compiled = ([line["loss"] for line in log_lines(tmp_path / run)] for run in ("eager", "compiled"))
    assert len(compiled) == 3 and compiled == pytest.approx(eager, rel=1e-4)
    eager_weights, compiled_weights = weights(tmp_path / "eager"), weights(tmp_path / "compiled")
    assert compiled_weights.keys() == eager_weights.keys()
    for name, tensor in eager_weights.items():
        torch.testing.assert_close(compiled_weights[name], tensor, rtol=1e-3, atol=1e-5, msg=name)
