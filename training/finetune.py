"""Fine-tune (or train) an implicit LM with accelerate: the paper's curriculum, phantom gradients, exact resume.

    accelerate launch [--num_processes N] [--config_file training/accelerate_ddp.yaml] -m training.finetune \\
        --model DIR --data train.jsonl --seq-len 512 --batch-size 8 --max-steps 1000 --output-dir runs/my-run \\
        [--curriculum paper|none|FILE] [--eval-data val.jsonl --eval-every 100] [--save-every 100] \\
        [--resume | --overwrite]

(`implicit-lm finetune ...` runs the same thing in one process. Several processes on a machine without GPUs:
`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N -m training.finetune ...`; accelerate's own
`--cpu` flag starts a single process unless given an MPI host file.)

- Model: `--model DIR`, a Hub-layout folder of one of our models; with `--random-init` a folder holding only a
  config (or any of ours) is trained from a fresh initialisation; `--preset NAME` starts from one of the paper's 24
  reference configurations (conversion/presets.py), freshly initialised. `--lora-rank R` trains a PEFT LoRA adapter
  on the block projections instead of all weights (merged into the saved model).
- Data: `.txt`, `.jsonl` (field `--text-field`), `.npy` or `.pt` token ids, packed into rows of `--seq-len` tokens and
  served in a seeded order; or a synthetic word problem (`synthetic:S5`, `synthetic:A5`, `synthetic:mixed:P`, the
  paper's D_p) generated per batch and trained as per-position classification of the running product
  (training/data.py). `--eval-seq-len` evaluates at another length (length generalisation).
- Optimiser: AdamW (weight decay 0.1 on matrices only, betas (0.9, 0.95)), linear warm-up, constant, square-root
  decay to `--min-lr` from `--decay-start` (the paper's schedule, training/schedule.py); gradient accumulation,
  gradient clipping, mixed precision from accelerate's config (`--mixed-precision`).
- Curriculum (training/curriculum.py): phases with their fraction of the optimizer steps and solver settings, applied
  to the model config at phase boundaries. `paper` is the two-phase (4+1) -> (24+4) Mamba2 / (32+4) Llama recipe.
- Logs: a tqdm bar on the main process, `--report-to tensorboard` (accelerate's tracker, event files in
  `tensorboard/`), and `train_log.jsonl` in the output folder, one line per optimizer step (loss,
  learning rate, gradient norm, phase, solver iterations and residuals) and one per evaluation.
- Output folder: a folder holding an earlier run (`final/`, `train_log.jsonl` or checkpoints) is refused unless
  `--resume` continues it (a finished one has nothing left to do) or `--overwrite` starts afresh, deleting those and
  nothing else in the folder. What runs killed while saving left half-written is removed when the next run starts.
- Checkpoints: `--save-every N` writes `checkpoint-STEP/`: `model.safetensors` (the full weights), `optimizer.pt`
  (under FSDP each process's `optimizer-RANK.pt`), `scheduler.json`, `scaler.json` (fp16 only), `rng-RANK.json` (every
  process's random states) and, last, `training_state.json` (the step, which fixes the data position and curriculum
  phase, the run's fingerprint, and each file's size), into a hidden folder renamed when complete. Nothing in it is
  unpickled: the optimizer state loads with `torch.load(weights_only=True)`, and a checkpoint holding any other file
  is refused. `--resume` continues from the newest checkpoint that is complete and intact (a damaged newer one is
  reported and skipped); a run killed at any point and resumed ends with the same weights as an uninterrupted one
  (bitwise on CPU with fixed seeds). A checkpoint from another model, data, curriculum or batch layout is refused
  before any work.
- Result: `final/`, a Hub-layout folder with remote code (and the tokenizer), loadable with
  `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from implicit_lm.files import atomic_output, atomic_write, check_apart, foreign_entries
from modeling_implicit import IMPLICIT_MODEL_TYPES

from .checkpoints import (
    CheckpointError,
    checkpoint_folders,
    foreign_checkpoint_entries,
    load_model_weights,
    main_process_pid,
    newest_usable_checkpoint,
    remove_stale_staging,
    restore_training_state,
    save_checkpoint,
)
from .curriculum import Curriculum, CurriculumError, resolve_curriculum
from .data import (
    EVAL_SEED_OFFSET,
    SYNTHETIC_PREFIX,
    DataError,
    RowStream,
    SyntheticStream,
    TextStream,
    data_fingerprint,
    packed_rows,
    streaming_documents,
)
from .schedule import make_scheduler

logger = logging.getLogger(__name__)

LOG_FILE = "train_log.jsonl"
TRACKER_DIR = "tensorboard"  # `--report-to tensorboard`: accelerate's tracker writes its event files here
# Arguments that must match for a resume to continue the same run (the rest, e.g. --save-every, may change).
RESUME_ARGUMENTS = (
    "seq_len", "batch_size", "gradient_accumulation_steps", "max_steps", "learning_rate", "min_lr", "warmup_steps",
    "decay_start", "weight_decay", "adam_betas", "max_grad_norm", "seed", "text_field", "random_init", "preset",
    "eval_seq_len", "data_split", "streaming", "shuffle_buffer",
    "lora_rank", "lora_alpha", "lora_targets",
)


class TrainingError(ValueError):
    """Bad training input, found before any work is done."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="implicit-lm finetune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="Hub-layout folder of an implicit model")
    source.add_argument("--preset", help="a reference configuration (e.g. mamba2-130m-implicit), randomly initialised")
    parser.add_argument("--random-init", action="store_true", help="ignore any weights in --model: fresh init")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: --model's, if it has one)")
    parser.add_argument("--lora-rank", type=int, default=0,
                        help="train a LoRA adapter of this rank instead of all weights (needs peft; 0: off)")
    parser.add_argument("--lora-alpha", type=float, help="LoRA scaling numerator (default: 2 x rank)")
    parser.add_argument("--lora-targets", default="all-linear",
                        help="comma-separated module names, or 'all-linear' (every block projection; the default)")
    parser.add_argument("--data", required=True,
                        help="training data: .txt, .jsonl, .npy or .pt, a saved 🤗 dataset folder (e.g. `implicit-lm "
                             "corpus`'s DIR/dataset), or synthetic:S5|A5|mixed:P (word problems)")
    parser.add_argument("--data-split", default="train", help="split of a dataset folder --data (default train)")
    parser.add_argument("--streaming", action="store_true",
                        help="read --data lazily with 🤗 datasets (a saved dataset folder, a .jsonl, .json, .parquet, "
                             ".arrow or .txt file, compressed or not, or a folder of such shards), tokenized on the "
                             "fly: for corpora larger than memory")
    parser.add_argument("--shuffle-buffer", type=int, default=10_000,
                        help="--streaming: documents in the shuffle buffer (default 10000; 0: read in order)")
    parser.add_argument("--eval-data", help="held-out data (same forms), evaluated every --eval-every steps")
    parser.add_argument("--eval-split", default="validation",
                        help="split of a dataset folder --eval-data (default validation)")
    parser.add_argument("--eval-seq-len", type=int, help="row length of the evaluation data (default: --seq-len)")
    parser.add_argument("--text-field", default="text", help="the text field of .jsonl records (default: text)")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per packed row (default 512)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per process per micro-batch (default 8)")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--max-steps", type=int, required=True, help="optimizer steps")
    parser.add_argument("--learning-rate", type=float, default=3e-4, help="peak learning rate (default 3e-4)")
    parser.add_argument("--min-lr", type=float, default=1e-5, help="learning rate at the end of the decay (1e-5)")
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--decay-start", type=float, default=0.9,
                        help="fraction of the steps after which the square-root decay starts (default 0.9)")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--adam-betas", type=float, nargs=2, default=(0.9, 0.95))
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    parser.add_argument("--curriculum", default="none", help="'paper', 'none' (the config's settings) or a JSON/YAML")
    parser.add_argument("--eval-every", type=int, default=0, help="optimizer steps between evaluations (0: end only)")
    parser.add_argument("--eval-batches", type=int, default=8, help="micro-batches per evaluation (default 8)")
    parser.add_argument("--save-every", type=int, default=0, help="optimizer steps between checkpoints (0: none)")
    parser.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept (default 2)")
    continuation = parser.add_mutually_exclusive_group()
    continuation.add_argument("--resume", action="store_true",
                              help="continue the run in --output-dir from its newest usable checkpoint")
    continuation.add_argument("--overwrite", action="store_true",
                              help="start afresh in an --output-dir holding an earlier run, deleting its checkpoints, "
                                   "train_log.jsonl, final/ and tensorboard/ (nothing else)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute block activations")
    parser.add_argument("--compile", action="store_true",
                        help="compile the model's forward with torch.compile (inductor) before training: about 2x "
                             "faster steps for an explicit Mamba2 on a CPU, after a one-off compile of a minute or two")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], help="default: accelerate's config")
    parser.add_argument("--report-to", choices=["none", "tensorboard"], default="none",
                        help="also log every record of train_log.jsonl to this tracker (accelerate's), under "
                             f"--output-dir/{TRACKER_DIR}/")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("seq_len", "batch_size", "gradient_accumulation_steps", "max_steps", "eval_batches",
                 "keep_checkpoints"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("warmup_steps", "eval_every", "save_every", "shuffle_buffer"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")
    if args.lora_rank < 0:
        parser.error(f"--lora-rank must not be negative, got {args.lora_rank}")
    if not 0 <= args.decay_start <= 1:
        parser.error(f"--decay-start is a fraction of the steps in [0, 1], got {args.decay_start}")
    args.adam_betas = tuple(args.adam_betas)
    return args


def load_model_and_tokenizer(args: argparse.Namespace) -> tuple[torch.nn.Module, Any]:
    """Our model from `--model` (weights, or a fresh init with `--random-init`) or `--preset` (fresh init), and its
    tokenizer (or None)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import modeling_implicit  # noqa: F401  (registers the Auto classes, so the local code is what trains)

    if args.preset is not None:
        from implicit_lm.conversion.presets import preset_reference_config
        from implicit_lm.conversion.reference import config_from_reference

        try:
            config = config_from_reference(preset_reference_config(args.preset))
        except ValueError as error:
            raise TrainingError(f"--preset: {error}") from error
        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_config(config)
    else:
        if not (args.model / "config.json").is_file():
            raise TrainingError(f"--model {args.model}: no config.json there (expected a Hub-layout model folder)")
        config = AutoConfig.from_pretrained(args.model)
        if config.model_type not in IMPLICIT_MODEL_TYPES:
            raise TrainingError(f"--model {args.model} is a {config.model_type!r} model, not an implicit one")
        if args.random_init:
            torch.manual_seed(args.seed)
            model = AutoModelForCausalLM.from_config(config)
        else:
            if not any(args.model.glob("*.safetensors")) and not any(args.model.glob("*.bin")):
                raise TrainingError(f"--model {args.model} has no weights; pass --random-init to train from scratch")
            model = AutoModelForCausalLM.from_pretrained(args.model)
    has_tokenizer = args.model is not None and (args.model / "tokenizer_config.json").is_file()
    tokenizer_source = args.tokenizer or (args.model if has_tokenizer else None)
    tokenizer = None
    if tokenizer_source is not None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
        except Exception as error:
            raise TrainingError(f"Cannot load the tokenizer {tokenizer_source}: {error}") from error
    return model, tokenizer


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Turn on activation checkpointing of `model`'s blocks under the installed transformers' name for it:
    `activation_checkpointing_enable()` in the newest releases (not yet in 5.17), which deprecate
    `gradient_checkpointing_enable()`."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    (enable if enable is not None else model.gradient_checkpointing_enable)()


def add_lora(model: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    """Wrap `model` in a PEFT LoRA adapter (see docs/ARCHITECTURE.md for the targets); only the adapter trains."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise TrainingError("--lora-rank needs peft: pip install 'implicit-lm[train]'") from error
    targets = args.lora_targets if args.lora_targets == "all-linear" else args.lora_targets.split(",")
    config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha or 2 * args.lora_rank, target_modules=targets,
                        task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as error:  # a target that does not exist or cannot take an adapter
        raise TrainingError(f"--lora-targets {args.lora_targets}: {error}") from error


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (linear and embedding weights) only, not on norms, biases or SSM scalars."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def run_fingerprint(args: argparse.Namespace, model: torch.nn.Module, curriculum: Curriculum, processes: int) -> dict:
    """Everything a checkpoint must agree on to be resumed by this run."""
    config = model.config.to_dict()
    for field in ("max_iterations", "tolerance", "phantom_steps", "backward", "transformers_version"):
        config.pop(field, None)  # set by the curriculum, or irrelevant
    return {
        "model_config": config,
        "curriculum": curriculum.to_dict(),
        "data": data_fingerprint(args.data),
        "num_processes": processes,
        "arguments": {name: list(v) if isinstance(v := getattr(args, name), tuple) else v for name in RESUME_ARGUMENTS},
    }


def _differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = sorted(set(saved) | set(current))
        return [d for key in keys for d in _differences(saved.get(key), current.get(key), f"{prefix}{key}.")]
    return [] if saved == current else [f"{prefix.rstrip('.')}: checkpoint {saved!r}, now {current!r}"]


def earlier_run(output_dir: Path) -> list[Path]:
    """What a run wrote in `output_dir`: its checkpoints, `train_log.jsonl`, `final/` and, beside a run log, the
    tracker's `tensorboard/` (what `--overwrite` deletes)."""
    written = [output_dir / LOG_FILE, output_dir / "final"]
    if (output_dir / LOG_FILE).exists():
        written.append(output_dir / TRACKER_DIR)
    return checkpoint_folders(output_dir)[::-1] + [path for path in written if path.exists()]


def solver_summary(stats: list[Any]) -> dict[str, float]:
    """Mean/max iterations, mean final residual and converged fraction over the `solver_stats` of several forwards
    (empty for explicit models)."""
    stats = [s for s in stats if s is not None]
    if not stats:
        return {}
    iterations = torch.cat([s.iterations.flatten() for s in stats]).float()
    return {
        "iterations_mean": iterations.mean().item(),
        "iterations_max": int(iterations.max().item()),
        "residual_mean": torch.cat([s.residual.flatten() for s in stats]).float().mean().item(),
        "converged_fraction": torch.cat([s.converged.flatten() for s in stats]).float().mean().item(),
    }


def read_log(path: Path, step: int) -> list[str]:
    """The lines of the run log `path` up to optimizer step `step` (the resumed checkpoint's), so that the log of a
    resumed run equals an uninterrupted one's. A last line cut short (the run was killed while writing it) is dropped
    with a warning; any other line that is not a record is an error naming it."""
    if step == 0 or not path.is_file():
        return []
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    kept = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except ValueError as error:
            if number == len(lines) and not text.endswith("\n"):
                logger.warning("%s: dropped its last line, cut short when the run writing it was killed", path)
                break
            raise TrainingError(f"{path}, line {number}: not JSON ({error}); mend or delete that line, or start "
                                "afresh with --overwrite") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise TrainingError(f"{path}, line {number}: not a log record (no step); mend or delete that line, or "
                                "start afresh with --overwrite")
        if record["step"] <= step:
            kept.append(line)
    return kept


class RunLog:
    """`train_log.jsonl` on the main process: it starts as `kept` (the resumed run's lines, `read_log`; none for a new
    run), rewritten atomically, and gets a line per `write`."""

    def __init__(self, path: Path, enabled: bool, kept: list[str]):
        self.path, self.enabled = path, enabled
        if enabled:
            atomic_write(path, lambda staging: staging.write_text("".join(line + "\n" for line in kept)))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as file:
                file.write(json.dumps(record) + "\n")


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a log record, for a tracker (the step is its axis)."""
    return {key: value for key, value in record.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


def _fsdp_requested() -> bool:
    """Whether the launch asked accelerate for FSDP (`accelerate launch` exports its config as environment)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").strip().lower() in ("1", "true", "yes")


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return train(args)
    except (TrainingError, DataError, CurriculumError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def train(args: argparse.Namespace) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed

    tracking = args.report_to != "none"
    accelerator = Accelerator(mixed_precision=args.mixed_precision, log_with=args.report_to if tracking else None,
                              project_dir=args.output_dir if tracking else None)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        # Without GPUs, `accelerate launch --multi_gpu` starts N processes that each train alone on the same files.
        raise TrainingError(
            f"{launched} processes were launched but accelerate sees {accelerator.num_processes}: on a machine "
            "without GPUs, set ACCELERATE_USE_CPU=true (ACCELERATE_USE_CPU=true accelerate launch --multi_gpu "
            "--num_processes N ...)"
        )
    if _fsdp_requested() and accelerator.distributed_type != DistributedType.FSDP:
        # accelerate falls back without a word (no GPUs: plain DDP, or processes that each train alone).
        raise TrainingError(
            f"FSDP was asked for (ACCELERATE_USE_FSDP, set by `accelerate launch --use_fsdp` or an FSDP config) but "
            f"accelerate set up {accelerator.distributed_type.value} with {accelerator.num_processes} process(es), "
            "which would train unsharded; accelerate's FSDP needs GPUs (training/accelerate_fsdp.yaml). Drop the "
            "FSDP setting to train this way knowingly."
        )
    if (args.save_every or args.resume) and accelerator.distributed_type in (DistributedType.DEEPSPEED,
                                                                              DistributedType.MEGATRON_LM):
        # Their engines own the optimizer state, which these checkpoints save and restore.
        raise TrainingError(f"--save-every and --resume support one process, DDP and FSDP, not "
                            f"{accelerator.distributed_type.value}")
    try:  # --overwrite would delete an input inside the folder, and a run inside a model folder would mix into it
        model = args.model if args.model and (args.model / "config.json").is_file() else None  # else refused below
        check_apart(args.output_dir, {"--model": model, "--tokenizer": args.tokenizer})
    except ValueError as error:
        raise TrainingError(f"--output-dir: {error}") from None
    if accelerator.is_main_process:
        remove_stale_staging(args.output_dir)  # before looking for a finished run: it may restore a parked final/
    accelerator.wait_for_everyone()
    final = args.output_dir / "final"
    earlier = earlier_run(args.output_dir)
    if earlier and not (args.resume or args.overwrite):
        names = ", ".join(path.name + "/" * path.is_dir() for path in earlier)
        raise TrainingError(f"{args.output_dir} holds an earlier run ({names}): pass --resume to continue it, "
                            "--overwrite to start afresh (deleting those), or choose another --output-dir")
    if tracking and (args.output_dir / TRACKER_DIR).exists() and not (args.output_dir / LOG_FILE).exists():
        raise TrainingError(f"{args.output_dir / TRACKER_DIR} exists but no run of ours wrote it (no {LOG_FILE}); "
                            "--report-to would write into it: move it, or choose another --output-dir")
    if args.resume and final.is_dir():
        logger.info("%s is there: the run has finished, nothing to do (to train further, start a new run from it: "
                    "--model %s)", final, final)
        return final
    if args.overwrite:
        earlier_folders = [(final, foreign_entries(final) if final.is_dir() else [])]
        earlier_folders += [(path, foreign_checkpoint_entries(path)) for path in checkpoint_folders(args.output_dir)]
        for folder, foreign in earlier_folders:
            if foreign:
                raise TrainingError(f"--overwrite would delete {folder}, which holds what a run does not write there: "
                                    f"{', '.join(foreign[:8])}. Move those out first, or choose another --output-dir")
    set_seed(args.seed)
    # Everything that can be wrong is checked before the first step.
    model, tokenizer = load_model_and_tokenizer(args)
    curriculum = resolve_curriculum(args.curriculum, model.config)
    plan = curriculum.describe(args.max_steps)  # refuses a curriculum with more phases than steps
    layout = (accelerator.num_processes, accelerator.process_index)
    stream = make_stream(args.data, args.data_split, args.seq_len, args.seed, model, tokenizer, args, *layout)
    eval_stream = None
    if args.eval_data is not None:
        eval_stream = make_stream(args.eval_data, args.eval_split, args.eval_seq_len or args.seq_len,
                                  args.seed + EVAL_SEED_OFFSET, model, tokenizer, args, *layout, evaluation=True)
    fingerprint = run_fingerprint(args, model, curriculum, accelerator.num_processes)
    resume_from, start_step = None, 0
    if args.resume:
        try:
            found = newest_usable_checkpoint(args.output_dir)
        except CheckpointError as error:
            raise TrainingError(f"{error}\n--overwrite starts the run afresh") from None
        if found is None:
            logger.info("--resume: no checkpoint in %s, starting from step 0", args.output_dir)
        else:
            resume_from, state = found
            differences = _differences(state["fingerprint"], json.loads(json.dumps(fingerprint)))
            if differences:
                raise TrainingError(f"{resume_from} belongs to a different run:\n  " + "\n  ".join(differences))
            start_step = state["step"]
            if isinstance(stream, TextStream) and state.get("data_position") is not None:
                # Where the streamed corpus stood; without it the stream re-reads the data up to this step.
                if state["data_position"]["row"] != stream.rows_before(start_step * args.gradient_accumulation_steps):
                    raise TrainingError(f"{resume_from}: its data position does not match its step")
                stream.seek(state["data_position"])
    kept_log = read_log(args.output_dir / LOG_FILE, start_step)

    if args.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if args.lora_rank:
        model = add_lora(model, args)
    if args.compile:
        # In place (`nn.Module.compile`): the module stays the one that is saved, unwrapped and walked for solvers.
        model.compile()
    model.train()
    optimizer = torch.optim.AdamW(parameter_groups(model, args.weight_decay), lr=args.learning_rate,
                                  betas=args.adam_betas)
    scheduler = make_scheduler(optimizer, total_steps=args.max_steps, warmup_steps=args.warmup_steps,
                               decay_start=round(args.decay_start * args.max_steps), min_lr=args.min_lr)
    if resume_from is not None:
        load_model_weights(model, resume_from)  # unwrapped, before FSDP shards it
    # The scheduler is not prepared: accelerate would step it once per process per optimizer step.
    model, optimizer = accelerator.prepare(model, optimizer)
    if resume_from is not None:
        restore_training_state(resume_from, state, accelerator, optimizer, scheduler)
        logger.info("Resumed from %s (step %d)", resume_from, start_step)
    if accelerator.is_main_process:
        for path in earlier_run(args.output_dir) if args.overwrite else []:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            logger.info("--overwrite: deleted %s", path)
        args.output_dir.mkdir(parents=True, exist_ok=True)
        logger.info("Curriculum:\n%s", plan)
    accelerator.wait_for_everyone()
    owner = main_process_pid(accelerator)
    log = RunLog(args.output_dir / LOG_FILE, accelerator.is_main_process, kept_log)
    if tracking:
        settings = {key: value for key, value in vars(args).items() if isinstance(value, (int, float, str, bool))}
        accelerator.init_trackers(TRACKER_DIR, config=settings)

    phase = None
    progress = tqdm(range(start_step, args.max_steps), initial=start_step, total=args.max_steps,
                    desc="training", unit="step", disable=not accelerator.is_main_process)
    for step in progress:
        index = curriculum.phase_index(step, args.max_steps)
        if index != phase:
            phase = index
            overrides = curriculum.overrides(phase)  # the phase's solver settings, passed with every training forward
            current = curriculum.phases[phase]
            logger.info("step %d: phase %r %s", step, current.name, current.settings())
        start = time.perf_counter()
        loss_sum, stats = torch.zeros((), device=accelerator.device), []
        for micro in range(args.gradient_accumulation_steps):
            batch = to_device(stream.batch(step * args.gradient_accumulation_steps + micro), accelerator.device)
            sync = micro == args.gradient_accumulation_steps - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                loss, outputs, _ = forward_loss(model, batch, overrides)
                accelerator.backward(loss / args.gradient_accumulation_steps)
            loss_sum += loss.detach()
            stats.append(outputs.solver_stats)
        grad_norm = None
        if args.max_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm).item()
        learning_rate = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        loss = accelerator.reduce(loss_sum / args.gradient_accumulation_steps, reduction="mean").item()
        record = {
            "step": step + 1, "loss": loss, "learning_rate": learning_rate, "grad_norm": grad_norm,
            "phase": curriculum.phases[phase].name,
            "epoch": stream.epoch_of((step + 1) * args.gradient_accumulation_steps),
            **solver_summary(stats), "seconds": time.perf_counter() - start,
        }
        log.write(record)
        if tracking:
            accelerator.log(_scalars(record), step=step + 1)
        progress.set_postfix(loss=f"{loss:.3f}", it=f"{record.get('iterations_mean', 0):.1f}")
        done = step + 1
        if eval_stream is not None and ((args.eval_every and done % args.eval_every == 0) or done == args.max_steps):
            evaluation = {"step": done, **evaluate(model, eval_stream, args.eval_batches, accelerator)}
            log.write(evaluation)
            if tracking:
                accelerator.log(_scalars(evaluation), step=done)
        if args.save_every and done % args.save_every == 0 and done < args.max_steps:
            position = stream.position() if isinstance(stream, TextStream) else None
            save_checkpoint(accelerator, model, optimizer, scheduler, args.output_dir, done, fingerprint,
                            args.keep_checkpoints, owner, data_position=position)
    progress.close()
    if tracking:
        accelerator.end_training()
    return save_final(accelerator, model, tokenizer, args, curriculum.overrides(len(curriculum.phases) - 1))


def make_stream(spec: str, split: str, seq_len: int, seed: int, model: torch.nn.Module, tokenizer: Any,
                args: argparse.Namespace, num_processes: int, rank: int, evaluation: bool = False
                ) -> RowStream | TextStream | SyntheticStream:
    """A data file (or split of a dataset folder) packed into rows, read lazily with `--streaming`, or a synthetic
    word-problem task. `evaluation`: the held-out stream, whose first `--eval-batches` are read every time."""
    vocab_size = model.config.vocab_size
    if spec.startswith(SYNTHETIC_PREFIX):
        return SyntheticStream(spec, seq_len, args.batch_size, seed, vocab_size, num_processes, rank)
    if args.streaming:
        documents = streaming_documents(spec, split, args.text_field)
        if not evaluation:
            return TextStream(documents, tokenizer, seq_len, args.batch_size, seed, vocab_size, args.text_field,
                              args.shuffle_buffer, num_processes, rank, source=spec)
        # Evaluation reads the same first rows every time: those of its batches, in order, held in memory.
        reader = TextStream(documents, tokenizer, seq_len, args.batch_size * num_processes * args.eval_batches, seed,
                            vocab_size, args.text_field, shuffle_buffer=0, source=spec)
        return RowStream(reader.batch(0), args.batch_size, seed, num_processes, rank)
    rows = packed_rows(spec, tokenizer, seq_len, vocab_size, args.text_field, split)
    return RowStream(rows, args.batch_size, seed, num_processes, rank)


def to_device(batch: torch.Tensor | tuple[torch.Tensor, ...], device: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
    return tuple(t.to(device) for t in batch) if isinstance(batch, tuple) else batch.to(device)


def forward_loss(model: torch.nn.Module, batch: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                 solver_overrides: dict[str, Any] | None = None) -> tuple:
    """`(loss, outputs, accuracy)`: next-token loss for packed text; for `(tokens, labels)` word problems the
    per-position cross-entropy against the running-product labels and the per-token accuracy. `solver_overrides`
    (a curriculum phase's settings) apply to implicit models only: an explicit one runs no solver."""
    settings = {"solver_overrides": solver_overrides} if solver_overrides else {}
    if not isinstance(batch, tuple):
        outputs = model(input_ids=batch, labels=batch, use_cache=False, **settings)
        return outputs.loss, outputs, None
    tokens, labels = batch
    outputs = model(input_ids=tokens, use_cache=False, **settings)
    logits = outputs.logits.float()
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
    return loss, outputs, (logits.argmax(-1) == labels).float().mean()


@torch.no_grad()
def evaluate(model: torch.nn.Module, stream: RowStream | SyntheticStream, batches: int, accelerator: Any) -> dict:
    """Mean loss, perplexity (next-token data) or per-token accuracy (word problems) and solver statistics over the
    first `batches` micro-batches of `stream`, in eval mode (the inference iteration cap)."""
    model.eval()
    losses, accuracies, stats = [], [], []
    for index in range(batches):
        loss, outputs, accuracy = forward_loss(model, to_device(stream.batch(index), accelerator.device))
        losses.append(loss)
        accuracies.append(accuracy)
        stats.append(outputs.solver_stats)
    model.train()
    loss = accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()
    result = {"eval_loss": loss, **{f"eval_{k}": v for k, v in solver_summary(stats).items()}}
    if accuracies[0] is None:
        result["eval_perplexity"] = math.exp(min(loss, 700.0))
    else:
        result["eval_accuracy"] = accelerator.reduce(torch.stack(accuracies).mean(), reduction="mean").item()
    return result


def save_final(accelerator: Any, model: torch.nn.Module, tokenizer: Any, args: argparse.Namespace,
               final_settings: dict[str, Any]) -> Path:
    """The trained model as a Hub-layout folder (`final/`, remote code included; a LoRA adapter merged into the
    weights, and also saved on its own in `final/adapter/`), written atomically, its config recording the solver
    settings training ended with (`final_settings`, the last phase's). The full state dict is gathered on every
    process first (FSDP shards it)."""
    destination = args.output_dir / "final"
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        raw_model = accelerator.unwrap_model(model)
        with atomic_output(destination, folder=True) as staging:
            if args.lora_rank:
                raw_model.save_pretrained(staging / "adapter")
                saved = raw_model.merge_and_unload()
                saved.save_pretrained(staging)
            else:
                saved = raw_model
                saved.save_pretrained(staging, state_dict=state_dict)
            saved.config.with_overrides(final_settings).save_pretrained(staging)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
        logger.info("Saved the trained model to %s", destination)
    accelerator.wait_for_everyone()
    return destination


if __name__ == "__main__":
    main()
