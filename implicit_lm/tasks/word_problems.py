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

Tokens and labels are uint8.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Any

import torch

from implicit_lm.tasks.tokenizer import word_level_tokenizer

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


# The special tokens of a word-problem tokenizer, after the group's elements (ids `len(elements)` on): what tools
# expect of a language model's tokenizer (lm-eval's `hf` model prefixes rolling log-likelihoods with BOS and stops
# generation at EOS; batches pad). The models never saw them in training.
WORD_PROBLEM_SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}


def word_problem_tokenizer(group: str) -> Any:
    """A word-level tokenizer over `element_names(group)` whose token ids are the element indices, so that the text
    `"01342 12034 ..."` is a word problem (and `pipeline("text-generation")` reads and writes elements), followed by
    `WORD_PROBLEM_SPECIAL_TOKENS`. An unknown word is an error, not a silent `<unk>`."""
    names = element_names(group)
    return word_level_tokenizer([*names, *WORD_PROBLEM_SPECIAL_TOKENS.values()], WORD_PROBLEM_SPECIAL_TOKENS)


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
