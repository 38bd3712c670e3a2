"""State-tracking data: word problems over S5 and A5, and the paper's mixed distribution D_p over M x A5.

A word problem presents a sequence of monoid elements `x_0, ..., x_{L-1}` (one token per element) and asks, at every
position `t`, for the running product `y_t = x_0 * x_1 * ... * x_t` (the label of position `t`; Appendix C of the
paper). Its data sets:

- `S5`, `A5`: tokens drawn uniformly from the group (the identity included), vocabulary 120 and 60.
- `mixed`: the distribution D_p of section 4 and Appendix C over `A5 x M`, `M` a four-element aperiodic monoid. At
  every position the `M` part is uniform, and the A5 part is a *hard* element (one of the 59 non-identities, each
  with probability `p / 59`) with probability `p`, the identity otherwise. Vocabulary 240.

Conventions (the reference's, `state_tracking/dataset.py` of microsoft/implicit_languagemodels, which builds its
groups with the `abstract_algebra` package at commit bbe5c66), so that token ids agree with its data files:

- A permutation of `{0, ..., 4}` is stored in one-line notation, `perm[i]` the image of `i`. The product composes
  maps, the right factor first: `(a * b)(i) = a(b(i))` (`Perm.__mul__`: "self(other(id))"). The label is the
  left-to-right product (`targets[j] = op(targets[j - 1], inputs[j])`), so as a map
  `y_t(i) = x_0(x_1(...x_t(i)))`.
- S5 is every permutation in lexicographic order (`itertools.permutations`), A5 the even ones in the same order; the
  identity is element 0 of both.
- `M` has elements E, A, B, X (E the identity, X a zero, B idempotent, A * A = X) and the reference's Cayley table.
- A token of `A5 x M` is `4 * g + m` (A5 index `g`, M index `m`): the order of the reference's `group * monoid`.
  Token 0 is the identity and tokens 0-3 are the simple (`g` = identity) ones.

The `p` of the reference's file names (`..._P090.bin`) is not the paper's: it is the probability of *forcing* the
identity, after which the A5 part is uniform over all 60 elements. Its files follow D_p with
`p = (1 - p_reference) * 59 / 60` exactly (P090 is D_0.0983, P050 is D_0.4917).

Tokens and labels are stored as uint8. `python -m eval.state_tracking --group mixed --p 0.1 --length 256
--num-samples 4096 --seed 0 --output test.pt` writes them with their metadata (`torch.load(path)`).

Length generalisation (the paper's Figure 1 right and Figure 3): `--model DIR` (repeatable) evaluates trained models
on fresh word problems of each of `--lengths`, in sequential mode (token by token, each token iterated to its fixed
point: how the model runs as an RNN) and simultaneous mode (the whole sequence solved at once), and reports per-token
accuracy and solver iterations per length as a table, `length_generalization.json` and `length_generalization.png`:

    python -m eval.state_tracking --model models/implicit-mamba2-a5 --model models/mamba2-a5-4layer --group A5 \
        --lengths 32,64,128,256 --num-samples 256 --output-dir eval_results
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from eval.common import (
    EvalError,
    atomic_write,
    is_implicit,
    load_model,
    new_figure,
    run_cli,
    run_metadata,
    save_figure,
    solver_kwargs,
    word_level_tokenizer,
    write_json,
)

DEGREE = 5
# The aperiodic monoid of the reference (`aperiodic_semigroup`): row = left factor, column = right factor.
APERIODIC_ELEMENTS = ("E", "A", "B", "X")
APERIODIC_TABLE = (
    # E  A  B  X
    (0, 1, 2, 3),  # E
    (1, 3, 3, 3),  # A
    (2, 1, 2, 3),  # B
    (3, 3, 3, 3),  # X
)
GROUPS = ("S5", "A5", "mixed")
MODES = ("sequential", "simultaneous")
# Test sets of different lengths are drawn with different seeds (seed + LENGTH_SEED_STRIDE * length), so a longer
# test set is not an extension of a shorter one.
LENGTH_SEED_STRIDE = 7919


@dataclass(frozen=True)
class FiniteMonoid:
    """A finite monoid given by its Cayley table; element 0 is the identity.

    Attributes:
        name: "S5", "A5", "M" or "A5xM".
        table: `(size, size)` uint8, `table[a, b]` the index of `a * b`.
        permutations: for permutation groups, `(size, degree)` int64 in one-line notation (row `a` maps `i` to
            `permutations[a, i]`), so that `table[a, b]` is the index of `permutations[a][permutations[b]]`.
    """

    name: str
    table: torch.Tensor
    permutations: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.table.shape[0]

    def inverses(self) -> torch.Tensor:
        """`(size,)` uint8: `inverse[a]` with `a * inverse[a] = inverse[a] * a = identity`. Groups only."""
        is_identity = self.table == 0
        if not (is_identity.sum(1) == 1).all():
            raise ValueError(f"{self.name} is not a group: some element has no inverse")
        inverse = is_identity.int().argmax(1)
        if not (self.table[inverse.long(), torch.arange(self.size)] == 0).all():
            raise ValueError(f"{self.name} is not a group: a right inverse is not a left inverse")
        return inverse.to(torch.uint8)

    def running_product(self, tokens: torch.Tensor) -> torch.Tensor:
        """Labels of a word problem: `labels[..., t] = tokens[..., 0] * ... * tokens[..., t]`, same shape and dtype.

        A log-depth (Hillis-Steele) scan: after the step with shift `s` each position holds the product of the last
        `2 s` tokens up to it, so `ceil(log2 L)` table lookups over the whole batch replace `L` sequential ones.
        Correct because the product is associative; the earlier segment stays the left factor.
        """
        flat_table = self.table.long().flatten()
        labels = tokens.long()
        shift = 1
        while shift < labels.shape[-1]:
            combined = flat_table[labels[..., :-shift] * self.size + labels[..., shift:]]
            labels = torch.cat([labels[..., :shift], combined], dim=-1)
            shift *= 2
        return labels.to(tokens.dtype)


def _to_uint8(name: str, table: torch.Tensor) -> torch.Tensor:
    """The Cayley table as uint8, the storage of tokens and labels: at most 256 elements."""
    if table.shape[0] > 256:
        raise ValueError(f"{name} has {table.shape[0]} elements, more than uint8 tokens can hold")
    return table.to(torch.uint8)


def _permutation_group(name: str, permutations: torch.Tensor) -> FiniteMonoid:
    """The group of `permutations` (closed under composition, identity first) with `(a * b)(i) = a(b(i))`."""
    size, degree = permutations.shape
    # composed[a, b, i] = permutations[a, permutations[b, i]]
    composed = permutations[torch.arange(size)[:, None, None], permutations[None, :, :]]
    # Index permutations by their one-line notation read as a base-`degree` number.
    place = degree ** torch.arange(degree - 1, -1, -1)
    index_of = torch.full((degree**degree,), -1, dtype=torch.long)
    index_of[(permutations * place).sum(-1)] = torch.arange(size)
    table = index_of[(composed * place).sum(-1)]
    if (table < 0).any():
        raise ValueError(f"{name}: the permutations are not closed under composition")
    return FiniteMonoid(name, _to_uint8(name, table), permutations)


def _is_even(permutations: torch.Tensor) -> torch.Tensor:
    """Parity by the number of inversions (pairs i < j with perm[i] > perm[j])."""
    first, second = torch.triu_indices(permutations.shape[1], permutations.shape[1], offset=1)
    inversions = (permutations[:, first] > permutations[:, second]).sum(-1)
    return inversions % 2 == 0


@functools.cache
def symmetric_group(degree: int = DEGREE) -> FiniteMonoid:
    """S_n, its `n!` permutations in lexicographic order (the identity first)."""
    permutations = torch.tensor(list(itertools.permutations(range(degree))), dtype=torch.long)
    return _permutation_group(f"S{degree}", permutations)


@functools.cache
def alternating_group(degree: int = DEGREE) -> FiniteMonoid:
    """A_n, the even permutations of S_n in S_n's order (the identity first)."""
    permutations = symmetric_group(degree).permutations
    return _permutation_group(f"A{degree}", permutations[_is_even(permutations)])


