"""Pretrain a small implicit Mamba2 and its explicit twin on real English, and measure the paper's language-modelling
results at that scale (Table 1's direction, Figure 2C, Figure 4, Table 6 / Figure 1 centre).

    implicit-lm experiment language-model --output-dir runs/language-model [--bundle-dir models] [--jobs 2]

1. The corpus (`implicit-lm corpus`: the King James Bible and Python's documentation from Debian packages, split by
   document, and a byte-level BPE tokenizer trained on the training split) is built in `OUTPUT/corpus` unless it is
   there.
2. Two models of the same architecture (`MODELS`: Mamba2 blocks, hidden size 256), the implicit one iterated to its
   fixed point with the input injected into every block, the explicit twin (`implicit=False`) evaluated once, train
   side by side (`--jobs`, each with its share of the cores) with `implicit-lm finetune` on the same token stream
   (same seed, packing and order) for the same steps: the implicit one under the paper's bounded-then-free curriculum
   scaled down (`CURRICULUM`). Each run writes `train_log.jsonl` and TensorBoard events as it goes and saves a
   checkpoint every `SAVE_EVERY` steps: an interrupted experiment, started again, resumes its runs where they stopped,
   and a run whose `final/` folder exists is not retrained.
3. The measurements (`measure_*`) run on the held-out split and write JSON and PNG files beside `results.md`.

`--bundle-dir DIR` copies both models with their tokenizer, card and figures into `DIR/implicit-mamba2-english` and
`DIR/mamba2-english`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from implicit_lm.training.curriculum import Curriculum, Phase
from implicit_lm.training.runner import all_threads, finetune_command, run_logged, run_parallel, threads_per_job

from implicit_lm.files import write_json

logger = logging.getLogger(__name__)

CORPUS = "corpus"
TRAIN_LENGTH = 128
BATCH_SIZE = 16
STEPS = 1200  # x 16 rows x 128 tokens: 2.46M tokens, about two thirds of an epoch of the corpus's 3.75M tokens
LEARNING_RATE = 2e-3
WARMUP_STEPS = 50
SAVE_EVERY = 50
SEED = 0
# The paper's curriculum (bounded (4+1) for 80%, then free (24+4) to a relative residual of 0.05), scaled to what
# 2 cores can afford: the free phase costs about 5x a bounded step, so it takes the last 10% with up to 16 iterations
# and 2 phantom steps.
CURRICULUM = Curriculum((
    Phase("bounded", 0.9, max_iterations=4, tolerance=None, phantom_steps=1),
    Phase("free", 0.1, max_iterations=16, tolerance=0.05, phantom_steps=2),
))


@dataclass(frozen=True)
class LanguageModel:
    name: str
    implicit: bool
    layers: int = 4
    hidden_size: int = 256


MODELS = (LanguageModel("implicit-mamba2-english", True), LanguageModel("mamba2-english", False))


def build_config(spec: LanguageModel, tokenizer: Any) -> Any:
    """The model's config: Mamba2 blocks of `hidden_size` (heads of 32, state 64), at most 64 iterations per token at
    test time. The trained model's config carries the curriculum's last phase (a relative residual of 0.05, what
    the measurements use)."""
    from modeling_implicit import ImplicitMamba2Config

    return ImplicitMamba2Config(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, num_hidden_layers=spec.layers, state_size=64,
        head_dim=32, n_groups=1, chunk_size=64, implicit=spec.implicit, tolerance=0.01, max_iterations=16,
        eval_max_iterations=64, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )


def ensure_corpus(output_dir: Path) -> None:
    from implicit_lm.training.corpus import build

    corpus = output_dir / CORPUS
    if not (corpus / "corpus.json").is_file():
        build(corpus, ["kjv", "python-docs"], vocab_size=8192)


def train_model(spec: LanguageModel, args: argparse.Namespace, threads: int) -> float | None:
    from transformers import AutoTokenizer

    corpus = args.output_dir / CORPUS
    model_dir = args.output_dir / spec.name
    tokenizer = AutoTokenizer.from_pretrained(corpus / "tokenizer")
    build_config(spec, tokenizer).save_pretrained(model_dir / "config")
    curriculum = "none"
    if spec.implicit:
        curriculum = str(model_dir / "curriculum.json")
        CURRICULUM.save(curriculum)
    command = finetune_command(
        "--model", str(model_dir / "config"), "--random-init", "--tokenizer", str(corpus / "tokenizer"),
        "--data", str(corpus / "dataset"), "--eval-data", str(corpus / "dataset"),
        "--seq-len", str(TRAIN_LENGTH), "--batch-size", str(BATCH_SIZE), "--max-steps", str(args.steps),
        "--learning-rate", str(LEARNING_RATE), "--min-lr", "1e-4", "--decay-start", "0.8",
        "--warmup-steps", str(min(WARMUP_STEPS, args.steps // 2)), "--curriculum", curriculum,
        "--eval-every", str(max(args.steps // 10, 1)), "--eval-batches", "8", "--seed", str(SEED),
        "--save-every", str(SAVE_EVERY), "--report-to", "tensorboard",
        "--output-dir", str(model_dir / "train"),
        "--resume",  # continues a run that was stopped; a folder without one starts afresh
    )
    return run_logged(command, model_dir / "train.log", threads, done=model_dir / "train" / "final" / "config.json")


# What the measurements read: held-out rows at the training length (packed), documents at 8x it for the length
# extrapolation, and the solver settings compared on the trained implicit model (sequential mode, equal tolerance).
EVAL_ROWS = 512
EXTRAPOLATION_LENGTH = 8 * TRAIN_LENGTH
EXTRAPOLATION_ROWS = 1000  # every held-out document that long (30 of the corpus's 84)
DUALITY_ROWS = 64
DUALITY_MAX_ITERATIONS = 256  # lets a whole row converge in simultaneous mode
SOLVER_ROWS = 32
SOLVER_TOLERANCE = 1e-3  # relative; as the random-weight solver figures in docs/BENCHMARKS.md
SOLVER_VARIANTS = {
    "picard": {"solver": "picard", "warm_start": "false"},
    "anderson": {"solver": "anderson", "warm_start": "false"},
    "picard + warm start": {"solver": "picard", "warm_start": "true"},
    "anderson + warm start": {"solver": "anderson", "warm_start": "true"},
}
ITERATION_CAPS = "1,2,4,8,16,32,64"
LASTWORD_CONTEXT_WORDS = 48
ROLLING_DOCUMENT_WORDS = 300
PROMPTS = ("And God said unto Moses,", "The :mod:`os` module provides")


def model_folder(args: argparse.Namespace, spec: LanguageModel) -> Path:
    return args.output_dir / spec.name / "train" / "final"


def eval_command(module: str, argv: list[str]) -> dict[str, Any]:
    """Run an `implicit-lm eval` command in this process and return its results."""
    import importlib

    return importlib.import_module(f"implicit_lm.eval.{module}").main(argv)


def data_options(args: argparse.Namespace, seq_len: int, rows: int) -> list[str]:
    return ["--data", str(args.output_dir / CORPUS / "dataset"), "--split", "validation", "--seq-len", str(seq_len),
            "--max-sequences", str(rows)]


def measure_perplexity(args: argparse.Namespace, spec: LanguageModel, folder: Path) -> dict[str, Any]:
    """Held-out perplexity at the training length (packed rows, simultaneous mode) and the loss per position on
    held-out documents of 8x the training length (one row per document)."""
    model = str(model_folder(args, spec))
    held_out = eval_command("perplexity", ["--model", model, *data_options(args, TRAIN_LENGTH, EVAL_ROWS),
                                           "--batch-size", "16", "--output-dir", str(folder / "perplexity")])
    extrapolation = eval_command("perplexity", [
        "--model", model, *data_options(args, EXTRAPOLATION_LENGTH, EXTRAPOLATION_ROWS), "--document-rows", "--batch-size", "2",
        "--train-length", str(TRAIN_LENGTH), "--bucket-size", str(TRAIN_LENGTH // 2),
        "--output-dir", str(folder / "extrapolation")])
    return {"held_out": held_out, "extrapolation": extrapolation}


def measure_duality(args: argparse.Namespace, spec: LanguageModel, folder: Path) -> dict[str, Any]:
    return eval_command("duality", [
        "--model", str(model_folder(args, spec)), *data_options(args, TRAIN_LENGTH, DUALITY_ROWS),
        "--batch-size", "16", "--eval-max-iterations", str(DUALITY_MAX_ITERATIONS), "--output-dir", str(folder)])


def measure_test_time_compute(args: argparse.Namespace, spec: LanguageModel, folder: Path) -> dict[str, Any]:
    return eval_command("solver_dynamics", [
        "--model", str(model_folder(args, spec)), *data_options(args, TRAIN_LENGTH, DUALITY_ROWS),
        "--batch-size", "16", "--iteration-caps", ITERATION_CAPS, "--output-dir", str(folder)])


def measure_solvers(args: argparse.Namespace, spec: LanguageModel, folder: Path) -> dict[str, Any]:
    """Picard, Anderson and warm starts at one tolerance (`SOLVER_TOLERANCE`) in sequential mode (where a warm start
    reuses the previous token's fixed point): iterations per token, wall time and the perplexity each reaches."""
    results = {}
    for name, settings in SOLVER_VARIANTS.items():
        overrides = [f"--{key.replace('_', '-')}={value}" for key, value in settings.items()]
        overrides.append(f"--tolerance={SOLVER_TOLERANCE}")
        result = eval_command("perplexity", [
            "--model", str(model_folder(args, spec)), *data_options(args, TRAIN_LENGTH, SOLVER_ROWS),
            "--batch-size", "16", "--inference-mode", "sequential", *overrides,
            "--output-dir", str(folder / re.sub(r"\W+", "-", name))])
        stats = result["solver_stats"]["per_token"]
        results[name] = {"perplexity": result["perplexity"], "iterations_per_token": stats["iterations_mean"],
                         "seconds": result["seconds"], "converged_fraction": stats["converged_fraction"],
                         "settings": settings}
    return results


def held_out_tasks(args: argparse.Namespace, folder: Path) -> list[str]:
    """Two lm-eval tasks from the held-out documents, as YAML (JSON) files in `folder`: a LAMBADA-style last-word
    task (the first words of each document, then predict the next word that is a plain word) and a rolling
    perplexity task over each document's first words."""
    from implicit_lm.tokens import dataset_documents

    texts = dataset_documents(args.output_dir / CORPUS / "dataset", "validation", "text")
    lastword, rolling = [], []
    for text in texts:
        words = text.split()
        rolling.append({"text": " ".join(words[:ROLLING_DOCUMENT_WORDS])})
        for index in range(LASTWORD_CONTEXT_WORDS, len(words)):
            if re.fullmatch(r"[A-Za-z]{3,}", words[index]):
                lastword.append({"context": " ".join(words[:index]), "target": " " + words[index]})
                break
    folder.mkdir(parents=True, exist_ok=True)
    tasks = {
        "heldout_lastword": (lastword, {
            "output_type": "loglikelihood", "doc_to_text": "{{context}}", "doc_to_target": "{{target}}",
            "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                            {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}),
        "heldout_text": (rolling, {
            "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
            "metric_list": [{"metric": name, "aggregation": aggregation, "higher_is_better": False}
                            for name, aggregation in (("word_perplexity", "weighted_perplexity"),
                                                      ("byte_perplexity", "weighted_perplexity"),
                                                      ("bits_per_byte", "bits_per_byte"))]}),
    }
    for name, (records, fields) in tasks.items():
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(record) + "\n" for record in records))
        spec = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
                "test_split": "test", **fields, "metadata": {"version": 1.0}}
        (folder / f"{name}.yaml").write_text(json.dumps(spec, indent=2))
    return list(tasks)


