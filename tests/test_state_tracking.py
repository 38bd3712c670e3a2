"""`eval.state_tracking`: group tables against explicit permutation composition, word-problem labels against a Python
fold, the D_p sampler, accuracy, and the command line."""

from __future__ import annotations

import itertools
import math
import random
import warnings
from functools import reduce

import pytest
import torch
from conftest import run_module
from implicit_lm.eval import state_tracking as st

from implicit_lm.tasks import word_problems as wp


def compose(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """(a * b)(i) = a(b(i)): b first, as the reference's `Perm.__mul__`."""
    return tuple(a[b[i]] for i in range(len(b)))


def parity(perm: tuple[int, ...]) -> int:
    return sum(perm[i] > perm[j] for i, j in itertools.combinations(range(len(perm)), 2)) % 2


def as_tuples(group: wp.FiniteMonoid) -> list[tuple[int, ...]]:
    return [tuple(row) for row in group.permutations.tolist()]


def test_group_elements():
    s5, a5 = wp.symmetric_group(), wp.alternating_group()
    assert (s5.size, a5.size) == (120, 60)
    assert as_tuples(s5) == list(itertools.permutations(range(5)))  # lexicographic, the reference's order
    assert as_tuples(a5) == [perm for perm in itertools.permutations(range(5)) if parity(perm) == 0]
    assert as_tuples(s5)[0] == as_tuples(a5)[0] == (0, 1, 2, 3, 4)
    for group in (s5, a5):
        assert group.table.dtype == torch.uint8 and group.table.shape == (group.size, group.size)


@pytest.mark.parametrize("build", [wp.symmetric_group, wp.alternating_group])
def test_table_is_permutation_composition(build):
    group = build()
    perms = as_tuples(group)
    index = {perm: i for i, perm in enumerate(perms)}
    table = group.table.tolist()
    for a, b in itertools.product(range(group.size), repeat=2):
        assert table[a][b] == index[compose(perms[a], perms[b])]


def test_a5_is_the_even_subgroup_of_s5():
    s5, a5 = wp.symmetric_group(), wp.alternating_group()
    s5_index = {perm: i for i, perm in enumerate(as_tuples(s5))}
    embed = torch.tensor([s5_index[perm] for perm in as_tuples(a5)])
    # Closed: every product of even permutations is an A5 element, and A5's table is S5's restricted to it.
    assert torch.equal(embed[a5.table.long()], s5.table[embed[:, None], embed[None, :]].long())
    assert all(parity(compose(a, b)) == 0 for a, b in itertools.product(as_tuples(a5), repeat=2))


@pytest.mark.parametrize(
    "build", [wp.symmetric_group, wp.alternating_group, wp.aperiodic_monoid, wp.mixed_monoid], ids=lambda b: b.__name__
)
def test_monoid_axioms(build):
    monoid = build()
    table = monoid.table.long()
    elements = torch.arange(monoid.size)
    assert torch.equal(table[0], elements) and torch.equal(table[:, 0], elements)  # identity
    if monoid.size <= 120:  # every triple
        a, b, c = torch.cartesian_prod(elements, elements, elements).unbind(-1)
    else:
        a, b, c = torch.randint(monoid.size, (3, 200_000), generator=torch.Generator().manual_seed(0))
    assert torch.equal(table[table[a, b], c], table[a, table[b, c]])


@pytest.mark.parametrize("build", [wp.symmetric_group, wp.alternating_group])
def test_inverses(build):
    group = build()
    inverse = group.inverses()
    assert inverse.dtype == torch.uint8
    perms = as_tuples(group)
    for a in range(group.size):
        assert compose(perms[a], perms[inverse[a]]) == compose(perms[inverse[a]], perms[a]) == (0, 1, 2, 3, 4)


def test_aperiodic_monoid():
    monoid = wp.aperiodic_monoid()
    assert monoid.size == 4
    assert monoid.table.tolist() == [list(row) for row in wp.APERIODIC_TABLE]
    for element in range(4):  # aperiodic: m^k = m^(k+1) (k = 2 suffices here)
        powers = [element]
        for _ in range(3):
            powers.append(int(monoid.table[powers[-1], element]))
        assert powers[2] == powers[3]
    with pytest.raises(ValueError, match="not a group"):
        monoid.inverses()


def test_mixed_monoid_is_the_componentwise_product():
    mixed, a5 = wp.mixed_monoid(), wp.alternating_group()
    assert mixed.size == 240
    perms = as_tuples(a5)
    index = {perm: i for i, perm in enumerate(perms)}
    rng = random.Random(0)
    for _ in range(2000):
        (g1, m1), (g2, m2) = [(rng.randrange(60), rng.randrange(4)) for _ in range(2)]
        expected = 4 * index[compose(perms[g1], perms[g2])] + wp.APERIODIC_TABLE[m1][m2]
        assert mixed.table[4 * g1 + m1, 4 * g2 + m2] == expected
    assert mixed.table.dtype == torch.uint8


def fold_labels(group: wp.FiniteMonoid, tokens: list[int]) -> list[int]:
    """Running products by explicit composition: permutations for groups, the monoid's table for M."""
    if group.name == "A5xM":
        perms = as_tuples(wp.alternating_group())
        parts = [(perms[t // 4], t % 4) for t in tokens]
        step = lambda x, y: (compose(x[0], y[0]), wp.APERIODIC_TABLE[x[1]][y[1]])  # noqa: E731
        index = {perm: i for i, perm in enumerate(perms)}
        return [4 * index[g] + m for g, m in itertools.accumulate(parts, step)]
    perms = as_tuples(group)
    index = {perm: i for i, perm in enumerate(perms)}
    return [index[perm] for perm in itertools.accumulate((perms[t] for t in tokens), compose)]


@pytest.mark.parametrize("name", wp.GROUPS)
@pytest.mark.parametrize("length", [1, 2, 7, 33])
def test_labels_are_running_products(name, length):
    group = wp.get_monoid(name)
    if name == "mixed":
        tokens, labels = wp.mixed_word_problem(0.5, 4, length, seed=1)
    else:
        tokens, labels = wp.word_problem(name, 4, length, seed=1)
    assert tokens.shape == labels.shape == (4, length)
    assert tokens.dtype == labels.dtype == torch.uint8
    assert int(tokens.max()) < group.size
    for row_tokens, row_labels in zip(tokens.tolist(), labels.tolist()):
        assert row_labels == fold_labels(group, row_tokens)


def test_label_is_the_map_x0_after_x1():
    """The convention spelled out: y_t(i) = x_0(x_1(...x_t(i)))."""
    tokens, labels = wp.word_problem("S5", 3, 5, seed=2)
    perms = wp.symmetric_group().permutations
    for row_tokens, row_labels in zip(tokens.long(), labels.long()):
        expected = reduce(lambda acc, token: acc[perms[token]], row_tokens.tolist(), torch.arange(5))
        assert torch.equal(perms[row_labels[-1]], expected)


def test_determinism():
    first = wp.mixed_word_problem(0.3, 8, 16, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(first, wp.mixed_word_problem(0.3, 8, 16, seed=5)))
    assert not torch.equal(first[0], wp.mixed_word_problem(0.3, 8, 16, seed=6)[0])
    tokens, _ = wp.word_problem("A5", 8, 16, seed=5)
    assert torch.equal(tokens, wp.word_problem("A5", 8, 16, seed=5)[0])
    assert not torch.equal(tokens, wp.word_problem("A5", 8, 16, seed=6)[0])


def test_word_problem_is_uniform_over_the_group():
    tokens, _ = wp.word_problem("S5", 400, 300, seed=0)
    counts = torch.bincount(tokens.flatten().long(), minlength=120).double()
    expected = tokens.numel() / 120
    assert ((counts - expected).abs() < 6 * math.sqrt(expected)).all()


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_mixed_hard_rate(p):
    tokens, _ = wp.mixed_word_problem(p, 200, 256, seed=3)
    hard = wp.hard_mask(tokens)
    assert torch.equal(hard, tokens.long() // 4 != 0)
    n = tokens.numel()
    # Binomial(n, p): within 5 standard deviations (exact at p in {0, 1}).
    assert abs(hard.double().mean().item() - p) <= 5 * math.sqrt(p * (1 - p) / n)
    monoid_counts = torch.bincount(tokens.flatten().long() % 4, minlength=4).double()
    assert ((monoid_counts / n - 0.25).abs() < 5 * math.sqrt(0.25 * 0.75 / n)).all()
    if p > 0:  # hard elements are the 59 non-identities, uniformly
        counts = torch.bincount(tokens[hard].long() // 4, minlength=60).double()
        assert counts[0] == 0
        expected = hard.sum().item() / 59
        assert ((counts[1:] - expected).abs() < 6 * math.sqrt(expected)).all()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: wp.mixed_word_problem(1.5, 2, 2, 0), "probability"),
        (lambda: wp.mixed_word_problem(-0.1, 2, 2, 0), "probability"),
        (lambda: wp.word_problem("S5", 0, 2, 0), "positive"),
        (lambda: wp.word_problem("S5", 2, -1, 0), "positive"),
        (lambda: wp.word_problem("S6", 2, 2, 0), "unknown group"),
        (lambda: wp.symmetric_group(6), "more than uint8"),
    ],
)
def test_generator_rejects_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_accuracy():
    labels = torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.uint8)
    predictions = torch.tensor([[1, 2, 0], [4, 0, 0]])
    result = st.accuracy(predictions, labels)
    assert torch.allclose(result.per_position, torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64))
    assert result.overall == pytest.approx(0.5)
    logits = torch.nn.functional.one_hot(labels.long(), 8).float()
    assert st.accuracy(logits, labels).overall == 1.0
    with pytest.raises(ValueError, match="do not match"):
        st.accuracy(predictions[:, :2], labels)


def test_cli_writes_the_data(tmp_path, capsys):
    output = tmp_path / "mixed.pt"
    argv = ["--group", "mixed", "--p", "0.25", "--length", "12", "--num-samples", "10", "--seed", "4"]
    st.main([*argv, "--output", str(output)])
    saved = torch.load(output, weights_only=True)
    tokens, labels = wp.mixed_word_problem(0.25, 10, 12, seed=4)
    assert torch.equal(saved["tokens"], tokens) and torch.equal(saved["labels"], labels)
    assert saved["tokens"].dtype == saved["labels"].dtype == torch.uint8
    metadata = saved["metadata"]
    assert (metadata["group"], metadata["vocab_size"], metadata["p"], metadata["seed"]) == ("A5xM", 240, 0.25, 4)
    assert metadata["hard_fraction"] == wp.hard_mask(tokens).double().mean().item()
    assert "A5xM" in capsys.readouterr().out


def test_cli_module_entry_point(tmp_path):
    output = tmp_path / "s5.pt"
    assert run_module("implicit_lm.eval.state_tracking", "--group", "S5", "--length", "5", "--num-samples", "3",
                      "--output", str(output)) == 0
    saved = torch.load(output, weights_only=True)
    assert torch.equal(saved["tokens"], wp.word_problem("S5", 3, 5, seed=0)[0])
    assert saved["metadata"]["vocab_size"] == 120 and saved["metadata"]["p"] is None


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        st.main(["--help"])
    assert exit_info.value.code == 0
    assert "--group" in capsys.readouterr().out


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--group", "S6"], "invalid choice"),
        (["--group", "mixed", "--p", "1.5"], "must be a probability"),
        (["--group", "mixed", "--p", "-0.1"], "must be a probability"),
        (["--group", "mixed"], "needs --p"),
        (["--group", "A5", "--p", "0.5"], "mixed only"),
        (["--group", "S5", "--length", "0"], "must be positive"),
        (["--group", "S5", "--num-samples", "-3"], "must be positive"),
    ],
)
def test_cli_bad_input_exits_2(arguments, message, tmp_path, capsys):
    output = tmp_path / "data.pt"
    with pytest.raises(SystemExit) as exit_info:
        st.main([*arguments, "--output", str(output)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not output.exists()


class Oracle(torch.nn.Module):
    """Predicts the running product exactly, except at positions >= `wrong_from` (predicts a wrong element)."""

    def __init__(self, group: str, wrong_from: int, implicit: bool = True):
        super().__init__()
        self.monoid, self.wrong_from = wp.get_monoid(group), wrong_from
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = type("Config", (), {"vocab_size": 64, "inference_mode": "simultaneous",
                                          "model_type": "implicit_mamba2", "implicit": implicit,
                                          "eval_max_iterations": 50})()
        self.calls = []

    def forward(self, input_ids, use_cache=False, solver_overrides=None):
        overrides = solver_overrides or {}
        self.calls.append((overrides.get("inference_mode", "-"), overrides.get("eval_max_iterations")))
        labels = self.monoid.running_product(input_ids.to(torch.uint8)).long()
        labels[:, self.wrong_from :] = (labels[:, self.wrong_from :] + 1) % self.monoid.size
        return type("Output", (), {"logits": torch.nn.functional.one_hot(labels, 64).float(), "solver_stats": None})


def test_length_generalization_metrics_on_an_oracle():
    oracle = Oracle("A5", wrong_from=30)
    rows = st.length_generalization(oracle, "A5", [20, 40], num_samples=5, batch_size=2, simultaneous_caps=(2.0, None))
    assert [(r["length"], st.mode_label(r)) for r in rows] == [
        (20, "sequential"), (20, "simultaneous (cap 2L)"), (20, "simultaneous (cap 50)"),
        (40, "sequential"), (40, "simultaneous (cap 2L)"), (40, "simultaneous (cap 50)")]
    # Three batches per solve; a cap of 2L never falls below the model's own (50), and None keeps it.
    assert oracle.calls == ([("sequential", None)] * 3 + [("simultaneous", 50)] * 3 + [("simultaneous", None)] * 3
                            + [("sequential", None)] * 3 + [("simultaneous", 80)] * 3 + [("simultaneous", None)] * 3)
    assert [r.get("iteration_cap") for r in rows] == [None, 50, 50, None, 80, 50]
    assert oracle.config.inference_mode == "simultaneous"  # untouched
    short, long = rows[0], rows[3]
    assert short["accuracy"] == short["sequence_accuracy"] == short["final_accuracy"] == 1.0
    assert long["accuracy"] == pytest.approx(30 / 40) and long["sequence_accuracy"] == long["final_accuracy"] == 0
    assert long["iterations_mean"] is None  # no solver statistics
    assert all(row["agreement"] == 1.0 for row in rows if row["mode"] == "simultaneous")
    assert all(row["num_samples"] == 5 for row in rows)
    # Simultaneous mode skipped past a length; an explicit model is evaluated once per length, without overrides.
    rows = st.length_generalization(oracle, "A5", [20, 40], num_samples=2, simultaneous_max_length=20)
    assert [(r["length"], r["mode"]) for r in rows] == [(20, "sequential"), (20, "simultaneous"), (40, "sequential")]
    explicit = Oracle("A5", wrong_from=30, implicit=False)
    rows = st.length_generalization(explicit, "A5", [20, 40], num_samples=2)
    assert [(r["length"], r["mode"]) for r in rows] == [(20, "explicit"), (40, "explicit")]
    assert explicit.calls == [("-", None)] * 2
    table = st.format_table({"oracle": {"parameters": 1000, "rows": rows}})
    assert "| oracle | 1K | explicit | 1.000 [1.000, 1.000] (n=2) | 0.750 [0.750, 0.750] (n=2) |" in table
    assert "Duality" not in table
    with pytest.raises(ValueError, match="more than the model's vocabulary"):
        st.length_generalization(oracle, "S5", [4], num_samples=2)
    with pytest.raises(ValueError, match="unknown modes"):
        st.length_generalization(oracle, "A5", [4], num_samples=2, modes=("parallel",))
    with pytest.raises(ValueError, match="simultaneous_caps"):
        st.length_generalization(oracle, "A5", [4], num_samples=2, simultaneous_caps=(0.0,))


def test_length_generalization_of_an_implicit_model():
    """Solver iterations in both modes; at a tight tolerance the two modes reach the same fixed point, so they predict
    the same."""
    from conftest import tiny_mamba2

    model = tiny_mamba2(num_hidden_layers=1, tolerance=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # expected non-convergence is reported in a column, never warned about
        rows = st.length_generalization(model, "A5", [6, 12], num_samples=4)
        capped = st.length_generalization(model, "A5", [12], num_samples=4, modes=("simultaneous",),
                                          simultaneous_caps=(None,), progress=False)
    sequential, simultaneous = rows[2], rows[3]
    assert sequential["mode"] == "sequential" and simultaneous["mode"] == "simultaneous"
    assert sequential["accuracy"] == simultaneous["accuracy"] and simultaneous["agreement"] == 1.0
    assert 1 <= sequential["iterations_mean"] <= sequential["iterations_max"] <= model.config.eval_max_iterations
    assert sequential["converged_fraction"] == simultaneous["converged_fraction"] == 1.0
    assert capped[0]["agreement"] is None  # no sequential predictions to compare with

    model.config.eval_max_iterations = 2  # far too few: the solves stop at the cap, silently, and the column says so
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (row,) = st.length_generalization(model, "A5", [12], num_samples=4, modes=("simultaneous",),
                                          simultaneous_caps=(None,))
    assert row["converged_fraction"] == 0.0 and row["iterations_max"] == 2


def test_cli_evaluates_models(tmp_path, capsys):
    from conftest import tiny_mamba2

    tiny_mamba2(num_hidden_layers=1, tolerance=1e-4).save_pretrained(tmp_path / "a" / "final")
    tiny_mamba2(num_hidden_layers=1, implicit=False).save_pretrained(tmp_path / "b" / "final")
    payload = st.main(["--group", "A5", "--model", str(tmp_path / "a" / "final"), "--model",
                       str(tmp_path / "b" / "final"), "--lengths", "4,8", "--num-samples", "3",
                       "--output-dir", str(tmp_path / "out")])
    assert list(payload["results"]) == ["a/final", "b/final"]  # folder names repeat: labelled with the parent
    implicit, explicit = payload["results"].values()
    assert implicit["implicit"] and not explicit["implicit"] and len(implicit["rows"]) == 4
    assert all(row["iterations_mean"] is None for row in explicit["rows"])
    out = capsys.readouterr().out
    assert "| a/final |" in out and "acc@8" in out and "iters (converged) @4" in out and "same as sequential @8" in out
    assert (tmp_path / "out" / "length_generalization.png").stat().st_size > 0
    saved = __import__("json").loads((tmp_path / "out" / "length_generalization.json").read_text())
    assert saved["results"]["b/final"]["rows"] == explicit["rows"]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--lengths", "4,x"], "comma-separated integers"),
        (["--modes", "parallel"], "--modes"),
        (["--batch-size", "0"], "--batch-size"),
        (["--simultaneous-caps", "2L,fast"], "--simultaneous-caps '2L,fast'"),
        (["--simultaneous-caps", "-1"], "must be positive"),
        (["--output", "x.pt"], "not both"),
    ],
)
def test_cli_evaluation_bad_input_exits_2(arguments, message, tmp_path, capsys):
    from conftest import tiny_mamba2

    tiny_mamba2(num_hidden_layers=1).save_pretrained(tmp_path / "m")
    with pytest.raises(SystemExit) as exit_info:
        st.main(["--group", "A5", "--model", str(tmp_path / "m"), "--output-dir", str(tmp_path / "out"), *arguments])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out" / "length_generalization.json").exists()


def test_cli_refuses_a_model_with_too_small_a_vocabulary(tmp_path, capsys):
    from conftest import tiny_mamba2

    tiny_mamba2(num_hidden_layers=1).save_pretrained(tmp_path / "m")  # vocabulary 64 < 120 elements of S5
    with pytest.raises(SystemExit) as exit_info:
        st.main(["--group", "S5", "--model", str(tmp_path / "m"), "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "more than the model's vocabulary" in capsys.readouterr().err


@pytest.mark.parametrize("group", wp.GROUPS)
def test_tokenizer_ids_are_element_indices(group):
    names = wp.element_names(group)
    assert len(set(names)) == len(names) == wp.get_monoid(group).size and names[0].startswith("01234")
    if group != "mixed":
        assert [tuple(map(int, name)) for name in names] == as_tuples(wp.get_monoid(group))
    tokenizer = wp.word_problem_tokenizer(group)
    tokens = wp.sample(group, 2, 7, seed=0, p=0.5 if group == "mixed" else None)[0][0].tolist()
    text = tokenizer.decode(tokens)
    assert text.split() == [names[token] for token in tokens]
    assert tokenizer(text)["input_ids"] == tokens
    with pytest.raises(Exception, match="UNK"):  # no silent unknown token: the vocabulary is the group
        tokenizer("01234 99999")


def test_accuracy_interval_is_a_bootstrap_over_sequences():
    # 512 sequences, half of them right throughout: the 95% interval of the mean is about 0.5 +- 1.96 * sqrt(0.25/512).
    per_sequence = torch.tensor([1.0, 0.0] * 256, dtype=torch.float64)
    low, high = st.bootstrap_interval(per_sequence)
    assert low < 0.5 < high and (high - low) == pytest.approx(2 * 1.96 * (0.25 / 512) ** 0.5, rel=0.15)
    assert st.bootstrap_interval(per_sequence) == (low, high)  # seeded: the same table twice
    assert st.bootstrap_interval(torch.ones(64, dtype=torch.float64)) == (1.0, 1.0)
    rows = st.length_generalization(Oracle("A5", wrong_from=30), "A5", [40], num_samples=8, modes=("sequential",))
    (row,) = rows
    low, high = row["accuracy_interval"]
    assert low <= row["accuracy"] <= high  # every sequence is 30/40 right: a point
    assert low == high == pytest.approx(0.75)