@functools.cache
def aperiodic_monoid() -> FiniteMonoid:
    """The reference's four-element aperiodic monoid `M` (`APERIODIC_ELEMENTS`, `APERIODIC_TABLE`)."""
    return FiniteMonoid("M", torch.tensor(APERIODIC_TABLE, dtype=torch.uint8))


def direct_product(first: FiniteMonoid, second: FiniteMonoid) -> FiniteMonoid:
    """`first x second`, componentwise; element `(a, b)` is `a * second.size + b`."""
    outer = first.table.long()[:, None, :, None] * second.size
    inner = second.table.long()[None, :, None, :]
    table = (outer + inner).reshape(first.size * second.size, first.size * second.size)
    return FiniteMonoid(f"{first.name}x{second.name}", _to_uint8(f"{first.name}x{second.name}", table))


@functools.cache
def mixed_monoid() -> FiniteMonoid:
    """`A5 x M`, the 240-element monoid of D_p, in the reference's token order."""
    return direct_product(alternating_group(), aperiodic_monoid())


def get_monoid(name: str) -> FiniteMonoid:
    """The monoid of a data set name: "S5", "A5" or "mixed" (`A5 x M`)."""
    builders = {"S5": symmetric_group, "A5": alternating_group, "mixed": mixed_monoid}
    if name not in builders:
        raise ValueError(f"unknown group {name!r}: choose one of {list(builders)}")
    return builders[name]()