def measure_lm_eval(args: argparse.Namespace, spec: LanguageModel, folder: Path, tasks: list[str],
                    task_folder: Path) -> dict[str, Any]:
    """The held-out tasks through lm-eval's own `hf` model (its CLI, batch size 1: it pads longer batches without a
    mask) and through `implicit-lm eval harness`: the same scores from both."""
    model = str(model_folder(args, spec))
    output = folder / "hf"
    command = [sys.executable, "-m", "lm_eval", "--model", "hf",
               "--model_args", f"pretrained={model},trust_remote_code=True", "--tasks", ",".join(tasks),
               "--include_path", str(task_folder), "--batch_size", "1", "--device", "cpu",
               "--output_path", str(output)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"lm_eval --model hf failed:\n{done.stderr[-3000:]}")
    (results_file,) = sorted(output.rglob("results*.json"))[-1:]
    plain_hf = json.loads(results_file.read_text())["results"]
    ours = eval_command("harness", ["--model", model, "--tasks", ",".join(tasks), "--include-path",
                                    str(task_folder), "--batch-size", "4", "--output",
                                    str(folder / "harness.json")])["tasks"]
    scores = {}
    for task in tasks:
        metrics = {key.removesuffix(",none"): value for key, value in plain_hf[task].items()
                   if key.endswith(",none") and "stderr" not in key}
        scores[task] = {"lm_eval_hf": metrics, "implicit_lm_harness": {
            key: value for key, value in ours[task]["metrics"].items() if key in metrics}}
    return scores


