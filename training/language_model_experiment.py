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
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from implicit_lm.training.curriculum import Curriculum, Phase
from implicit_lm.training.runner import finetune_command, run_logged, run_parallel, threads_per_job

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
    """The model's config: Mamba2 blocks of `hidden_size` (heads of 32, state 64); at test time an implicit model
    iterates to a relative residual of 0.01 with at most 64 iterations per token."""
    from modeling_implicit import ImplicitMamba2Config

    return ImplicitMamba2Config(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, num_hidden_layers=spec.layers, state_size=64,
        head_dim=32, n_groups=1, chunk_size=64, implicit=spec.implicit, tolerance=0.01, max_iterations=16,
        eval_max_iterations=64, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )


def ensure_corpus(output_dir: Path) -> Path:
    from implicit_lm.training.corpus import build

    corpus = output_dir / CORPUS
    if not (corpus / "corpus.json").is_file():
        build(corpus, ["kjv", "python-docs"], vocab_size=8192)
    return corpus


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
    results = {spec.name: {"train_seconds": value} for spec, value in zip(MODELS, seconds)}
    return results


if __name__ == "__main__":
    main()
