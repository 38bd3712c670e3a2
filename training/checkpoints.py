"""Training checkpoints that resume without unpickling anything, and are checked before they are used.

`checkpoint-STEP/` holds these files and no others:

- `model.safetensors`: the full model weights (unwrapped; gathered onto the main process under FSDP), a tied weight
  stored once and its other names kept in the metadata (`aliases`);
- `optimizer.pt`: the optimizer's state dict, the same on every process (one process, DDP); under FSDP each process's
  own shard as `optimizer-RANK.pt`. Read back with `torch.load(weights_only=True)`, which builds tensors and plain
  containers only;
- `scheduler.json`: the learning-rate scheduler's state dict;
- `scaler.json`: the gradient scaler's state, when accelerate has one (fp16);
- `rng-RANK.json`: each process's random states (python, numpy, torch CPU, and CUDA when available);
- `training_state.json`, written last: the format, the step, the run's fingerprint, each file above with its size and,
  for a streamed corpus, the data stream's position (`data_position`, integers; `training.data.TextStream`).

Every process writes into `.checkpoint-STEP.partial-PID` (the main process's pid), which the main process renames when
complete; what a killed run left there is removed by the next one (`remove_stale_staging`). `newest_usable_checkpoint`
resumes from the newest checkpoint that `verify_checkpoint` passes, reporting each newer one with its fault.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from implicit_lm.files import give_usual_permissions, remove_stale_partials

logger = logging.getLogger(__name__)

FORMAT = 1
STATE_FILE = "training_state.json"
MODEL_FILE = "model.safetensors"
SCHEDULER_FILE = "scheduler.json"
SCALER_FILE = "scaler.json"
# Every file a checkpoint may hold besides the state file; anything else is refused by name, before any loading.
_CHECKPOINT_FILE = re.compile(r"model\.safetensors|optimizer(-\d+)?\.pt|scheduler\.json|scaler\.json|rng-\d+\.json")
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
_STAGING = re.compile(r"\.(checkpoint-\d+)\.(?:partial|replaced)-\d.*")
_EARLIER_STAGING = re.compile(r"\.checkpoint-\d+\.partial")  # earlier releases named it without the pid


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names it and says why."""


def checkpoint_folders(output_dir: Path) -> list[Path]:
    """The `checkpoint-STEP` folders in `output_dir`, newest first."""
    if not output_dir.is_dir():
        return []
    found = [path for path in output_dir.iterdir() if _CHECKPOINT.fullmatch(path.name) and path.is_dir()]
    return sorted(found, key=lambda path: int(path.name.split("-")[1]), reverse=True)


def foreign_checkpoint_entries(folder: Path) -> list[str]:
    """What in the checkpoint folder `folder` a run of ours does not write there (another tool's checkpoint of the
    same name, a user's file): `--overwrite` refuses to delete it."""
    return sorted(path.name + "/" * path.is_dir() for path in folder.iterdir()
                  if path.name != STATE_FILE and not (path.is_file() and _CHECKPOINT_FILE.fullmatch(path.name)))


def remove_stale_staging(output_dir: Path) -> None:
    """Remove what runs killed while saving left in `output_dir`: the staging folders of `final/` and of checkpoints
    whose process is gone (`implicit_lm.files.remove_stale_partials`, which logs each), and the pid-less checkpoint
    staging of earlier releases. A live process's staging (another run saving into this folder) is left alone."""
    if not output_dir.is_dir():
        return
    names = {"final"}
    for path in sorted(output_dir.iterdir()):
        if _EARLIER_STAGING.fullmatch(path.name):
            shutil.rmtree(path)
            logger.warning("Removed %s, left by a killed run", path)
        elif match := _STAGING.fullmatch(path.name):
            names.add(match.group(1))
    for name in sorted(names):
        remove_stale_partials(output_dir / name)


def main_process_pid(accelerator: Any) -> int:
    """The main process's pid, on every process: it names the staging folder they all write a checkpoint into."""
    from accelerate.utils import broadcast

    return int(broadcast(torch.tensor([os.getpid()], device=accelerator.device))[0])


