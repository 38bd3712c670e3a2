"""The bAbI-style story task (`implicit_lm.tasks.stories`, in the spirit of the paper's CatbAbI experiment, appendix,
Figure 13) as a command: write a corpus, or measure a trained LM on fresh stories.

    implicit-lm eval stories --num-stories 2000 --min-events 4 --max-events 24 --seed 0 --output stories.jsonl
    implicit-lm eval stories --model DIR --lengths 4,8,16,32,64 --stories-per-length 50 --output-dir DIR

The second form measures a trained LM: the accuracy of its greedy one-word answer to the final question, and the
solver iterations it spent on the answer token, against story length (the paper's Figure 13c/d). Everything is
seeded, so the same arguments give the same corpus.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any

import torch
from implicit_lm.eval.plots import new_figure, save_figure
from tqdm.auto import tqdm

from implicit_lm.cli import InputError, run_cli
from implicit_lm.files import write_json
from implicit_lm.models import load_model
from implicit_lm.provenance import run_metadata
from implicit_lm.tasks.stories import Story, generate_stories, generate_story, vocabulary, write_stories
from implicit_lm.tasks.tokenizer import WORD_PREFIX


@torch.no_grad()
def answer_accuracy(
    model: torch.nn.Module, tokenizer: Any, lengths: list[int], stories_per_length: int, seed: int,
    batch_size: int = 25, questions: int | None = 1,
) -> list[dict[str, Any]]:
    """For stories of each length (events), the fraction whose final question the model answers right (greedy next
    word after the prompt) and, for implicit models, the solver iterations of the answer-predicting position when
    the prompt is solved token by token (sequential mode). Stories have `questions` questions (None: one after every
    event, as the story LMs of `training.stories_experiment` are trained); earlier ones appear with their answers.
    Prompts are left-padded into batches (padding changes no logit or iteration count of the real tokens)."""
    from implicit_lm.models import is_implicit, solver_kwargs

    mode = solver_kwargs(model, inference_mode="sequential") if is_implicit(model) else {}
    results = []
    for length in tqdm(lengths, desc="story lengths", unit="length", disable=None):
        rng = random.Random(seed * 100_003 + length)
        stories = [generate_story(rng, length, length if questions is None else questions)
                   for _ in range(stories_per_length)]
        correct, iterations, prompt_tokens = 0, [], 0
        for start in range(0, stories_per_length, batch_size):
            batch = stories[start : start + batch_size]
            encoded = tokenizer([story.prompt(story.questions[-1]) for story in batch], return_tensors="pt",
                                padding=True, padding_side="left")
            prompt_tokens += int(encoded["attention_mask"].sum())
            output = model(encoded["input_ids"].to(model.device),
                           attention_mask=encoded["attention_mask"].to(model.device), use_cache=False, **mode)
            predicted = output.logits[:, -1].argmax(-1).tolist()
            correct += sum(tokenizer.decode(token).strip() == story.questions[-1].answer
                           for token, story in zip(predicted, batch))
            stats = getattr(output, "solver_stats", None)
            if stats is not None:
                iterations.extend(stats.iterations[:, -1].tolist())
        results.append({
            "events": length,
            "prompt_tokens_mean": prompt_tokens / stories_per_length,
            "accuracy": correct / stories_per_length,
            "answer_iterations_mean": sum(iterations) / len(iterations) if iterations else None,
        })
    return results


def plot(results: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Answer accuracy (left) and solver iterations on the answer token (right) vs story length, one line per model
    (`results`: label -> `answer_accuracy` rows), like the paper's Figure 13c/d."""
    figure, axes = new_figure(columns=2)
    left, right = axes[0]
    for index, (label, rows) in enumerate(results.items()):
        events = [r["events"] for r in rows]
        left.plot(events, [r["accuracy"] for r in rows], marker="o", color=f"C{index}", label=label)
        if rows[0]["answer_iterations_mean"] is not None:
            right.plot(events, [r["answer_iterations_mean"] for r in rows], marker="s", color=f"C{index}",
                       label=label)
    left.set_ylabel("answer accuracy")
    left.set_ylim(0, 1.05)
    left.legend(fontsize=8)
    right.set_ylabel("solver iterations on the answer token")
    if right.lines:
        right.legend(fontsize=8)
    for axis in (left, right):
        axis.set_xlabel("story length (events)")
        axis.grid(alpha=0.3)
    save_figure(figure, path)