def throughput(args: argparse.Namespace) -> dict[str, Any]:
    """Training tokens per second of both models from their logs, over the steps they trained side by side (the
    explicit twin's run), and the ratio expected from the iteration counts: a bounded implicit step is
    `iterations` forwards without a tape and `phantom_steps` forward+backward passes, an explicit step one
    forward+backward pass, with the cost of each measured on the explicit model."""
    logs = {}
    for spec in MODELS:
        path = args.output_dir / spec.name / "train" / "train_log.jsonl"
        logs[spec.name] = [json.loads(line) for line in path.read_text().splitlines() if '"loss"' in line]
    explicit, implicit = logs["mamba2-english"], logs["implicit-mamba2-english"]
    window = sum(line["seconds"] for line in explicit)
    elapsed, together = 0.0, []
    for line in implicit:
        if elapsed + line["seconds"] > window or line["phase"] != "bounded":
            break
        elapsed += line["seconds"]
        together.append(line)
    tokens_per_step = BATCH_SIZE * TRAIN_LENGTH
    rates = {"mamba2-english": tokens_per_step * len(explicit) / window,
             "implicit-mamba2-english": tokens_per_step * len(together) / max(elapsed, 1e-9)}
    forward, forward_backward = _step_costs(args)
    bounded = CURRICULUM.phases[0]
    expected = (bounded.max_iterations * forward + bounded.phantom_steps * forward_backward) / forward_backward
    free = [line for line in implicit if line["phase"] != "bounded"]
    return {
        "tokens_per_second": rates, "measured_ratio": rates["mamba2-english"] / rates["implicit-mamba2-english"],
        "expected_ratio": expected, "forward_seconds": forward, "forward_backward_seconds": forward_backward,
        "steps_compared": {"implicit": len(together), "explicit": len(explicit)},
        "free_phase_seconds_per_step": sum(line["seconds"] for line in free) / len(free) if free else None,
        "bounded_phase_seconds_per_step": sum(line["seconds"] for line in implicit if line["phase"] == "bounded")
        / max(1, sum(line["phase"] == "bounded" for line in implicit)),
        "explicit_seconds_per_step": window / len(explicit),
    }


