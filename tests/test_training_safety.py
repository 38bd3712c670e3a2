"""training.finetune's output folder and checkpoints: an earlier run is never silently replaced, a resume unpickles
nothing, a damaged checkpoint or log is reported and the newest good checkpoint used, what killed runs left half-written
is removed, and what is written gets the usual permissions."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, tiny_mamba2
from implicit_lm.training.finetune import main
from safetensors.torch import load_file

# Fresh word problems every step: no tokenizer or data file, and a step of the tiny explicit model takes milliseconds.
TRAINING = ["--data", "synthetic:A5", "--seq-len", "4", "--batch-size", "4", "--learning-rate", "1e-2"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("safety") / "model"
    tiny_mamba2(implicit=False, num_hidden_layers=1).save_pretrained(folder)
    return folder


def arguments(model_dir, output, *extra):
    return ["--model", str(model_dir), *TRAINING, "--output-dir", str(output), *map(str, extra)]


def exit_of(argv, capsys):
    """`main(argv)`'s exit status and stderr, for a run that is refused."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


def weights(output):
    return load_file(output / "final" / "model.safetensors")


def same_weights(first, second):
    return first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)


def losses(output):
    return [json.loads(line).get("loss") for line in (output / "train_log.jsonl").read_text().splitlines()]


# A run of 6 steps with checkpoints at steps 2 and 4; resumed with `--resume` added.
SIX_STEPS = ("--max-steps", 6, "--save-every", 2)


@pytest.fixture(scope="module")
def finished(model_dir, tmp_path_factory):
    """The uninterrupted `SIX_STEPS` run: its final weights and log are what any resume must reproduce."""
    output = tmp_path_factory.mktemp("finished") / "run"
    main(arguments(model_dir, output, *SIX_STEPS))
    return output


def killed_copy(finished, destination):
    """`finished` as a run killed after its step-4 checkpoint would have left it: no `final/`."""
    shutil.copytree(finished, destination)
    shutil.rmtree(destination / "final")
    return destination


def test_an_earlier_run_is_refused_unless_resumed_or_overwritten(model_dir, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    output = tmp_path / "run"
    main(arguments(model_dir, output, "--max-steps", 3, "--save-every", 1))
    before, log_before = weights(output), (output / "train_log.jsonl").read_text()

    # Run again without a flag (another seed): refused, naming what is there; the finished run is untouched.
    code, error = exit_of(arguments(model_dir, output, "--max-steps", 3, "--seed", 1), capsys)
    assert code == 2
    assert "holds an earlier run (checkpoint-1/, checkpoint-2/, train_log.jsonl, final/)" in error
    assert "--resume" in error and "--overwrite" in error
    assert same_weights(weights(output), before) and (output / "train_log.jsonl").read_text() == log_before
    # So is a run that started and has only its log so far.
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / "train_log.jsonl").write_text(log_before)
    code, error = exit_of(arguments(model_dir, tmp_path / "started", "--max-steps", 3), capsys)
    assert code == 2 and "holds an earlier run (train_log.jsonl)" in error

    # --resume of a finished run: nothing to do, its final/ is returned as it is.
    written = (output / "final" / "model.safetensors").stat().st_mtime_ns
    assert main(arguments(model_dir, output, "--max-steps", 3, "--resume")) == output / "final"
    assert "nothing to do" in caplog.text
    assert (output / "final" / "model.safetensors").stat().st_mtime_ns == written
    assert (output / "train_log.jsonl").read_text() == log_before

    # --overwrite refuses to delete a final/ holding what a run does not write there.
    (output / "final" / "my-notes.txt").write_text("mine")
    code, error = exit_of(arguments(model_dir, output, "--max-steps", 3, "--overwrite"), capsys)
    assert code == 2 and "my-notes.txt" in error and same_weights(weights(output), before)
    (output / "final" / "my-notes.txt").unlink()

    # ... and a checkpoint folder another tool wrote under the same name.
    (output / "checkpoint-7").mkdir()
    (output / "checkpoint-7" / "trainer_state.json").write_text("{}")
    code, error = exit_of(arguments(model_dir, output, "--max-steps", 3, "--overwrite"), capsys)
    assert code == 2 and "checkpoint-7" in error and "trainer_state.json" in error
    shutil.rmtree(output / "checkpoint-7")

    # --overwrite starts afresh: the earlier run's files go, a file of the user's beside them stays.
    (output / "notes.txt").write_text("mine")
    main(arguments(model_dir, output, "--max-steps", 2, "--seed", 1, "--overwrite"))
    assert (output / "notes.txt").read_text() == "mine"
    assert sorted(path.name for path in output.iterdir()) == ["final", "notes.txt", "train_log.jsonl"]
    assert not same_weights(weights(output), before) and len(losses(output)) == 2


