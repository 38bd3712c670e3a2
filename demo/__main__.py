"""Main job: the trained models bundled under `models/`, end to end through transformers, offline.

1. State tracking (the paper's Figure 1 right, at small scale), for S5 and A5: an implicit Mamba2 and a 16-layer
   explicit Mamba2 (the depth the paper needs to fit length 32 on S5), both trained on word problems of length <= 32
   only, answer fresh problems of lengths 32 to 256 in sequential mode; the implicit one also in simultaneous mode with
   an iteration cap of 2L (it reaches the sequential predictions: the duality of the modes) and with its own cap.
   Per-token accuracy, solver iterations (with the share of solves that converged) and agreement vs length, as tables
   and a PNG; then every model through `pipeline("text-generation")`, asked for the product of 200 permutations.
2. The tiny implicit story LM answers "where is ...?" questions about freshly generated stories through
   `pipeline("text-generation")`, with the solver iterations it spent on each answer.
3. English: the small implicit Mamba2 pretrained on the King James Bible and Python's documentation, and its explicit
   twin trained on the same tokens, continue a prompt through `pipeline("text-generation")`, with the solver
   iterations per token the implicit one spent and each model's recorded held-out perplexity.

Every model is loaded with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` (the remote code in
each folder, not this package's classes). Figures go to `outputs/demo/` (`demo.json`, `state_tracking.png`).
`implicit-lm demo-random` is the former main job: a random-weight model through the same APIs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from implicit_lm.eval.state_tracking import (
    NOT_CONVERGED_MESSAGE,
    duality_rows,
    format_table,
    length_generalization,
    plot_length_generalization,
)
from implicit_lm.eval.stats import SolverStatsRecorder

from implicit_lm.files import unresolved_code_links, write_json
from implicit_lm.models import intra_op_threads, threads_for_width
from implicit_lm.tasks.stories import generate_story
from implicit_lm.tasks.word_problems import element_names, word_problem

# The source checkout (an editable install): its models/ are the bundled models, outputs/ the default output folder.
ROOT = Path(__file__).resolve().parents[1]
GROUPS = ("S5", "A5")
# Bundled per group as `<base>-<group>`: the implicit model and the 16-layer explicit baseline.
STATE_TRACKING_BASES = ("implicit-mamba2", "mamba2-16layer")
STORY_MODEL = "implicit-mamba2-stories"
ENGLISH_MODELS = ("implicit-mamba2-english", "mamba2-english")
ENGLISH_PROMPT = "And God said unto Moses,"
# Test sets of the demo: seeds the bundled figures (state_tracking.json, stories.json) were not measured on.
DEMO_SEED = 2026


@contextlib.contextmanager
def _no_loading_bars() -> Iterator[None]:
    """transformers' "Loading weights" bars off while the demo prints its tables (each model is loaded between
    them); restored afterwards."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def load_bundled(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    if not (folder / "config.json").is_file():
        raise SystemExit(f"error: {folder} is not a model folder; the bundled models live in models/ of the repo "
                         "(implicit-lm experiment state-tracking / stories_experiment --bundle-dir models "
                         "rebuild them)")
    problem = unresolved_code_links(folder)
    if problem:
        raise SystemExit(f"error: {problem}")
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()


def evaluate_group(args: argparse.Namespace, group: str) -> dict[str, Any]:
    """Both bundled models of `group`: sequential accuracy at every test length; for the implicit one, simultaneous
    mode too, capped at 2L iterations and at the model's own cap, on a smaller set (the duality of the modes)."""
    results = {}
    for name in (f"{base}-{group.lower()}" for base in STATE_TRACKING_BASES):
        folder = args.models_dir / name
        model = load_bundled(folder)
        recorded = json.loads((folder / "state_tracking.json").read_text())
        start = time.perf_counter()
        rows = length_generalization(model, group, args.lengths, args.num_samples, seed=DEMO_SEED,
                                     modes=("sequential",), batch_size=args.num_samples)
        if recorded["implicit"] and args.duality_lengths:
            rows += duality_rows(model, group, args.duality_lengths, args.duality_samples, seed=DEMO_SEED)
        results[name] = {"parameters": sum(p.numel() for p in model.parameters()), "rows": rows,
                         "implicit": recorded["implicit"], "seconds": time.perf_counter() - start}
        print(f"{name}: {type(model).__name__} loaded with AutoModelForCausalLM(trust_remote_code=True), "
              f"{results[name]['parameters']:,} parameters, evaluated in {results[name]['seconds']:.0f} s")
    return results