def _step_costs(args: argparse.Namespace, repeats: int = 5) -> tuple[float, float]:
    """Seconds of one forward without a tape and of one forward+backward of the explicit model on a training batch,
    on one thread (as the models trained)."""
    from implicit_lm.models import intra_op_threads, load_model

    model, _ = load_model(str(model_folder(args, MODELS[1])))
    batch = torch.randint(0, model.config.vocab_size, (BATCH_SIZE, TRAIN_LENGTH),
                          generator=torch.Generator().manual_seed(0))
    timings: dict[str, list[float]] = {"forward": [], "forward_backward": []}
    with intra_op_threads(1):
        for _ in range(repeats):
            start = time.perf_counter()
            with torch.no_grad():
                model(batch)
            timings["forward"].append(time.perf_counter() - start)
            start = time.perf_counter()
            model(batch, labels=batch).loss.backward()
            timings["forward_backward"].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    return min(timings["forward"]), min(timings["forward_backward"])


def generations(args: argparse.Namespace, new_tokens: int = 40) -> dict[str, Any]:
    """Each prompt continued greedily by both models through `pipeline("text-generation")`, with the implicit
    model's solver iterations per generated token."""
    from implicit_lm.eval.stats import SolverStatsRecorder
    from transformers import pipeline

    samples: dict[str, Any] = {}
    for spec in MODELS:
        generator = pipeline("text-generation", model=str(model_folder(args, spec)), trust_remote_code=True)
        entries = []
        for prompt in PROMPTS:
            with SolverStatsRecorder(generator.model) as recorder:
                text = generator(prompt, max_new_tokens=new_tokens, do_sample=False, repetition_penalty=1.3,
                                 return_full_text=False)[0]["generated_text"]
            entry = {"prompt": prompt, "continuation": text}
            if spec.implicit:
                entry["iterations_per_token"] = recorder.summary()["per_token"]["iterations_mean"]
            entries.append(entry)
        samples[spec.name] = entries
    return samples


