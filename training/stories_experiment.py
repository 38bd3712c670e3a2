"""A tiny implicit LM and an explicit one trained on bAbI-style stories (the paper's CatbAbI experiment, Figure 13).

Generates a story corpus offline (implicit_lm/tasks/stories.py: people move between rooms, pick up and drop objects; questions
"where is mary ?" with their answers inline), saves the story tokenizer (word level, trained on nothing but the
generator's closed vocabulary), trains both models as ordinary causal LMs with `implicit-lm finetune`, and
measures the accuracy of the greedy answer to a story's last question, and the solver iterations the implicit model
spends on the answer token, against story length (`results.md`, `stories.json`, `stories.png`).

    implicit-lm experiment stories --output-dir runs/stories [--jobs 2] [--bundle-dir models]

`--bundle-dir DIR` copies the implicit story LM, with its tokenizer, a model card and its measured accuracy
(`stories.json`), into `DIR/implicit-mamba2-stories`, which the demo and the regression tests read. Training jobs
whose `final/` folder exists are not rerun.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from implicit_lm.eval.stories import answer_accuracy, format_table, plot
from implicit_lm.training.curriculum import Curriculum, Phase
from implicit_lm.training.runner import all_threads, finetune_command, run_logged, run_parallel, threads_per_job

from implicit_lm.files import atomic_output, atomic_write, write_json
from implicit_lm.models import load_model
from implicit_lm.provenance import run_metadata
from implicit_lm.tasks.stories import generate_stories, story_tokenizer, write_stories

EVAL_LENGTHS = (2, 4, 8, 16, 32)
EVAL_SEED = 1
# The training corpus: short stories with a question after every event. With 4-24 events and 4 questions per story
# (or 12), neither model had learned to answer (chance, loss stuck at the entropy of the events) after 1500 steps.
MIN_EVENTS, MAX_EVENTS = 2, 8
QUESTIONS_PER_STORY = MAX_EVENTS
BUNDLED = "implicit-mamba2"


@dataclass(frozen=True)
class StoryModel:
    name: str
    layers: int
    implicit: bool


MODELS = (StoryModel("implicit-mamba2", 1, True), StoryModel("mamba2-2layer", 2, False))
# The paper's two-phase curriculum, shortened: (4+1) for 70% of the steps, then up to 16 iterations to a relative
# residual of 0.05 with 2 phantom steps.
CURRICULUM = Curriculum((
    Phase("bounded", 0.7, max_iterations=4, tolerance=None, phantom_steps=1),
    Phase("free", 0.3, max_iterations=16, tolerance=0.05, phantom_steps=2),
))


def write_corpus(path: Path, num_stories: int, seed: int) -> None:
    write_stories(path, generate_stories(num_stories, MIN_EVENTS, MAX_EVENTS, seed, QUESTIONS_PER_STORY))


def build_config(spec: StoryModel, tokenizer: Any, hidden_size: int) -> Any:
    from modeling_implicit import ImplicitMamba2Config

    return ImplicitMamba2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=spec.layers, state_size=64,
        head_dim=32, n_groups=1, chunk_size=64, implicit=spec.implicit, tolerance=0.05, max_iterations=16,
        eval_max_iterations=64, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def train_model(spec: StoryModel, args: argparse.Namespace, threads: int) -> float | None:
    model_dir = args.output_dir / spec.name
    tokenizer = story_tokenizer()
    build_config(spec, tokenizer, args.hidden_size).save_pretrained(model_dir / "config")
    curriculum = "none"
    if spec.implicit:
        curriculum = str(model_dir / "curriculum.json")
        CURRICULUM.save(curriculum)
    command = finetune_command(
        "--model", str(model_dir / "config"), "--random-init", "--tokenizer", str(args.output_dir / "tokenizer"),
        "--data", str(args.output_dir / "train.jsonl"), "--eval-data", str(args.output_dir / "valid.jsonl"),
        "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--max-steps", str(args.steps),
        "--learning-rate", str(args.learning_rate), "--min-lr", "1e-5", "--decay-start", "0.7",
        "--warmup-steps", str(min(50, args.steps // 2)), "--curriculum", curriculum,
        "--eval-every", str(max(args.steps // 4, 1)), "--eval-batches", "4", "--seed", str(args.seed),
        "--output-dir", str(model_dir / "train"),
        "--resume",  # a run interrupted before its final/ starts again; the folder holds its earlier log
    )
    return run_logged(command, model_dir / "train.log", threads, done=model_dir / "train" / "final" / "config.json")


def bundle(args: argparse.Namespace, results: dict[str, Any]) -> Path:
    """The implicit story LM and its tokenizer as `bundle_dir/implicit-mamba2-stories`, with card and figures."""
    folder_name = f"{BUNDLED}-stories"
    destination = args.bundle_dir / folder_name
    with atomic_output(destination, folder=True) as staging:
        write_bundle(staging, args, results, folder_name)
    return destination


def write_bundle(staging: Path, args: argparse.Namespace, results: dict[str, Any], folder_name: str) -> None:
    from modeling_implicit import ImplicitMamba2Config

    shutil.copytree(args.output_dir / BUNDLED / "train" / "final", staging, dirs_exist_ok=True)
    # The bundle's config reads prompts as the RNN (`prefill_mode`), as the figures measure.
    config = ImplicitMamba2Config.from_pretrained(staging, prefill_mode="sequential")
    config.save_pretrained(staging)
    entry = results[BUNDLED]
    figures = {
        "lengths": list(EVAL_LENGTHS), "stories_per_length": args.stories_per_length, "seed": EVAL_SEED,
        "parameters": entry["parameters"], "rows": entry["rows"], "num_stories": args.num_stories,
        "measured": time.strftime("%Y-%m-%d"), "machine": run_metadata(argparse.Namespace())["machine"],
        "baselines": {name: value["rows"] for name, value in results.items() if name != BUNDLED},
    }
    (staging / "README.md").write_text(stories_card(config, folder_name, figures))
    write_json(staging / "stories.json", figures)


def stories_card(config: Any, folder_name: str, figures: dict[str, Any]) -> str:
    """The bundled story model's card from its config and its figures (`stories.json`), which keep what the card
    says: its rows, the baselines' rows, when and where they were measured, and the training set's size."""
    from huggingface_hub import EvalResult
    from implicit_lm.model_cards import render_demo_model_card

    summary = (
        f"A tiny one-block **implicit Mamba2** language model ({figures['parameters']:,} parameters) trained on "
        "synthetic bAbI-style stories, in the spirit of the CatbAbI experiment of *Implicit Language Models are "
        "RNNs* (Figure 13). It answers questions about where people and objects are by tracking the state of a "
        "small world through the story."
    )
    task = (
        "Stories from `implicit_lm/tasks/stories.py`: four objects are placed in rooms, then people move between "
        "rooms, pick up and drop objects; questions such as `where is mary ?` or `where is the apple ?` are followed "
        f"by their one-word answer. Trained as an ordinary causal LM on {figures['num_stories']:,} stories of "
        f"{MIN_EVENTS} to {MAX_EVENTS} events (a question after every event) with the word-level story tokenizer "
        "saved beside the weights."
    )
    usage = (
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer, pipeline\n\n"
        f'generator = pipeline("text-generation", model="models/{folder_name}", trust_remote_code=True)\n'
        'story = ("the apple is in the kitchen . the football is in the garden . the milk is in the office . "\n'
        '         "the book is in the bedroom . mary went to the kitchen . mary picked up the apple . "\n'
        '         "mary went to the garden . where is the apple ?")\n'
        "print(generator(story, max_new_tokens=1, do_sample=False, return_full_text=False)[0][\"generated_text\"])\n\n"
        "# Test-time compute per call: the solver settings of this generate call only (model.config is unchanged).\n"
        f'model = AutoModelForCausalLM.from_pretrained("models/{folder_name}", trust_remote_code=True).eval()\n'
        f'tokenizer = AutoTokenizer.from_pretrained("models/{folder_name}", trust_remote_code=True)\n'
        'inputs = tokenizer(story, return_tensors="pt")\n'
        "answer = model.generate(**inputs, max_new_tokens=1, do_sample=False,\n"
        '                        solver_overrides={"eval_max_iterations": 64, "tolerance": 1e-4})\n'
        "print(tokenizer.decode(answer[0, -1]))\n"
        "```"
    )
    text = (
        "Accuracy of the greedy answer to a story's last question and mean solver iterations on the answer token "
        f"(sequential mode), {figures['stories_per_length']} fresh stories per length, measured "
        f"{figures['measured']} on {figures['machine']} (`stories.json`; the package's tests check the model still "
        "reaches them). The explicit 2-block baseline trained the same way is the second line:\n\n"
        + format_table({folder_name: figures["rows"], **figures["baselines"]})
    )
    results = [
        EvalResult(
            task_type="question-answering", task_name="Story questions (where is X?)",
            dataset_type="implicit-lm/stories",
            dataset_name=f"stories of {row['events']} events ({figures['stories_per_length']} fresh stories)",
            dataset_config=f"events-{row['events']}", metric_type="accuracy", metric_name="answer accuracy",
            metric_value=round(row["accuracy"], 4),
        )
        for row in figures["rows"]
    ]
    return render_demo_model_card(
        config, model_name=folder_name, summary=summary, task=task, usage=usage, results=text,
        command="implicit-lm experiment stories --output-dir runs/stories --bundle-dir models",
        tags=("babi", "synthetic-stories"), eval_results=results,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="implicit-lm experiment stories", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--num-stories", type=int, default=20000, help="training stories (default 20000)")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2500, help="optimizer steps per model (default 2500)")
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--stories-per-length", type=int, default=50, help="test stories per length (default 50)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bundle-dir", type=Path, help="copy the implicit story LM here (e.g. models)")
    args = parser.parse_args(argv)
    for name in ("num_stories", "hidden_size", "seq_len", "batch_size", "steps", "stories_per_length", "jobs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.learning_rate <= 0:
        parser.error("--learning-rate must be positive")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if not (args.output_dir / "train.jsonl").is_file():
        write_corpus(args.output_dir / "train.jsonl", args.num_stories, args.seed)
    if not (args.output_dir / "valid.jsonl").is_file():
        write_corpus(args.output_dir / "valid.jsonl", max(args.num_stories // 20, 1), args.seed + 1)
    story_tokenizer().save_pretrained(args.output_dir / "tokenizer")
    threads = threads_per_job(args.jobs)
    seconds = run_parallel(lambda spec: train_model(spec, args, threads), MODELS, args.jobs, desc="models")
    train_seconds = time.perf_counter() - start

    results = {}
    for spec, train_time in zip(MODELS, seconds):
        model, tokenizer = load_model(str(args.output_dir / spec.name / "train" / "final"))
        with all_threads():
            rows = answer_accuracy(model, tokenizer, list(EVAL_LENGTHS), args.stories_per_length, EVAL_SEED,
                                   questions=None)  # a question after every event, as in training
        results[spec.name] = {"parameters": sum(p.numel() for p in model.parameters()), "implicit": spec.implicit,
                              "train_seconds": train_time, "rows": rows}
    total_seconds = time.perf_counter() - start
    payload = {"train_seconds": train_seconds, "total_seconds": total_seconds, "results": results,
               "models": [asdict(spec) for spec in MODELS], "metadata": run_metadata(args)}
    write_json(args.output_dir / "stories.json", payload)
    plot({name: entry["rows"] for name, entry in results.items()}, args.output_dir / "stories.png")
    table = format_table({name: entry["rows"] for name, entry in results.items()})
    minutes = ", ".join(f"{name} " + ("?" if entry["train_seconds"] is None else f"{entry['train_seconds'] / 60:.1f}")
                        for name, entry in results.items())
    summary = (f"Story LMs trained on {args.num_stories} stories of {MIN_EVENTS}-{MAX_EVENTS} events; "
               f"{args.stories_per_length} test stories per length. This invocation: {train_seconds / 60:.1f} min "
               f"training, {total_seconds / 60:.1f} min in all; minutes per model when trained: {minutes}.\n\n"
               f"{table}\n")
    atomic_write(args.output_dir / "results.md", lambda temporary: temporary.write_text(summary))
    print(summary)
    if args.bundle_dir is not None:
        print(f"bundled {bundle(args, results)}")
    return payload


if __name__ == "__main__":
    main()