def pipeline_products(args: argparse.Namespace, group: str, names: list[str]) -> dict[str, int]:
    """The models as text generators: the tokenizer's words are the elements in one-line notation, and the word
    generated after a sequence of permutations is their product."""
    from transformers import pipeline

    tokens, labels = word_problem(group, args.pipeline_prompts, args.pipeline_length, DEMO_SEED + 1)
    words = element_names(group)
    right = {}
    for name in names:
        generator = pipeline("text-generation", model=str(args.models_dir / name), trust_remote_code=True,
                             device="cpu")
        prompts = [" ".join(words[token] for token in row.tolist()) for row in tokens]
        outputs = generator(prompts, max_new_tokens=1, do_sample=False, return_full_text=False)
        answers = [output[0]["generated_text"].strip() for output in outputs]
        expected = [words[label] for label in labels[:, -1].tolist()]
        right[name] = sum(a == e for a, e in zip(answers, expected))
        print(f"  {name}: '{prompts[0][:23]} ... {prompts[0][-17:]}' -> {answers[0]} (product {expected[0]}); "
              f"{right[name]} of {args.pipeline_prompts} products right")
    return right


def state_tracking(args: argparse.Namespace) -> dict[str, Any]:
    panels = {}
    for group in args.groups:
        print(f"== State tracking: {group} word problems, trained on length <= 32; {args.num_samples} fresh "
              f"sequences per length in sequential mode, {args.duality_samples} in simultaneous mode ==")
        results = evaluate_group(args, group)
        print()
        print(format_table(results))
        implicit = [row for row in results[f"implicit-mamba2-{group.lower()}"]["rows"] if row["mode"] == "sequential"]
        print(
            "\nIterations per token (implicit, sequential mode): "
            + ", ".join(f"{row['iterations_mean']:.1f} at length {row['length']}" for row in implicit)
            + " -- flat in the length: each token is one fixed-point solve against the committed state. "
            "Simultaneous mode needs about L iterations (information crosses one position per iteration): with a "
            "cap of 2L it reaches the sequential predictions; the model's own cap stops it short on long inputs."
        )
        print(f"\npipeline('text-generation'): the product of {args.pipeline_length} {group} permutations, "
              f"{args.pipeline_prompts} prompts")
        for name, right in pipeline_products(args, group, list(results)).items():
            results[name]["pipeline_products_right"] = right
        print()
        panels[group] = results
    args.output_dir.mkdir(parents=True, exist_ok=True)
    plot_length_generalization(panels, args.output_dir / "state_tracking.png", train_length=32)
    print(f"Plot: {args.output_dir / 'state_tracking.png'}\n")
    return panels