def loss_curves(args: argparse.Namespace, path: Path) -> None:
    from implicit_lm.eval.plots import new_figure, save_figure

    figure, axes = new_figure()
    axis = axes[0, 0]
    tokens_per_step = BATCH_SIZE * TRAIN_LENGTH
    for spec in MODELS:
        lines = [json.loads(line) for line in
                 (args.output_dir / spec.name / "train" / "train_log.jsonl").read_text().splitlines()]
        train = [line for line in lines if "loss" in line]
        evaluation = [line for line in lines if "eval_loss" in line]
        axis.plot([line["step"] * tokens_per_step / 1e6 for line in train], [line["loss"] for line in train],
                  alpha=0.5, linewidth=0.8, label=f"{spec.name} (train)")
        axis.plot([line["step"] * tokens_per_step / 1e6 for line in evaluation],
                  [line["eval_loss"] for line in evaluation], marker="o", label=f"{spec.name} (held out)")
    axis.set_xlabel("training tokens (millions)")
    axis.set_ylabel("loss (nats per token)")
    axis.set_ylim(top=8)
    axis.legend()
    save_figure(figure, path)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement of the experiment, each into its own folder under `OUTPUT/measurements`, summarised in
    `OUTPUT/language_model.json`. A measurement whose JSON is there is not run again."""
    root = args.output_dir / "measurements"
    summary_path = args.output_dir / "language_model.json"
    results: dict[str, Any] = json.loads(summary_path.read_text()) if summary_path.is_file() else {}

    def step(key: str, function: Any, *parameters: Any) -> None:
        if key not in results:
            logger.info("Measuring %s", key)
            start = time.perf_counter()
            with all_threads():
                results[key] = function(*parameters)
            results.setdefault("measure_seconds", {})[key] = time.perf_counter() - start
            write_json(summary_path, results)

    implicit = MODELS[0]
    task_folder = root / "tasks"
    for spec in MODELS:
        step(f"perplexity/{spec.name}", measure_perplexity, args, spec, root / spec.name)
    step("duality", measure_duality, args, implicit, root / implicit.name / "duality")
    step("test_time_compute", measure_test_time_compute, args, implicit, root / implicit.name / "solver_dynamics")
    step("solvers", measure_solvers, args, implicit, root / implicit.name / "solvers")
    tasks = held_out_tasks(args, task_folder)
    for spec in MODELS:
        step(f"lm_eval/{spec.name}", measure_lm_eval, args, spec, root / spec.name / "lm_eval", tasks, task_folder)
    step("throughput", throughput, args)
    step("generations", generations, args)
    loss_curves(args, args.output_dir / "loss_curves.png")
    extrapolation_plot(results, args.output_dir / "extrapolation.png")
    results["targets"] = targets(results)
    write_json(summary_path, results)
    (args.output_dir / "results.md").write_text(format_results(results))
    return results


def extrapolation_plot(results: dict[str, Any], path: Path) -> None:
    """Held-out loss per position bucket of both models out to 8x the training length (Figure 4)."""
    from implicit_lm.eval.plots import new_figure, save_figure

    figure, axes = new_figure()
    axis = axes[0, 0]
    for spec in MODELS:
        buckets = results[f"perplexity/{spec.name}"]["extrapolation"]["buckets"]
        axis.plot([(b["start"] + b["end"]) / 2 for b in buckets], [b["nll"] for b in buckets], marker="o",
                  label=spec.name)
    axis.axvline(TRAIN_LENGTH, color="grey", linestyle="--", label="training length")
    axis.set_xlabel("position in the document")
    axis.set_ylabel("held-out loss (nats per token)")
    axis.legend()
    save_figure(figure, path)


def targets(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each of the issue's targets, met or missed, with the figures that decide it."""
    implicit, explicit = (results[f"perplexity/{spec.name}"] for spec in MODELS)
    ppl = (implicit["held_out"]["perplexity"], explicit["held_out"]["perplexity"])
    duality = results["duality"]["perplexity"]
    gap = abs(duality["sequential"] - duality["simultaneous"]) / duality["simultaneous"]
    rise = {}
    for spec, entry in zip(MODELS, (implicit, explicit)):
        ranges = entry["extrapolation"]["extrapolation"]
        rise[spec.name] = ranges["8x"]["nll"] - ranges["1x"]["nll"]
    solvers = results["solvers"]
    picard = solvers["picard"]
    fewest = min((name for name in solvers if name != "picard"), key=lambda n: solvers[n]["iterations_per_token"])
    saving = 1 - solvers[fewest]["iterations_per_token"] / picard["iterations_per_token"]
    same_quality = abs(solvers[fewest]["perplexity"] / picard["perplexity"] - 1) <= 0.01
    speed = results["throughput"]
    return {
        "held_out_perplexity": {"met": ppl[0] <= ppl[1], "implicit": ppl[0], "explicit": ppl[1]},
        "duality_within_1_percent": {"met": gap <= 0.01, "relative_gap": gap, **duality,
                                     "token_match_rate": results["duality"]["token_match_rate"]},
        "extrapolation_rises_less": {"met": rise[MODELS[0].name] < rise[MODELS[1].name], "loss_rise_8x": rise},
        "solver_saves_30_percent": {"met": saving >= 0.3 and same_quality, "best": fewest, "saving": saving,
                                    "perplexity_within_1_percent": same_quality},
        "throughput": {"measured_ratio": speed["measured_ratio"], "expected_ratio": speed["expected_ratio"]},
    }