def optimizer_file(accelerator: Any) -> str:
    """This process's optimizer file: its own shard under FSDP, else the one state every process shares."""
    from accelerate.utils import DistributedType

    sharded = accelerator.distributed_type == DistributedType.FSDP
    return f"optimizer-{accelerator.process_index}.pt" if sharded else "optimizer.pt"


def save_checkpoint(accelerator: Any, model: torch.nn.Module, optimizer: Any, scheduler: Any, output_dir: Path,
                    step: int, fingerprint: dict[str, Any], keep: int, owner: int,
                    data_position: dict[str, int] | None = None) -> Path:
    """Write `checkpoint-STEP` in `output_dir` (see the module docstring) and prune all but the newest `keep`. Every
    process calls it; `owner` is `main_process_pid`. A checkpoint of the same step already there (one a resume
    skipped as unusable) is replaced."""
    destination = output_dir / f"checkpoint-{step}"
    staging = output_dir / f".{destination.name}.partial-{owner}"
    weights = accelerator.get_state_dict(model)  # under FSDP every process takes part in gathering them
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # left by a killed run whose pid this process now has
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _save_weights(weights, staging / MODEL_FILE)
        _write_json(staging / SCHEDULER_FILE, scheduler.state_dict())
        if accelerator.scaler is not None:
            _write_json(staging / SCALER_FILE, accelerator.scaler.state_dict())
    name = optimizer_file(accelerator)
    if accelerator.is_main_process or name != "optimizer.pt":  # the shared state once, or every process's shard
        torch.save(optimizer.state_dict(), staging / name)
    _write_json(staging / f"rng-{accelerator.process_index}.json", _rng_state())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {path.name: path.stat().st_size for path in sorted(staging.iterdir())}
        state = {"format": FORMAT, "step": step, "fingerprint": fingerprint, "files": files}
        if data_position is not None:
            state["data_position"] = data_position
        _write_json(staging / STATE_FILE, state)
        if destination.exists():
            parked = output_dir / f".{destination.name}.replaced-{os.getpid()}"
            destination.rename(parked)
            staging.rename(destination)
            shutil.rmtree(parked)
        else:
            staging.rename(destination)
        for old in checkpoint_folders(output_dir)[keep:]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return destination


def verify_checkpoint(folder: Path) -> dict[str, Any]:
    """The state (`training_state.json`) of the checkpoint `folder` if it is complete and intact: the state file
    parses, it lists exactly the files in the folder (each one a checkpoint may hold) with their sizes, the weights'
    header and the JSON files parse. Else `CheckpointError` saying why; nothing is unpickled."""
    state_path = folder / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"{folder}: incomplete, no {STATE_FILE} (the file written last)")
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{state_path} does not parse: {error}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("files"), dict):
        raise CheckpointError(f"{folder}: not a checkpoint of this release (earlier releases saved accelerate's "
                              "state, which loads by unpickling, and is not resumed)")
    if not isinstance(state.get("step"), int) or "fingerprint" not in state:
        raise CheckpointError(f"{state_path} has no step or no fingerprint")
    position = state.get("data_position")
    if position is not None and not (
            isinstance(position, dict) and set(position) == {"row", "epoch", "documents", "offset"}
            and all(type(value) is int and value >= 0 for value in position.values())):
        raise CheckpointError(f"{state_path}: data_position {position!r} is not the position of a data stream")
    files = state["files"]
    present = {path.name for path in folder.iterdir()} - {STATE_FILE}
    unknown = sorted((present - files.keys()) | {name for name in files if not _CHECKPOINT_FILE.fullmatch(name)})
    if unknown:
        raise CheckpointError(f"{folder} holds {', '.join(unknown)}: not checkpoint files (refused, nothing loaded)")
    for name in (MODEL_FILE, SCHEDULER_FILE):
        if name not in files:
            raise CheckpointError(f"{folder}: {STATE_FILE} lists no {name}")
    for name, size in sorted(files.items()):
        path = folder / name
        if path.is_symlink() or not path.is_file():
            raise CheckpointError(f"{path} is missing" if not path.exists() else f"{path} is not a plain file")
        if path.stat().st_size != size:
            raise CheckpointError(f"{path} has {path.stat().st_size} bytes, {size} when written (cut short?)")
    for name in sorted(name for name in files if name == MODEL_FILE or name.endswith(".json")):
        try:
            if name == MODEL_FILE:
                with safe_open(folder / name, "pt"):
                    pass
            else:
                json.loads((folder / name).read_text())
        except (OSError, ValueError, SafetensorError) as error:
            raise CheckpointError(f"{folder / name} does not parse: {error}") from None
    return state