def element_names(group: str) -> list[str]:
    """One word per element, in token-id order: a permutation in one-line notation for S5 and A5 (`"01234"` the
    identity, `"12034"` the cycle 0 -> 1 -> 2 -> 0), and for the mixed set the A5 element's word followed by the monoid
    element's letter (`"01234E"`, token `4 * g + m`)."""
    if group == "mixed":
        return [f"{word}{letter}" for word in element_names("A5") for letter in APERIODIC_ELEMENTS]
    return ["".join(map(str, row)) for row in get_monoid(group).permutations.tolist()]


def build_tokenizer(group: str) -> Any:
    """A word-level tokenizer over `element_names(group)` whose token ids are the element indices, so that the text
    `"01342 12034 ..."` is a word problem (and `pipeline("text-generation")` reads and writes elements). It has no
    special tokens: the vocabulary is exactly the group's; an unknown word is an error, not a silent `<unk>`."""
    return word_level_tokenizer(element_names(group))


def _check_sizes(num_samples: int, length: int) -> None:
    if num_samples < 1 or length < 1:
        raise ValueError(f"num_samples and length must be positive, got {num_samples} and {length}")


def word_problem(
    group: str | FiniteMonoid, num_samples: int, length: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform tokens of `group` ("S5", "A5" or any `FiniteMonoid`) and their running products.

    Returns `(tokens, labels)`, both `(num_samples, length)` uint8; the same seed gives the same data.
    """
    monoid = get_monoid(group) if isinstance(group, str) else group
    _check_sizes(num_samples, length)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(monoid.size, (num_samples, length), generator=generator).to(torch.uint8)
    return tokens, monoid.running_product(tokens)


def mixed_word_problem(p: float, num_samples: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """D_p over `A5 x M` (section 4, Appendix C): `M` part uniform, A5 part a uniform non-identity (hard) element
    with probability `p` and the identity otherwise. `p = 0` is M's word problem alone; `p = 1` makes every token
    hard.

    Returns `(tokens, labels)`, both `(num_samples, length)` uint8, tokens `4 * g + m` (see `hard_mask`).
    """
    if not 0 <= p <= 1:
        raise ValueError(f"p is a probability, got {p}")
    _check_sizes(num_samples, length)
    monoid, group_size = mixed_monoid(), alternating_group().size
    generator = torch.Generator().manual_seed(seed)
    simple = torch.randint(aperiodic_monoid().size, (num_samples, length), generator=generator)
    hard = torch.rand((num_samples, length), generator=generator) < p
    non_identity = torch.randint(1, group_size, (num_samples, length), generator=generator)
    tokens = (torch.where(hard, non_identity, 0) * aperiodic_monoid().size + simple).to(torch.uint8)
    return tokens, monoid.running_product(tokens)


def hard_mask(tokens: torch.Tensor) -> torch.Tensor:
    """Which tokens of `A5 x M` carry a non-identity A5 element (the hard tokens of D_p)."""
    return tokens.long() >= aperiodic_monoid().size


class Accuracy(NamedTuple):
    per_position: torch.Tensor  # (length,) float64: the fraction of samples whose label at t is predicted
    overall: float


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> Accuracy:
    """Per-position and overall accuracy of `predictions` (`(N, L)` ids, or `(N, L, vocab)` logits) on `labels`."""
    if predictions.dim() == labels.dim() + 1:
        predictions = predictions.argmax(-1)
    if labels.dim() != 2 or predictions.shape != labels.shape:
        raise ValueError(
            f"predictions {tuple(predictions.shape)} do not match labels {tuple(labels.shape)}: expected (N, L) ids "
            "or (N, L, vocab) logits for (N, L) labels"
        )
    correct = (predictions.long() == labels.long()).double()
    return Accuracy(correct.mean(0), correct.mean().item())


def sample(group: str, num_samples: int, length: int, seed: int, p: float | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Word problems of a data set name: `word_problem` for S5/A5, `mixed_word_problem` (needs `p`) for mixed."""
    if group == "mixed":
        if p is None:
            raise ValueError("the mixed data set needs p, the probability of a hard A5 element")
        return mixed_word_problem(p, num_samples, length, seed)
    if p is not None:
        raise ValueError(f"p applies to the mixed data set only, not {group}")
    return word_problem(group, num_samples, length, seed)


@torch.no_grad()
def length_generalization(
    model: torch.nn.Module,
    group: str,
    lengths: list[int],
    num_samples: int,
    seed: int = 0,
    p: float | None = None,
    modes: tuple[str, ...] = MODES,
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """Accuracy and solver iterations of `model` on fresh word problems of each length, in each inference mode.

    One row per (length, mode): `accuracy` (per token, over every position of every sample), `sequence_accuracy`
    (samples with every position right), `final_accuracy` (the last position only), and for implicit models the
    solver iterations: per token in sequential mode, per whole-sequence solve in simultaneous mode
    (`iterations_mean`, `iterations_max`, `converged_fraction`). Explicit models report `None` iterations.
    """
    size = get_monoid(group).size
    if size > model.config.vocab_size:
        raise ValueError(f"{group} has {size} elements, more than the model's vocabulary ({model.config.vocab_size})")
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown modes {sorted(unknown)}: choose from {MODES}")
    device = next(model.parameters()).device
    rows = []
    progress = tqdm(total=len(lengths) * len(modes), desc="lengths x modes", unit="eval", leave=False, disable=None)
    for length in lengths:
        tokens, labels = sample(group, num_samples, length, seed + LENGTH_SEED_STRIDE * length, p)
        for mode in modes:
            correct, iterations, converged = [], [], []
            for start in range(0, num_samples, batch_size):
                batch = tokens[start : start + batch_size].long().to(device)
                output = model(input_ids=batch, use_cache=False, **solver_kwargs(model, inference_mode=mode))
                correct.append(output.logits.argmax(-1).cpu() == labels[start : start + batch_size].long())
                stats = getattr(output, "solver_stats", None)
                if stats is not None and is_implicit(model):
                    iterations.append(stats.iterations.flatten().cpu().double())
                    converged.append(stats.converged.flatten().cpu())
            correct = torch.cat(correct).double()
            row = {
                "length": length,
                "mode": mode,
                "accuracy": correct.mean().item(),
                "sequence_accuracy": correct.min(1).values.mean().item(),
                "final_accuracy": correct[:, -1].mean().item(),
                "iterations_mean": None,
                "iterations_max": None,
                "converged_fraction": None,
            }
            if iterations:
                iterations = torch.cat(iterations)
                row.update(iterations_mean=iterations.mean().item(), iterations_max=int(iterations.max().item()),
                           converged_fraction=torch.cat(converged).float().mean().item())
            rows.append(row)
            progress.update()
    progress.close()
    return rows


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """A markdown table: one line per (model, mode), per-token accuracy at each length, then mean iterations."""
    lengths = sorted({row["length"] for entry in results.values() for row in entry["rows"]})
    header = ["model", "params", "mode", *[f"acc@{n}" for n in lengths], *[f"iters@{n}" for n in lengths]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in results.items():
        for mode in dict.fromkeys(row["mode"] for row in entry["rows"]):
            by_length = {row["length"]: row for row in entry["rows"] if row["mode"] == mode}
            accuracies = [f"{by_length[n]['accuracy']:.3f}" if n in by_length else "" for n in lengths]
            iterations = [
                f"{by_length[n]['iterations_mean']:.1f}" if by_length.get(n, {}).get("iterations_mean") is not None
                else "-" for n in lengths
            ]
            lines.append(f"| {name} | {entry['parameters'] / 1e3:.0f}K | {mode} | " + " | ".join(
                accuracies + iterations) + " |")
    return "\n".join(lines)


def plot_length_generalization(results: dict[str, dict[str, Any]], path: Path, train_length: int | None = None
                               ) -> None:
    """Accuracy vs length (left; solid sequential, dashed simultaneous) and solver iterations vs length (right:
    per token in sequential mode, per sequence solve in simultaneous mode) for every model, like Figure 1 right."""
    figure, axes = new_figure(columns=2)
    left, right = axes[0]
    styles = {"sequential": "-", "simultaneous": "--"}
    for index, (name, entry) in enumerate(results.items()):
        color = f"C{index}"
        for mode in dict.fromkeys(row["mode"] for row in entry["rows"]):
            rows = [row for row in entry["rows"] if row["mode"] == mode]
            lengths = [row["length"] for row in rows]
            left.plot(lengths, [row["accuracy"] for row in rows], styles[mode], marker="o", color=color,
                      label=f"{name} ({mode})")
            if rows[0]["iterations_mean"] is not None:
                right.plot(lengths, [row["iterations_mean"] for row in rows], styles[mode], marker="s", color=color,
                           label=f"{name} ({'per token' if mode == 'sequential' else 'per sequence'})")
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("sequence length")
        axis.grid(alpha=0.3)
        if train_length is not None:
            axis.axvline(train_length, color="grey", linestyle=":", label=f"train length {train_length}")
    left.set_ylabel("per-token accuracy")
    left.set_ylim(0, 1.02)
    right.set_ylabel("solver iterations")
    left.legend(fontsize=7)
    if right.lines:
        right.legend(fontsize=7)
    save_figure(figure, path)


def model_labels(folders: list[str]) -> dict[str, str]:
    """A short, unique label per model folder: its name, or `parent/name` where names repeat (`run/final`)."""
    names = [Path(folder).name for folder in folders]
    labels = {}
    for folder, name in zip(folders, names):
        label = name if names.count(name) == 1 else f"{Path(folder).parent.name}/{name}"
        if label in labels:
            raise EvalError(f"--model {folder} is given twice (or two folders share the label {label!r})")
        labels[label] = folder
    return labels


def evaluate_models(args: argparse.Namespace) -> dict[str, Any]:
    """`--model` mode of the CLI: length generalisation of every model, as JSON, PNG and a printed table."""
    try:
        lengths = [int(part) for part in args.lengths.split(",")]
    except ValueError as error:
        raise EvalError(f"--lengths must be comma-separated integers, got {args.lengths!r}") from error
    if not lengths or min(lengths) < 1:
        raise EvalError(f"--lengths must be positive, got {args.lengths!r}")
    modes = tuple(part.strip() for part in args.modes.split(","))
    if not modes or set(modes) - set(MODES):
        raise EvalError(f"--modes {args.modes!r}: choose from {','.join(MODES)}")
    num_samples = 256 if args.num_samples is None else args.num_samples
    results: dict[str, dict[str, Any]] = {}
    for name, folder in model_labels(args.model).items():
        model, _ = load_model(folder, device=args.device)
        try:
            rows = length_generalization(model, args.group, lengths, num_samples, args.seed, args.p, modes,
                                         args.batch_size)
        except ValueError as error:
            raise EvalError(f"{folder}: {error}") from error
        results[name] = {"path": str(folder), "parameters": sum(p.numel() for p in model.parameters()),
                         "implicit": is_implicit(model), "rows": rows}
    payload = {"group": args.group, "p": args.p, "num_samples": num_samples, "seed": args.seed,
               "results": results, "metadata": run_metadata(args)}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_json(args.output_dir / "length_generalization.json", payload)
    plot_length_generalization(results, args.output_dir / "length_generalization.png", args.train_length)
    print(format_table(results))
    print(f"wrote {args.output_dir / 'length_generalization.json'} and length_generalization.png")
    return payload


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.state_tracking", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--group", required=True, choices=GROUPS, help="S5, A5, or mixed (D_p over A5 x M)")
    parser.add_argument("--p", type=float, help="mixed only: probability of a hard (non-identity) A5 element")
    parser.add_argument("--length", type=int, default=64, help="tokens per sample (default 64)")
    parser.add_argument("--num-samples", type=int, help="sequences to draw (default 1000; with --model: 256/length)")
    parser.add_argument("--seed", type=int, default=0, help="of the torch.Generator (default 0)")
    parser.add_argument("--output", type=Path, help=".pt file for tokens, labels and metadata")
    evaluation = parser.add_argument_group("evaluating trained models (instead of --output)")
    evaluation.add_argument("--model", action="append", help="Hub-layout model folder; repeat to compare models")
    evaluation.add_argument("--lengths", default="32,64,128,256", help="comma-separated test lengths")
    evaluation.add_argument("--modes", default=",".join(MODES), help="inference modes (default: both)")
    evaluation.add_argument("--batch-size", type=int, default=64, help="sequences per forward (default 64)")
    evaluation.add_argument("--train-length", type=int, help="marks the training length on the plot")
    evaluation.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    evaluation.add_argument("--output-dir", type=Path, default=Path("eval_results"))
    return parser


@run_cli
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Generate and save a data set, or (`--model`) evaluate models; input errors exit with status 2 (`run_cli`).
    Returns what was saved."""
    args = build_parser().parse_args(argv)
    if (args.model is None) == (args.output is None):
        raise EvalError("pass --output (generate a data set) or --model (evaluate models), not both")
    if args.num_samples is not None and args.num_samples < 1:
        raise EvalError(f"--num-samples {args.num_samples} must be positive")
    if args.group == "mixed":
        if args.p is None:
            raise EvalError("--group mixed needs --p, the probability of a hard A5 element")
        if not 0 <= args.p <= 1:
            raise EvalError(f"--p {args.p}: must be a probability in [0, 1]")
    elif args.p is not None:
        raise EvalError(f"--p applies to --group mixed only, not {args.group}")
    if args.model is not None:
        if args.batch_size < 1:
            raise EvalError(f"--batch-size {args.batch_size} must be positive")
        return evaluate_models(args)
    if args.length < 1:
        raise EvalError(f"--length {args.length} must be positive")
    num_samples = 1000 if args.num_samples is None else args.num_samples
    tokens, labels = sample(args.group, num_samples, args.length, args.seed, args.p)

    metadata = {
        "group": get_monoid(args.group).name,
        "vocab_size": get_monoid(args.group).size,
        "p": args.p,
        "num_samples": num_samples,
        "length": args.length,
        "seed": args.seed,
        "composition": "(a * b)(i) = a(b(i)); labels[t] = tokens[0] * ... * tokens[t]",
        # Through JSON to plain types (`torch.__version__` is a str subclass), so `weights_only` loading reads it.
        "run": json.loads(json.dumps(run_metadata(args))),
    }
    if args.group == "mixed":
        metadata["token_layout"] = f"4 * a5_index + monoid_index (monoid {', '.join(APERIODIC_ELEMENTS)})"
        metadata["hard_fraction"] = hard_mask(tokens).double().mean().item()
    payload = {"tokens": tokens, "labels": labels, "metadata": metadata}
    atomic_write(args.output, lambda temporary: torch.save(payload, temporary))
    hard = f", {metadata['hard_fraction']:.2%} hard tokens" if args.group == "mixed" else ""
    print(
        f"{num_samples} x {args.length} tokens of {metadata['group']} (vocabulary {metadata['vocab_size']}"
        f"{hard}) -> {args.output}"
    )
    return payload


if __name__ == "__main__":
    main()