def format_results(results: dict[str, Any]) -> str:
    """The measurements as Markdown tables (results.md, the cards, docs/BENCHMARKS.md)."""
    implicit_name, explicit_name = (spec.name for spec in MODELS)
    met = targets(results)
    word = {True: "met", False: "missed"}
    lines = ["| | implicit-mamba2-english | mamba2-english | target |", "|---|---|---|---|"]
    held = met["held_out_perplexity"]
    lines.append(f"| held-out perplexity at {TRAIN_LENGTH} tokens | {held['implicit']:.2f} | {held['explicit']:.2f} | "
                 f"implicit <= explicit: {word[held['met']]} |")
    ranges = {name: results[f"perplexity/{name}"]["extrapolation"]["extrapolation"]
              for name in (implicit_name, explicit_name)}
    for key, entry in ranges[implicit_name].items():
        lines.append(f"| loss at positions [{entry['start']}, {entry['end']}) ({key}) | {entry['nll']:.3f} | "
                     f"{ranges[explicit_name][key]['nll']:.3f} | |")
    rise = met["extrapolation_rises_less"]
    lines.append(f"| loss rise from 1x to 8x the training length | {rise['loss_rise_8x'][implicit_name]:+.3f} | "
                 f"{rise['loss_rise_8x'][explicit_name]:+.3f} | implicit rises less: {word[rise['met']]} |")
    for task in ("heldout_lastword", "heldout_text"):
        scores = {name: results[f"lm_eval/{name}"][task] for name in (implicit_name, explicit_name)}
        for metric in scores[implicit_name]["lm_eval_hf"]:
            values = [scores[name]["lm_eval_hf"][metric] for name in (implicit_name, explicit_name)]
            same = all(math.isclose(scores[name]["lm_eval_hf"][metric],
                                    scores[name]["implicit_lm_harness"].get(metric, math.nan), rel_tol=1e-4)
                       for name in (implicit_name, explicit_name))
            lines.append(f"| lm-eval {task} {metric} (`--model hf`) | {values[0]:.4g} | {values[1]:.4g} | "
                         f"same from `implicit-lm eval harness`: {'yes' if same else 'no'} |")
    speed = results["throughput"]
    lines.append(f"| training tokens/s (side by side, 1 thread each) | "
                 f"{speed['tokens_per_second'][implicit_name]:.0f} | {speed['tokens_per_second'][explicit_name]:.0f} "
                 f"| ratio {speed['measured_ratio']:.2f}, expected {speed['expected_ratio']:.2f} |")
    duality = met["duality_within_1_percent"]
    text = "\n".join(lines) + "\n\n"
    text += (f"Duality (implicit, {results['duality']['tokens']} held-out tokens, iteration cap "
             f"{DUALITY_MAX_ITERATIONS}): perplexity {duality['simultaneous']:.3f} simultaneous, "
             f"{duality['sequential']:.3f} sequential ({100 * duality['relative_gap']:.2f}% apart, target 1%: "
             f"{word[duality['met']]}); {100 * duality['token_match_rate']:.1f}% identical argmax predictions.\n\n")
    curve = results["test_time_compute"]["test_time_compute"]["points"]
    text += "Test-time compute (implicit, simultaneous mode, held-out rows of the training length):\n\n"
    text += "| iteration cap | perplexity | next-token accuracy | iterations used |\n|---|---|---|---|\n"
    text += "".join(f"| {p['iteration_cap']} | {p['perplexity']:.2f} | {p['accuracy']:.3f} | "
                    f"{p['iterations_mean']:.1f} |\n" for p in curve)
    solvers = results["solvers"]
    saving = met["solver_saves_30_percent"]
    text += (f"\nSolvers on the trained LM (sequential mode, relative tolerance {SOLVER_TOLERANCE:g}, "
             f"{SOLVER_ROWS} held-out rows of {TRAIN_LENGTH} tokens):\n\n"
             "| solver | iterations per token | seconds | perplexity |\n|---|---|---|---|\n")
    text += "".join(f"| {name} | {entry['iterations_per_token']:.2f} | {entry['seconds']:.1f} | "
                    f"{entry['perplexity']:.3f} |\n" for name, entry in solvers.items())
    text += (f"\nFewest iterations: {saving['best']}, {100 * saving['saving']:.0f}% fewer than Picard "
             f"(target 30% at equal perplexity: {word[saving['met']]}).\n")
    return text