def newest_usable_checkpoint(output_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in `output_dir` that `verify_checkpoint` passes, with its state; each newer one is
    reported (a warning) with its fault. None when there are no checkpoints; `CheckpointError` listing every fault
    when none is usable."""
    faults = []
    for folder in checkpoint_folders(output_dir):
        try:
            state = verify_checkpoint(folder)
        except CheckpointError as error:
            faults.append(str(error))
            continue
        for fault in faults:
            logger.warning("Skipping an unusable checkpoint: %s", fault)
        return folder, state
    if faults:
        raise CheckpointError(f"no usable checkpoint in {output_dir}:\n  " + "\n  ".join(faults))
    return None


def load_model_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load the checkpoint's weights into the unwrapped `model` (before `accelerator.prepare`, which shards it under
    FSDP). Every name must match."""
    path = folder / MODEL_FILE
    with _reading(path):
        with safe_open(path, "pt") as file:
            aliases = json.loads((file.metadata() or {}).get("aliases", "{}"))
        weights = load_file(path)
        weights.update({alias: weights[name] for alias, name in aliases.items()})
        model.load_state_dict(weights)


def restore_training_state(folder: Path, state: dict[str, Any], accelerator: Any, optimizer: Any,
                           scheduler: Any) -> None:
    """Restore the optimizer (prepared), scheduler, gradient scaler and this process's random states from the
    verified checkpoint `folder` (`state`: its `training_state.json`). A scaler starts afresh if the checkpoint has
    none (saved without fp16)."""
    path = folder / optimizer_file(accelerator)
    with _reading(path):
        optimizer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    with _reading(folder / SCHEDULER_FILE):
        scheduler.load_state_dict(json.loads((folder / SCHEDULER_FILE).read_text()))
    if accelerator.scaler is not None and SCALER_FILE in state["files"]:
        with _reading(folder / SCALER_FILE):
            accelerator.scaler.load_state_dict(json.loads((folder / SCALER_FILE).read_text()))
    path = folder / f"rng-{accelerator.process_index}.json"
    with _reading(path):
        _set_rng_state(json.loads(path.read_text()))


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    try:
        yield
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"cannot load {path}: {error}") from error


def _write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=1))


def _save_weights(weights: dict[str, torch.Tensor], path: Path) -> None:
    # safetensors refuses tensors that share memory: a tied weight is written once, its other names recorded.
    tensors, aliases, seen = {}, {}, {}
    for name, tensor in weights.items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            tensors[name] = tensor.contiguous()
    save_file(tensors, path, metadata={"aliases": json.dumps(aliases)})
    give_usual_permissions(path)  # safetensors writes 0600; the other files get the usual mode


def _rng_state() -> dict[str, Any]:
    version, keys, gauss = random.getstate()
    kind, key, position, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(keys), gauss], "numpy": [kind, key.tolist(), position, has_gauss, cached],
             "torch": _hex(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = [_hex(generator) for generator in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    kind, key, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(key, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(_bytes_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_bytes_tensor(generator) for generator in state["cuda"]])


def _hex(generator_state: torch.Tensor) -> str:
    return generator_state.cpu().numpy().tobytes().hex()


def _bytes_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray.fromhex(text), dtype=torch.uint8)
