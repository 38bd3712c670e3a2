"""Reproduce the paper's state-tracking result at small scale (Figure 1 right, Figure 3) on a CPU.

Trains, on word problems of length <= 32 only (`synthetic:A5` by default), an implicit Mamba2, the weight-tied
unrolled baseline (the same block applied a fixed number of times, gradient through every application) and explicit
Mamba2s of 1 to 4 layers, then evaluates every model on fresh problems of lengths 32, 64, 128 and 256 in sequential
and simultaneous mode (eval/state_tracking.py): per-token accuracy and solver iterations vs length, as a table
(`results.md`), `length_generalization.json` and `length_generalization.png`.

    implicit-lm experiment state-tracking --output-dir runs/state-tracking [--jobs 2] [--bundle-dir models]

Every model trains in two stages with `implicit-lm finetune` (what mattered at this scale, see
docs/BENCHMARKS.md): stage 1 on length 8 with a large learning rate, where the loss sits at chance for several
hundred steps and then drops; stage 2 from stage 1's weights on length 32, with the solver allowed to converge
(implicit) and the learning rate annealed. Stages run as subprocesses, `--jobs` at a time, each with its share of
the cores; a stage whose `final/` folder exists is not retrained, so an interrupted run continues where it stopped.
Each stage's log is `<model>/stage-N.log` beside its `train_log.jsonl`.

`--bundle-dir DIR` copies the implicit model and the strongest explicit baseline (the 4-layer one: more parameters
than the implicit model) into DIR as Hub-layout folders with model cards and their measured accuracy
(`state_tracking.json`), which the package's demo and regression tests read.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from implicit_lm.eval.state_tracking import format_table, length_generalization, plot_length_generalization
from implicit_lm.training.curriculum import Curriculum, Phase
from implicit_lm.training.runner import all_threads, finetune_command, run_logged, run_parallel, threads_per_job
from tqdm.auto import tqdm

from implicit_lm.files import atomic_output, atomic_write, write_json
from implicit_lm.models import load_model
from implicit_lm.provenance import run_metadata
from implicit_lm.tasks.word_problems import get_monoid, word_problem_tokenizer

EVAL_LENGTHS = (32, 64, 128, 256)
TRAIN_LENGTH = 32
EVAL_SEED = 1  # test sets: seeds EVAL_SEED + stride * length, never the training stream's
# The models copied by --bundle-dir: the implicit model and its strongest explicit baseline.
BUNDLED = ("implicit-mamba2", "mamba2-4layer")


@dataclass(frozen=True)
class Stage:
    """One `training.finetune` run: sequence length, optimizer steps, peak learning rate and when the square-root
    decay starts (fraction of the steps), and the solver settings it trains with (a one-phase curriculum)."""

    seq_len: int
    steps: int
    learning_rate: float
    decay_start: float
    max_iterations: int
    tolerance: float | None  # None: exactly max_iterations iterations
    phantom_steps: int


@dataclass(frozen=True)
class ModelSpec:
    """A model of the experiment: its name, depth, whether it runs the solver, its backward (`phantom` or
    `unrolled`), the iteration cap at test time and its two training stages."""

    name: str
    layers: int
    implicit: bool
    backward: str
    eval_max_iterations: int
    stages: tuple[Stage, ...]


# The 1-layer implicit model: stage 1 solves with at most 8 iterations and 2 phantom steps, stage 2 with up to 32
# iterations (relative residual 0.01) and 4 phantom steps; at test time up to 128 iterations per solve.
IMPLICIT_STAGES = (
    Stage(seq_len=8, steps=2000, learning_rate=3e-3, decay_start=0.9, max_iterations=8, tolerance=0.01,
          phantom_steps=2),
    Stage(seq_len=TRAIN_LENGTH, steps=800, learning_rate=1e-3, decay_start=0.9, max_iterations=32, tolerance=0.01,
          phantom_steps=4),
)
# The unrolled baseline: the same weight-tied block applied exactly 8 times in training and at test time (an unrolled
# backward differentiates every iteration; the config's phantom steps, >= 1, are unused).
UNROLLED_DEPTH = 8
UNROLLED_STAGES = tuple(
    dataclasses.replace(stage, max_iterations=UNROLLED_DEPTH, tolerance=None, phantom_steps=1)
    for stage in IMPLICIT_STAGES
)


def default_specs() -> list[ModelSpec]:
    specs = [
        ModelSpec("implicit-mamba2", 1, True, "phantom", 128, IMPLICIT_STAGES),
        ModelSpec(f"unrolled-mamba2-{UNROLLED_DEPTH}x", 1, True, "unrolled", UNROLLED_DEPTH, UNROLLED_STAGES),
    ]
    # Explicit models ignore the solver settings of a stage.
    specs += [ModelSpec(f"mamba2-{n}layer", n, False, "phantom", 1, IMPLICIT_STAGES) for n in (1, 2, 3, 4)]
    return specs


def build_config(spec: ModelSpec, group_size: int, hidden_size: int) -> Any:
    """The small Mamba2 of the experiment: hidden 64, state 16, heads of 16 channels, one group; the vocabulary is
    the group's elements padded to a multiple of 16 (64 for A5), as Mamba pads its vocabularies."""
    from modeling_implicit import ImplicitMamba2Config

    first = spec.stages[0]
    # A stage without a tolerance runs a fixed count, in training and (the unrolled baseline) at test time.
    stop = {"early_stop": False} if first.tolerance is None else {"tolerance": first.tolerance}
    return ImplicitMamba2Config(
        vocab_size=-(-group_size // 16) * 16, hidden_size=hidden_size, num_hidden_layers=spec.layers, state_size=16,
        head_dim=16, n_groups=1, chunk_size=32, implicit=spec.implicit, backward=spec.backward,
        max_iterations=first.max_iterations, phantom_steps=first.phantom_steps,
        eval_max_iterations=spec.eval_max_iterations, **stop,
    )


def stage_command(spec: ModelSpec, index: int, model_dir: Path, group: str, batch_size: int, seed: int
                  ) -> tuple[list[str], Path]:
    """The finetune command of stage `index` of `spec` and the folder it trains into."""
    stage = spec.stages[index]
    output = model_dir / f"stage-{index + 1}"
    curriculum_path = "none"  # explicit models: no solver to configure
    if spec.implicit:
        curriculum_path = model_dir / f"stage-{index + 1}-curriculum.json"
        Curriculum((Phase(f"stage-{index + 1}", 1.0, stage.max_iterations, stage.tolerance, stage.phantom_steps,
                          spec.backward),)).save(curriculum_path)
    source = ["--model", str(model_dir / "config"), "--random-init"] if index == 0 else [
        "--model", str(model_dir / f"stage-{index}" / "final")]
    command = finetune_command(
        *source,
        "--data", f"synthetic:{group}", "--eval-data", f"synthetic:{group}", "--eval-seq-len", str(TRAIN_LENGTH),
        "--seq-len", str(stage.seq_len), "--batch-size", str(batch_size), "--max-steps", str(stage.steps),
        "--learning-rate", str(stage.learning_rate), "--decay-start", str(stage.decay_start),
        "--min-lr", "1e-5", "--warmup-steps", str(min(20, int(stage.steps * stage.decay_start))),
        "--weight-decay", "0", "--max-grad-norm", "1.0",
        "--curriculum", str(curriculum_path), "--eval-every", str(max(stage.steps // 4, 1)), "--eval-batches", "2",
        "--seed", str(seed), "--output-dir", str(output),
    )
    return command, output


def train_model(spec: ModelSpec, run_dir: Path, group: str, hidden_size: int, batch_size: int, seed: int,
                threads: int) -> dict[str, Any]:
    """Both stages of one model (skipping finished ones); returns the seconds each stage took when it ran."""
    model_dir = run_dir / spec.name
    model_dir.mkdir(parents=True, exist_ok=True)
    build_config(spec, get_monoid(group).size, hidden_size).save_pretrained(model_dir / "config")
    seconds = []
    for index in range(len(spec.stages)):
        command, output = stage_command(spec, index, model_dir, group, batch_size, seed)
        seconds.append(run_logged(command, model_dir / f"stage-{index + 1}.log", threads,
                                  done=output / "final" / "config.json"))
    return {"name": spec.name, "stage_seconds": seconds}


def final_folder(run_dir: Path, spec: ModelSpec) -> Path:
    return run_dir / spec.name / f"stage-{len(spec.stages)}" / "final"


def write_bundle(staging: Path, source: Path, spec: ModelSpec, entry: dict[str, Any], folder_name: str, group: str,
                 num_samples: int) -> None:
    """Fill `staging` with the trained model of `spec`, its tokenizer, card and measured figures."""
    from implicit_lm.model_cards import render_demo_model_card

    from modeling_implicit import ImplicitMamba2Config

    shutil.copytree(source, staging, dirs_exist_ok=True)
    word_problem_tokenizer(group).save_pretrained(staging)  # token ids = element indices, for pipelines
    # An implicit bundle's generate() reads prompts as the RNN (`prefill_mode`), as the figures measure.
    config = ImplicitMamba2Config.from_pretrained(staging, **({"prefill_mode": "sequential"} if spec.implicit else {}))
    if spec.implicit:
        config.save_pretrained(staging)
        summary = (
            f"A one-block **implicit Mamba2** ({entry['parameters']:,} parameters) that learned the {group} word "
            f"problem from sequences of length <= {TRAIN_LENGTH} only, and tracks the state of sequences several "
            "times longer (Results). In sequential mode it is an RNN whose state transition is the fixed point of "
            "the block: the reproduction, at small scale, of Figure 1 (right) of *Implicit Language Models are "
            "RNNs*."
        )
    else:
        summary = (
            f"The **explicit baseline** of `implicit-mamba2-{group.lower()}`: a {spec.layers}-block Mamba2 with "
            f"more parameters ({entry['parameters']:,}), the same data, schedule and number of optimizer steps, "
            "and no solver. It does not learn the word problem: a constant-depth model with linear recurrences "
            f"cannot track the state of a non-solvable group such as {group} (section 2 of the paper)."
        )
    task = (
        f"The input is a sequence of {group} elements (token id = element index in lexicographic order of the "
        "permutations, identity = 0) and the label at position t is the running product x_0 * x_1 * ... * x_t "
        f"(`implicit_lm/tasks/word_problems.py`). Training: word problems of length 8, then of length {TRAIN_LENGTH}, drawn "
        "fresh every step; the two stages and their solver settings are in `training/state_tracking_experiment"
        ".py`."
    )
    usage = (
        "```python\nimport torch\nfrom transformers import AutoModelForCausalLM, pipeline\n"
        "from implicit_lm.tasks import word_problem   # from the implicit-lm package\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("models/{folder_name}", trust_remote_code=True).eval()\n'
        f'tokens, labels = word_problem("{group}", num_samples=8, length=256, seed=0)\n'
        + "with torch.no_grad():\n"
        + ('    # token by token, each iterated to its fixed point (this call only: model.config is unchanged)\n'
           '    outputs = model(input_ids=tokens.long(), solver_overrides={"inference_mode": "sequential"})\n'
           if spec.implicit else "    outputs = model(input_ids=tokens.long())\n")
        + "predicted = outputs.logits.argmax(-1)\n"
        "print((predicted == labels.long()).float().mean())   # per-token accuracy\n\n"
        "# The tokenizer's words are the elements in one-line notation (01234 is the identity): the first word\n"
        "# generated after a sequence of permutations is their product.\n"
        f'generator = pipeline("text-generation", model="models/{folder_name}", trust_remote_code=True)\n'
        'print(generator("01342 10324 12034 34012", max_new_tokens=1, return_full_text=False))\n```'
    )
    figures = (
        f"Per-token accuracy (and mean solver iterations) on {num_samples} fresh word problems per length, "
        f"measured {time.strftime('%Y-%m-%d')} on {run_metadata(argparse.Namespace())['machine']} "
        f"(`state_tracking.json`; the package's tests check the model still reaches them):\n\n"
        + format_table({folder_name: entry})
    )
    card = render_demo_model_card(
        config, model_name=folder_name, summary=summary, task=task, usage=usage, results=figures,
        command="implicit-lm experiment state-tracking --output-dir runs/state-tracking "
                "--bundle-dir models",
        tags=("state-tracking", "word-problem"),
    )
    (staging / "README.md").write_text(card)
    write_json(staging / "state_tracking.json", {
        "group": group, "train_length": TRAIN_LENGTH, "num_samples": num_samples, "seed": EVAL_SEED,
        "parameters": entry["parameters"], "implicit": entry["implicit"], "rows": entry["rows"],
    })


def bundle(run_dir: Path, bundle_dir: Path, specs: list[ModelSpec], results: dict[str, Any], group: str,
           num_samples: int) -> list[Path]:
    """Copy the implicit model and the 4-layer explicit baseline into `bundle_dir` with model cards and their
    measured figures (`state_tracking.json`, which the regression tests and the demo read)."""
    written = []
    for spec in specs:
        if spec.name not in BUNDLED:
            continue
        folder_name = f"{spec.name}-{group.lower()}"
        entry = results[spec.name]
        with atomic_output(bundle_dir / folder_name, folder=True) as staging:
            write_bundle(staging, final_folder(run_dir, spec), spec, entry, folder_name, group, num_samples)
        written.append(bundle_dir / folder_name)
    return written


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="implicit-lm experiment state-tracking", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output-dir", type=Path, required=True, help="run folder (models, logs, results)")
    parser.add_argument("--group", choices=("A5", "S5"), default="A5", help="the word problem (default A5)")
    parser.add_argument("--models", help="comma-separated subset of the model names (default: all)")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--jobs", type=int, default=2, help="models trained at once (default 2)")
    parser.add_argument("--num-samples", type=int, default=256, help="test sequences per length (default 256)")
    parser.add_argument("--steps-scale", type=float, default=1.0,
                        help="multiplies every stage's optimizer steps (default 1; small values for smoke runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bundle-dir", type=Path, help="copy the implicit and explicit models here (e.g. models)")
    args = parser.parse_args(argv)
    for name in ("hidden_size", "batch_size", "jobs", "num_samples", "steps_scale"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    specs = {spec.name: spec for spec in default_specs()}
    if args.models is not None:
        unknown = [name for name in args.models.split(",") if name not in specs]
        if unknown:
            parser.error(f"--models: unknown {unknown}; choose from {list(specs)}")
    if args.bundle_dir is not None and args.models is not None:
        missing = set(BUNDLED) - set(args.models.split(","))
        if missing:
            parser.error(f"--bundle-dir needs the models {sorted(missing)} in --models")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    specs = default_specs()
    if args.models is not None:
        specs = [spec for spec in specs if spec.name in args.models.split(",")]
    if args.steps_scale != 1.0:
        specs = [dataclasses.replace(spec, stages=tuple(
            dataclasses.replace(stage, steps=max(1, round(stage.steps * args.steps_scale))) for stage in spec.stages
        )) for spec in specs]
    args.output_dir.mkdir(parents=True, exist_ok=True)
    threads = threads_per_job(args.jobs)
    start = time.perf_counter()
    # The implicit models first: they take longest, so the parallel jobs finish together.
    order = sorted(specs, key=lambda spec: (not spec.implicit, -spec.layers))
    trained = run_parallel(
        lambda spec: train_model(spec, args.output_dir, args.group, args.hidden_size, args.batch_size, args.seed,
                                 threads),
        order, args.jobs, desc="models")
    timings = {timing["name"]: timing["stage_seconds"] for timing in trained}
    train_seconds = time.perf_counter() - start

    results = {}
    for spec in tqdm(specs, desc="evaluating", unit="model"):
        model, _ = load_model(str(final_folder(args.output_dir, spec)))
        with all_threads():
            rows = length_generalization(model, args.group, list(EVAL_LENGTHS), args.num_samples, seed=EVAL_SEED)
        results[spec.name] = {"path": str(final_folder(args.output_dir, spec)), "implicit": spec.implicit,
                              "parameters": sum(p.numel() for p in model.parameters()), "rows": rows,
                              "stage_seconds": timings.get(spec.name)}
    total_seconds = time.perf_counter() - start
    payload = {
        "group": args.group, "train_length": TRAIN_LENGTH, "num_samples": args.num_samples,
        "train_seconds": train_seconds, "total_seconds": total_seconds, "results": results,
        "specs": {spec.name: dataclasses.asdict(spec) for spec in specs}, "metadata": run_metadata(args),
    }
    write_json(args.output_dir / "length_generalization.json", payload)
    plot_length_generalization(results, args.output_dir / "length_generalization.png", TRAIN_LENGTH)
    table = format_table(results)
    stage_minutes = ", ".join(
        f"{name} " + " + ".join("?" if s is None else f"{s / 60:.1f}" for s in entry["stage_seconds"])
        for name, entry in results.items())
    summary = (f"{args.group}, trained on length <= {TRAIN_LENGTH}; {args.num_samples} test sequences per length. "
               f"This invocation: {train_seconds / 60:.1f} min training, {total_seconds / 60:.1f} min in all "
               f"({args.jobs} jobs, {threads} threads each). Minutes per stage when trained: {stage_minutes}.\n\n"
               f"{table}\n")
    atomic_write(args.output_dir / "results.md", lambda temporary: temporary.write_text(summary))
    print(summary)
    if args.bundle_dir is not None:
        for folder in bundle(args.output_dir, args.bundle_dir, specs, results, args.group, args.num_samples):
            print(f"bundled {folder}")
    return payload


if __name__ == "__main__":
    main()