@pytest.mark.parametrize("where", ["itself", "inside"])
def test_the_output_folder_never_holds_or_is_the_model_it_trains(model_dir, tmp_path, capsys, where):
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    before = {path.name: path.read_bytes() for path in model.iterdir()}
    output = model if where == "itself" else model / "run"
    code, error = exit_of(arguments(model, output, "--max-steps", 1, "--overwrite"), capsys)
    assert code == 2 and "--output-dir" in error and "--model" in error
    assert {path.name: path.read_bytes() for path in model.iterdir()} == before
    # A run whose folder contains the model would delete it with --overwrite (as final/, say).
    code, error = exit_of(["--model", str(model), *TRAINING, "--output-dir", str(tmp_path), "--max-steps", "1"], capsys)
    assert code == 2 and f"contains --model {model}" in error


class Payload:
    """Unpickling it runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def test_resume_unpickles_nothing(model_dir, finished, tmp_path, capsys):
    output = killed_copy(finished, tmp_path / "run")
    marker = tmp_path / "payload-ran"
    for folder in ("checkpoint-2", "checkpoint-4"):  # files accelerate's checkpoints held, and unpickled on resume
        for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl"):
            (output / folder / name).write_bytes(pickle.dumps(Payload(marker)))
    code, error = exit_of(arguments(model_dir, output, *SIX_STEPS, "--resume"), capsys)
    assert code == 2 and not marker.exists()
    assert "no usable checkpoint" in error and "custom_checkpoint_0.pkl" in error and "random_states_0.pkl" in error

    # A payload in place of a listed file, its recorded size forged to match: torch.load(weights_only=True) refuses.
    checkpoint = output / "checkpoint-4"
    for path in checkpoint.glob("*.pkl"):
        path.unlink()
    torch.save(Payload(marker), checkpoint / "optimizer.pt")
    state = json.loads((checkpoint / "training_state.json").read_text())
    state["files"]["optimizer.pt"] = (checkpoint / "optimizer.pt").stat().st_size
    (checkpoint / "training_state.json").write_text(json.dumps(state))
    code, error = exit_of(arguments(model_dir, output, *SIX_STEPS, "--resume"), capsys)
    assert code == 2 and not marker.exists()
    assert f"cannot load {checkpoint / 'optimizer.pt'}" in error


def cut_in_half(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def empty(folder):
    for path in folder.iterdir():
        path.unlink()


DAMAGES = {  # what a kill, a full disk or a lost write leaves; (damage, what the warning says)
    "weights cut short": (lambda folder: cut_in_half(folder / "model.safetensors"), "model.safetensors has"),
    "optimizer cut short": (lambda folder: cut_in_half(folder / "optimizer.pt"), "optimizer.pt has"),
    "empty folder": (empty, "incomplete, no training_state.json"),
    "state unparsable": (lambda folder: cut_in_half(folder / "training_state.json"), "does not parse"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_newest_checkpoint_is_skipped_for_an_older_one(model_dir, finished, tmp_path, caplog, damage):
    from implicit_lm.training.checkpoints import verify_checkpoint

    caplog.set_level(logging.INFO)
    output = killed_copy(finished, tmp_path / "run")
    harm, reason = DAMAGES[damage]
    harm(output / "checkpoint-4")
    main(arguments(model_dir, output, *SIX_STEPS, "--resume"))
    warning = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "checkpoint-4" in
                   r.getMessage())
    assert reason in warning
    assert f"Resumed from {output / 'checkpoint-2'} (step 2)" in caplog.text
    assert same_weights(weights(output), weights(finished)) and losses(output) == losses(finished)
    assert verify_checkpoint(output / "checkpoint-4")["step"] == 4  # written again by the resumed run


def test_without_a_usable_checkpoint_the_run_stops_with_one_message(model_dir, finished, tmp_path, capsys):
    output = killed_copy(finished, tmp_path / "run")
    cut_in_half(output / "checkpoint-4" / "model.safetensors")
    (output / "checkpoint-2" / "training_state.json").write_text(json.dumps({"step": 2, "fingerprint": {}}))
    code, error = exit_of(arguments(model_dir, output, *SIX_STEPS, "--resume"), capsys)
    assert code == 2 and "Traceback" not in error
    assert f"no usable checkpoint in {output}" in error and "--overwrite" in error
    assert "checkpoint-4/model.safetensors has" in error and "checkpoint-2: not a checkpoint of this release" in error


def test_a_log_line_cut_short_by_a_kill_is_dropped_any_other_bad_line_refused(model_dir, finished, tmp_path, capsys,
                                                                             caplog):
    output = killed_copy(finished, tmp_path / "run")
    log = output / "train_log.jsonl"
    log.write_text(log.read_text()[:-20])  # killed while writing its last line
    main(arguments(model_dir, output, *SIX_STEPS, "--resume"))
    assert "dropped its last line" in caplog.text
    assert losses(output) == losses(finished)

    output = killed_copy(finished, tmp_path / "damaged")
    lines = (output / "train_log.jsonl").read_text().splitlines()
    lines[1] = lines[1][:-20]
    (output / "train_log.jsonl").write_text("".join(line + "\n" for line in lines))
    code, error = exit_of(arguments(model_dir, output, *SIX_STEPS, "--resume"), capsys)
    assert code == 2 and f"{output / 'train_log.jsonl'}, line 2: not JSON" in error


@pytest.mark.parametrize("resume", [False, True])
def test_staging_left_by_killed_runs_is_removed_when_a_run_starts(model_dir, tmp_path, caplog, resume):
    output = tmp_path / "run"
    dead = [output / ".final.partial-99999999-abcdefgh", output / ".checkpoint-4.partial-99999999",
            output / ".checkpoint-2.partial"]  # the last as earlier releases named it
    live = output / f".checkpoint-6.partial-{os.getpid()}"  # another run, saving right now
    for folder in [*dead, live]:
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"half")
    main(arguments(model_dir, output, "--max-steps", 1, *(["--resume"] if resume else [])))
    assert not any(folder.exists() for folder in dead) and live.exists()
    for folder in dead:
        assert f"Removed {folder}, left by a killed run" in caplog.text


@pytest.mark.e2e  # real processes, killed or launched by accelerate
def test_a_run_killed_while_saving_leaves_nothing_behind_once_resumed(model_dir, tmp_path):
    """A real SIGKILL while a checkpoint is half-written (`--save-every 1`), then `--resume`: the staging is removed
    and the run ends as an uninterrupted one."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for attempt in range(5):  # the kill may land just after the save completed; then try again in a new folder
        output = tmp_path / f"run-{attempt}"
        command = [sys.executable, "-m", "implicit_lm.training.finetune",
                   *arguments(model_dir, output, "--max-steps", 40, "--save-every", 1)]
        process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline and not (
            any(output.glob("checkpoint-*")) and any(output.glob(".checkpoint-*/*"))  # a file in the staging
        ):
            time.sleep(0.001)
        process.send_signal(signal.SIGKILL)
        process.wait()
        left = sorted(path.name for path in output.glob(".checkpoint-*.partial-*"))
        if left:
            break
    else:
        pytest.fail("no kill landed while a checkpoint was being written")
    resumed = subprocess.run([*command, "--resume"], cwd=ROOT, env=environment, capture_output=True, text=True,
                             timeout=600, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from" in resumed.stderr
    assert all(f"{name}, left by a killed run" in resumed.stderr for name in left)
    assert [path.name for path in output.iterdir() if path.name.startswith(".")] == []
    main(arguments(model_dir, tmp_path / "uninterrupted", "--max-steps", 40))
    assert same_weights(weights(output), weights(tmp_path / "uninterrupted"))


def test_a_checkpoint_restores_the_scaler_and_every_random_state(tmp_path):
    """What accelerate's load_state restored: the fp16 gradient scaler (accelerate has one on GPUs only, so one is
    given here) and the python, numpy and torch random states."""
    import random

    import numpy as np
    from accelerate import Accelerator
    from implicit_lm.training.checkpoints import restore_training_state, save_checkpoint, verify_checkpoint
    from implicit_lm.training.schedule import make_scheduler

    accelerator = Accelerator()
    model = tiny_mamba2(implicit=False, num_hidden_layers=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = make_scheduler(optimizer, total_steps=4, warmup_steps=1, decay_start=2, min_lr=1e-5)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.scaler = torch.amp.GradScaler("cpu")
    accelerator.scaler.scale(torch.ones(()))
    accelerator.scaler.update(new_scale=256.0)
    optimizer.step()
    scheduler.step()
    folder = save_checkpoint(accelerator, model, optimizer, scheduler, tmp_path, 1, {}, 2, os.getpid())
    assert "scaler.json" in verify_checkpoint(folder)["files"]
    draws = random.random(), np.random.rand(), torch.rand(3)

    accelerator.scaler = torch.amp.GradScaler("cpu")
    scheduler.step()
    restore_training_state(folder, verify_checkpoint(folder), accelerator, optimizer, scheduler)
    assert accelerator.scaler.get_scale() == 256.0 and scheduler.last_epoch == 1
    again = random.random(), np.random.rand(), torch.rand(3)
    assert again[:2] == draws[:2] and torch.equal(again[2], draws[2])


def test_written_files_get_the_usual_permissions(model_dir, tmp_path):
    output = tmp_path / "run"
    previous = os.umask(0o022)
    try:
        main(arguments(model_dir, output, "--max-steps", 3, "--save-every", 1))
    finally:
        os.umask(previous)
    written = [output, *output.rglob("*")]
    assert any(path.parent.name == "checkpoint-2" for path in written) and (output / "final").is_dir()
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path