def format_table(results: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown: one line per model, answer accuracy and answer-token iterations at each story length."""
    lengths = [r["events"] for r in next(iter(results.values()))]
    header = ["model", *[f"acc@{n}" for n in lengths], *[f"iters@{n}" for n in lengths]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, rows in results.items():
        accuracy = [f"{r['accuracy']:.2f}" for r in rows]
        iterations = [f"{r['answer_iterations_mean']:.1f}" if r["answer_iterations_mean"] is not None else "-"
                      for r in rows]
        lines.append("| " + " | ".join([label, *accuracy, *iterations]) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="implicit-lm eval stories", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="evaluate this LM (Hub-layout folder with the story tokenizer) instead")
    parser.add_argument("--lengths", default="4,8,16,32,64", help="story lengths (events) to evaluate")
    parser.add_argument("--stories-per-length", type=int, default=50)
    parser.add_argument("--output-dir", type=Path, default=Path("eval_results"))
    parser.add_argument("--num-stories", type=int, default=1000)
    parser.add_argument("--min-events", type=int, default=4)
    parser.add_argument("--max-events", type=int, default=24)
    parser.add_argument("--questions", type=int, default=1,
                        help="questions per story, the last after the end (0: one after every event)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="JSONL: one {'text', 'events'} per story")
    args = parser.parse_args(argv)
    if (args.model is None) == (args.output is None):
        parser.error("pass --output (generate a corpus) or --model (evaluate a model), not both")
    if args.questions < 0:
        parser.error(f"--questions must be >= 0, got {args.questions}")
    return args


def evaluate_model(args: argparse.Namespace) -> dict[str, Any]:
    try:
        lengths = [int(part) for part in args.lengths.split(",")]
    except ValueError as error:
        raise InputError(f"--lengths must be comma-separated integers, got {args.lengths!r}") from error
    if not lengths or min(lengths) < 1 or args.stories_per_length < 1:
        raise InputError("--lengths and --stories-per-length must be positive")
    model, tokenizer = load_model(args.model)
    if tokenizer is None:
        raise InputError(f"{args.model} has no tokenizer: the story LM needs the story tokenizer saved beside it")
    unknown = set(vocabulary()) - {token.removeprefix(WORD_PREFIX) for token in tokenizer.get_vocab()}
    if unknown:
        raise InputError(f"{args.model}'s tokenizer lacks story words {sorted(unknown)[:5]}: not a story LM")
    results = answer_accuracy(model, tokenizer, lengths, args.stories_per_length, args.seed,
                              questions=args.questions or None)
    payload = {"results": results, "metadata": run_metadata(args, model)}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_json(args.output_dir / "stories.json", payload)
    plot({Path(args.model).name: results}, args.output_dir / "stories.png")
    print(format_table({Path(args.model).name: results}))
    return payload


@run_cli
def main(argv: list[str] | None = None) -> list[Story] | dict[str, Any]:
    args = parse_args(argv)
    if args.model is not None:
        return evaluate_model(args)
    if args.num_stories < 1:
        raise InputError(f"--num-stories must be positive, got {args.num_stories}")
    try:
        stories = generate_stories(args.num_stories, args.min_events, args.max_events, args.seed,
                                   args.questions or args.max_events)
    except ValueError as error:
        raise InputError(str(error)) from error
    write_stories(args.output, stories)
    print(f"wrote {len(stories)} stories to {args.output}")
    return stories


if __name__ == "__main__":
    main()