def card_results(results: dict[str, Any], spec: LanguageModel) -> list[Any]:
    """The model's held-out figures for its card's `model-index`."""
    from huggingface_hub import EvalResult

    dataset = {"dataset_type": "implicit-lm/english-kjv-python-docs", "dataset_name": "held-out documents (KJV "
               "chapters and Python documentation pages)", "dataset_split": "validation"}
    entries = [EvalResult(task_type="text-generation", task_name="language modelling", metric_type="perplexity",
                          metric_name=f"perplexity at {TRAIN_LENGTH} tokens",
                          metric_value=round(results[f"perplexity/{spec.name}"]["held_out"]["perplexity"], 3),
                          **dataset)]
    lastword = results[f"lm_eval/{spec.name}"]["heldout_lastword"]["lm_eval_hf"]
    entries.append(EvalResult(task_type="text-generation", task_name="held-out last word (LAMBADA style)",
                              metric_type="accuracy", metric_name="accuracy", metric_value=round(lastword["acc"], 4),
                              **dataset))
    return entries


def bundle(args: argparse.Namespace, results: dict[str, Any]) -> list[Path]:
    """Both models with their tokenizer, card and figures (`language_model.json`) as `bundle_dir/<name>`."""
    from implicit_lm.files import atomic_output

    written = []
    for spec in MODELS:
        destination = args.bundle_dir / spec.name
        with atomic_output(destination, folder=True) as staging:
            write_bundle(staging, args, results, spec)
        written.append(destination)
    return written