def stories(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import pipeline

    print(f"== Story LM through pipeline('text-generation'): {args.stories} fresh stories ==")
    folder = args.models_dir / STORY_MODEL
    generator = pipeline("text-generation", model=str(folder), trust_remote_code=True, device="cpu")
    rng = random.Random(DEMO_SEED)
    answers = []
    for index in range(args.stories):
        events = rng.choice(args.story_events)
        story = generate_story(rng, events, events)  # a question after every event, as the LM was trained
        question = story.questions[-1]
        prompt = story.prompt(question)
        with SolverStatsRecorder(generator.model) as recorder, warnings.catch_warnings():
            # Reported below as the share of solves that converged.
            warnings.filterwarnings("ignore", message=NOT_CONVERGED_MESSAGE)
            text = generator(prompt, max_new_tokens=1, do_sample=False, return_full_text=False)[0]["generated_text"]
        answer = text.strip()
        stats = recorder.summary()
        solve = stats["per_token"] or stats["per_sequence"]
        answers.append({"events": len(story.events), "question": question.text, "answer": answer,
                        "expected": question.answer, "correct": answer == question.answer,
                        "iterations_mean": solve["iterations_mean"] if solve else None,
                        "converged_fraction": solve["converged_fraction"] if solve else None})
        if index < args.show:
            shown = prompt if len(prompt) < 220 else prompt[:100] + " ... " + prompt[-110:]
            mark = "right" if answer == question.answer else f"wrong, expected {question.answer}"
            print(f"[{len(story.events)} events] {shown}\n    -> {answer} ({mark})")
    correct = sum(a["correct"] for a in answers)
    print(f"\nStory LM answered {correct} of {len(answers)} questions right ({correct / len(answers):.0%}; "
          f"stories of {min(args.story_events)}-{max(args.story_events)} events, answers are one of 6 rooms).")
    iterations = [a["iterations_mean"] for a in answers if a["iterations_mean"] is not None]
    if iterations:
        converged = [a["converged_fraction"] for a in answers if a["converged_fraction"] is not None]
        print(f"Solver iterations per token while reading the stories and answering: mean "
              f"{sum(iterations) / len(iterations):.1f}; solves converged: {sum(converged) / len(converged):.1%}")
    return {"accuracy": correct / len(answers), "answers": answers}


def english(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import pipeline

    print(f"\n== English LMs through pipeline('text-generation'): {args.english_tokens} new tokens, greedy ==")
    results = {}
    for name in ENGLISH_MODELS:
        folder = args.models_dir / name
        recorded = json.loads((folder / "language_model.json").read_text())
        generator = pipeline("text-generation", model=str(folder), trust_remote_code=True, device="cpu")
        with SolverStatsRecorder(generator.model) as recorder:
            text = generator(ENGLISH_PROMPT, max_new_tokens=args.english_tokens, do_sample=False,
                             repetition_penalty=1.3, return_full_text=False)[0]["generated_text"]
        solve = recorder.summary()["per_token"] if generator.model.config.implicit else None
        spent = f"; {solve['iterations_mean']:.1f} solver iterations per token" if solve else ""
        print(f"{name} (held-out perplexity {recorded['held_out_perplexity']:.1f}{spent}):\n  "
              f"{' '.join((ENGLISH_PROMPT + text).split())}")
        results[name] = {"prompt": ENGLISH_PROMPT, "continuation": text,
                         "iterations_per_token": solve["iterations_mean"] if solve else None,
                         "held_out_perplexity": recorded["held_out_perplexity"]}
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="implicit-lm demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models", help="the bundled models (models/)")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "outputs" / "demo")
    parser.add_argument("--groups", default=",".join(GROUPS), help="word problems shown (default S5,A5)")
    parser.add_argument("--lengths", default="32,64,128,256",
                        help="state-tracking test lengths, sequential mode (bigger grids: implicit-lm eval "
                             "state-tracking)")
    parser.add_argument("--num-samples", type=int, default=32, help="state-tracking sequences per length (32)")
    parser.add_argument("--duality-lengths", default="32,64,128",
                        help="lengths of the simultaneous-mode (duality) evaluation; empty to skip")
    parser.add_argument("--duality-samples", type=int, default=8, help="sequences per duality length (8)")
    parser.add_argument("--pipeline-length", type=int, default=200, help="permutations per pipeline prompt")
    parser.add_argument("--pipeline-prompts", type=int, default=4, help="word problems given to the pipeline")
    parser.add_argument("--stories", type=int, default=30, help="story questions to ask")
    parser.add_argument("--story-events", default="4,8,16", help="story lengths (events) to draw from")
    parser.add_argument("--show", type=int, default=3, help="stories printed in full")
    parser.add_argument("--english-tokens", type=int, default=40, help="tokens the English LMs generate (40)")
    args = parser.parse_args(argv)
    try:
        args.lengths = [int(part) for part in args.lengths.split(",")]
        args.duality_lengths = [int(part) for part in args.duality_lengths.split(",") if part.strip()]
        args.story_events = [int(part) for part in args.story_events.split(",")]
    except ValueError:
        parser.error("--lengths, --duality-lengths and --story-events take comma-separated integers")
    args.groups = [part.strip() for part in args.groups.split(",") if part.strip()]
    if not args.groups or set(args.groups) - set(GROUPS):
        parser.error(f"--groups {','.join(args.groups)!r}: choose from {','.join(GROUPS)}")
    counts = (args.num_samples, args.duality_samples, args.stories, args.pipeline_length, args.pipeline_prompts,
              args.english_tokens)
    if min(args.lengths + args.duality_lengths + args.story_events) < 1 or min(counts) < 1:
        parser.error("lengths, --num-samples, --duality-samples, --stories, --english-tokens and the --pipeline-* "
                     "counts must be positive")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    bundled = [f"{base}-{group.lower()}" for group in args.groups for base in STATE_TRACKING_BASES]
    missing = [name for name in (*bundled, STORY_MODEL, *ENGLISH_MODELS) if not (args.models_dir / name).is_dir()]
    if missing:
        raise SystemExit(f"The bundled models {missing} are not in {args.models_dir}; run the demo from a checkout of "
                         "implicit-lm (its models/ folder) or pass --models-dir.")
    torch.manual_seed(0)
    start = time.perf_counter()
    # The bundled models are narrow: one intra-op thread, which keeps the demo's pace on a loaded machine.
    widest = max(json.loads((args.models_dir / name / "config.json").read_text())["hidden_size"]
                 for name in (*bundled, STORY_MODEL))
    with intra_op_threads(threads_for_width(widest)), _no_loading_bars():
        payload = {"state_tracking": state_tracking(args), "stories": stories(args)}
    with _no_loading_bars():  # wider models: torch's threads
        payload["english"] = english(args)
    payload["seconds"] = time.perf_counter() - start
    write_json(args.output_dir / "demo.json", payload)
    print(f"\nDone in {payload['seconds']:.0f} s; figures in {args.output_dir}")
    return payload


if __name__ == "__main__":
    main()