def write_bundle(staging: Path, args: argparse.Namespace, results: dict[str, Any], spec: LanguageModel) -> None:
    import shutil

    from implicit_lm.model_cards import render_demo_model_card

    from implicit_lm.provenance import run_metadata
    from modeling_implicit import ImplicitMamba2Config

    shutil.copytree(model_folder(args, spec), staging, dirs_exist_ok=True)
    config = ImplicitMamba2Config.from_pretrained(staging)
    corpus = json.loads((args.output_dir / CORPUS / "corpus.json").read_text())
    parameters = results[f"perplexity/{spec.name}"]["held_out"]["metadata"]["model"]["parameters"]
    train_seconds = (results.get("train_seconds") or {}).get(spec.name)
    tokens_seen = args.steps * BATCH_SIZE * TRAIN_LENGTH
    kind = ("an **implicit Mamba2**: its 4 Mamba2 blocks are iterated to a fixed point with the embedded input "
            "injected into every block, trained with phantom gradients under the paper's bounded-then-free "
            "curriculum scaled down" if spec.implicit else
            "an **explicit Mamba2** (`implicit=False`): the same 4 blocks applied once, the implicit model's twin")
    summary = (f"A small English language model ({parameters:,} parameters), {kind}. It and its twin were trained "
               f"on the same {tokens_seen / 1e6:.2f}M tokens to compare the two at small scale, in the spirit of "
               "*Implicit Language Models are RNNs*.")
    sources = "; ".join(f"{entry['description']} (Debian package `{entry['package']}` {entry['package_version']}, "
                        f"{entry['license']})" for entry in corpus["sources"])
    minutes = f"{train_seconds / 60:.0f} minutes" if train_seconds else "(time not recorded)"
    task = (f"Causal language modelling on an offline English corpus built by `implicit-lm corpus`: {sources}. "
            f"Split by document: {corpus['splits']['train']['documents']:,} training documents "
            f"({corpus['splits']['train']['tokens']:,} tokens), {corpus['splits']['validation']['documents']} "
            f"held out. Byte-level BPE tokenizer of {corpus['vocab_size']:,} tokens trained on the training split. "
            f"Trained at length {TRAIN_LENGTH}, batch {BATCH_SIZE}, {args.steps} steps ({tokens_seen:,} tokens "
            f"seen) on one thread of a 2-core CPU in {minutes}.")
    overrides = ', solver_overrides={"eval_max_iterations": 32}' if spec.implicit else ""
    usage = (
        "```python\nfrom transformers import pipeline\n\n"
        f'generator = pipeline("text-generation", model="models/{spec.name}", trust_remote_code=True)\n'
        f'print(generator("{PROMPTS[0]}", max_new_tokens=40, do_sample=False, repetition_penalty=1.3{overrides})'
        '[0]["generated_text"])\n```'
    )
    metadata = run_metadata(argparse.Namespace())
    figures = (f"Measured {time.strftime('%Y-%m-%d')} on {metadata['machine']} (`language_model.json`), both models "
               "side by side:\n\n" + format_results(results))
    samples = results.get("generations", {}).get(spec.name, [])
    if samples:
        figures += "\nGreedy continuations (repetition penalty 1.3):\n\n" + "\n".join(
            f"- *{sample['prompt']}*{sample['continuation']!r}" for sample in samples) + "\n"
    card = render_demo_model_card(
        config, model_name=spec.name, summary=summary, task=task, usage=usage, results=figures,
        command="implicit-lm experiment language-model --output-dir runs/language-model --bundle-dir models",
        tags=("english", "kjv", "python-docs"), eval_results=card_results(results, spec),
    )
    (staging / "README.md").write_text(card)
    write_json(staging / "language_model.json", {
        "parameters": parameters, "tokens_seen": tokens_seen, "train_seconds": train_seconds,
        "train_length": TRAIN_LENGTH, "corpus": corpus,
        "held_out_perplexity": results[f"perplexity/{spec.name}"]["held_out"]["perplexity"],
        "extrapolation": results[f"perplexity/{spec.name}"]["extrapolation"]["extrapolation"],
        "targets": results["targets"],
    })


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="implicit-lm experiment language-model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=STEPS, help=f"optimizer steps per model (default {STEPS})")
    parser.add_argument("--jobs", type=int, default=2, help="models trained at once (default 2)")
    parser.add_argument("--train-only", action="store_true", help="stop after training (measure later)")
    parser.add_argument("--bundle-dir", type=Path, help="copy both models with cards and figures here (e.g. models)")
    args = parser.parse_args(argv)
    for name in ("steps", "jobs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be positive")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    ensure_corpus(args.output_dir)
    threads = threads_per_job(args.jobs)
    seconds = run_parallel(lambda spec: train_model(spec, args, threads), MODELS, args.jobs, desc="models")
    if args.train_only:
        return {spec.name: {"train_seconds": value} for spec, value in zip(MODELS, seconds)}
    results = measure(args)
    results["train_seconds"] = {spec.name: value for spec, value in zip(MODELS, seconds)}
    write_json(args.output_dir / "language_model.json", results)
    if args.bundle_dir is not None:
        for path in bundle(args, results):
            logger.info("bundled %s", path)
    return results


if __name__ == "__main__":
    main()
