"""eval.perplexity, eval.duality and eval.solver_dynamics end to end on tiny saved models and data made here."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import FAMILIES, build_tokenizer, run_module
from implicit_lm.eval import duality, perplexity, solver_dynamics

WORDS = "the implicit model iterates its layers to a fixed point mary went to the kitchen and john".split()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "data.txt"
    path.write_text(" ".join(rng.choice(WORDS, size=600)))
    return path


def run(command, argv, capsys=None):
    return command.main([str(a) for a in argv])


def expect_error(command, argv, capsys, message):
    with pytest.raises(SystemExit) as exit_info:
        command.main([str(a) for a in argv])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert message in error, error


# --- perplexity -----------------------------------------------------------------------------------------------------


def test_perplexity_of_uniform_logits_is_vocab_size(tmp_path, family, text_file):
    tokenizer = build_tokenizer()
    model = FAMILIES[family](vocab_size=len(tokenizer), tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    results = run(perplexity, ["--model", tmp_path / "model", "--data", text_file, "--seq-len", 32,
                               "--max-sequences", 3, "--batch-size", 2, "--output-dir", tmp_path / "out"])
    assert results["perplexity"] == pytest.approx(len(tokenizer), rel=1e-6)
    assert results["tokens"] == 3 * 31
    written = json.loads((tmp_path / "out" / "perplexity.json").read_text())
    assert written["perplexity"] == pytest.approx(len(tokenizer), rel=1e-6)
    assert (tmp_path / "out" / "perplexity.png").stat().st_size > 0


def test_perplexity_buckets_extrapolation_and_stats(tmp_path, saved_model, text_file):
    results = run(perplexity, ["--model", saved_model, "--data", text_file, "--seq-len", 48, "--max-sequences", 2,
                               "--batch-size", 2, "--bucket-size", 10, "--train-length", 6,
                               "--output-dir", tmp_path])
    assert [(b["start"], b["end"]) for b in results["buckets"]] == [(0, 10), (10, 20), (20, 30), (30, 40), (40, 47)]
    assert list(results["extrapolation"]) == ["1x", "2x", "4x", "8x"]
    assert [(r["start"], r["end"]) for r in results["extrapolation"].values()] == [(0, 6), (6, 12), (12, 24), (24, 47)]
    # The overall perplexity is the token-weighted combination of the buckets.
    weighted = sum(b["nll"] * (b["end"] - b["start"]) for b in results["buckets"]) / 47
    assert results["nll"] == pytest.approx(weighted, rel=1e-9)
    assert 1 < results["perplexity"] < 10 * len(build_tokenizer())
    stats = results["solver_stats"]["per_sequence"]
    assert stats["count"] == 2 and stats["iterations_mean"] >= 1 and stats["converged_fraction"] == 1.0
    assert results["solver_stats"]["per_token"] is None
    assert results["metadata"]["model"]["implicit"] is True


def test_sequential_streaming_matches_simultaneous(tmp_path, saved_model, text_file):
    common = ["--model", saved_model, "--data", text_file, "--seq-len", 24, "--max-sequences", 2, "--batch-size", 2,
              "--tolerance", 1e-7, "--eval-max-iterations", 400]
    simultaneous = run(perplexity, [*common, "--output-dir", tmp_path / "a"])
    sequential = run(perplexity, [*common, "--inference-mode", "sequential", "--chunk-size", 5,
                                  "--output-dir", tmp_path / "b"])
    assert sequential["inference_mode"] == "sequential"
    assert sequential["perplexity"] == pytest.approx(simultaneous["perplexity"], rel=1e-4)
    assert sequential["solver_stats"]["per_token"]["count"] == 2 * 24
    assert sequential["metadata"]["model"]["solver"]["tolerance"] == 1e-7


def test_fast_inference_flags_keep_the_perplexity(tmp_path, saved_model, text_file, capsys):
    common = ["--model", saved_model, "--data", text_file, "--seq-len", 12, "--max-sequences", 2, "--batch-size", 2,
              "--tolerance", 1e-7, "--eval-max-iterations", 400, "--inference-mode", "sequential"]
    plain = run(perplexity, [*common, "--output-dir", tmp_path / "a"])
    fast = run(perplexity, [*common, "--warm-start", "true", "--convergence-check-interval", 4, "--solver", "anderson",
                            "--output-dir", tmp_path / "b"])
    assert fast["perplexity"] == pytest.approx(plain["perplexity"], rel=1e-4)
    with pytest.raises(SystemExit):
        run(perplexity, [*common, "--warm-start", "maybe"])
    assert "expected true or false" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".jsonl", ".npy", ".pt"])
def test_perplexity_reads_every_data_format(tmp_path, saved_model, suffix):
    tokenizer = build_tokenizer()
    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(6)]
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    else:
        ids = np.array([i for t in texts for i in tokenizer(t)["input_ids"]], dtype=np.int32)
        np.save(path, ids) if suffix == ".npy" else torch.save(torch.from_numpy(ids), path)
    results = run(perplexity, ["--model", saved_model, "--data", path, "--seq-len", 16, "--output-dir", tmp_path])
    assert results["sequences"] >= 2 and math.isfinite(results["perplexity"])


def test_perplexity_of_an_explicit_transformers_baseline(tmp_path, explicit_baseline, text_file):
    results = run(perplexity, ["--model", explicit_baseline, "--data", text_file, "--seq-len", 16,
                               "--max-sequences", 2, "--output-dir", tmp_path])
    assert math.isfinite(results["perplexity"]) and results["solver_stats"] is None
    assert results["metadata"]["model"]["implicit"] is False


@pytest.mark.parametrize("family", ["mamba2"])
def test_perplexity_bad_input(tmp_path, saved_model, explicit_baseline, text_file, capsys):
    base = ["--model", saved_model, "--output-dir", tmp_path]
    expect_error(perplexity, [*base, "--data", tmp_path / "missing.txt"], capsys, "does not exist")
    (tmp_path / "empty.txt").write_text("")
    expect_error(perplexity, [*base, "--data", tmp_path / "empty.txt"], capsys, "contains no tokens")
    expect_error(perplexity, [*base, "--data", text_file, "--seq-len", 100000], capsys, "fewer than one sequence")
    np.save(tmp_path / "big.npy", np.array([1, 2, 100000]))
    expect_error(perplexity, [*base, "--data", tmp_path / "big.npy", "--seq-len", 2], capsys, "outside the model's")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    expect_error(perplexity, [*base, "--data", tmp_path / "bad.jsonl"], capsys, "bad.jsonl:2 has no string field")
    (tmp_path / "data.csv").write_text("a,b")
    expect_error(perplexity, [*base, "--data", tmp_path / "data.csv"], capsys, "unknown data format")
    expect_error(perplexity, ["--model", tmp_path / "nowhere", "--data", text_file], capsys, "does not exist")
    expect_error(perplexity, ["--model", explicit_baseline, "--data", text_file, "--tolerance", 1e-3], capsys,
                 "not an implicit one")
    expect_error(perplexity, [*base, "--data", text_file, "--solver", "newton"], capsys, "solver='newton'")


# --- duality --------------------------------------------------------------------------------------------------------


def test_duality_match_rate_is_one_at_tight_tolerance(tmp_path, saved_model, text_file):
    results = run(duality, ["--model", saved_model, "--data", text_file, "--seq-len", 12, "--max-sequences", 2,
                            "--batch-size", 2, "--tolerance", 1e-6, "--eval-max-iterations", 300,
                            "--examples", 2, "--example-length", 8, "--output-dir", tmp_path])
    assert results["token_match_rate"] == 1.0 and results["tokens"] == 2 * 11
    simultaneous, sequential = results["perplexity"]["simultaneous"], results["perplexity"]["sequential"]
    assert sequential == pytest.approx(simultaneous, rel=1e-5)
    assert results["per_token_perplexity_difference"]["max_abs"] < 1e-2 * simultaneous
    assert len(results["examples"]) == 2
    assert {"input", "target", "simultaneous", "sequential", "match_rate"} <= set(results["examples"][0])
    assert results["solver_stats"]["sequential"]["per_token"]["count"] == 2 * 12
    assert results["solver_stats"]["simultaneous"]["per_sequence"]["count"] == 2
    assert json.loads((tmp_path / "duality.json").read_text())["token_match_rate"] == 1.0
    assert (tmp_path / "duality.png").stat().st_size > 0


def test_duality_loose_solver_lowers_the_match_rate(tmp_path, saved_models, text_file):
    # Three iterations are far from the fixed point, and the modes stop at different points: the simultaneous mode's
    # later iterations see earlier tokens' unconverged states, the sequential mode's see their committed states.
    # (With one iteration both evaluate f at z = 0 everywhere and agree.)
    results = run(duality, ["--model", saved_models["mamba2"], "--data", text_file, "--seq-len", 24,
                            "--max-sequences", 2, "--eval-max-iterations", 3, "--output-dir", tmp_path])
    assert 0 <= results["token_match_rate"] < 1
    assert results["nll_difference_max_abs"] > 1e-4


def test_duality_rejects_explicit_models(tmp_path, explicit_baseline, text_file, capsys):
    expect_error(duality, ["--model", explicit_baseline, "--data", text_file, "--output-dir", tmp_path], capsys,
                 "not an implicit model")


# --- solver dynamics ------------------------------------------------------------------------------------------------


def test_solver_dynamics_table_and_test_time_compute(tmp_path, saved_model, text_file):
    results = run(solver_dynamics, ["--model", saved_model, "--data", text_file, "--seq-len", 16,
                                    "--max-sequences", 2, "--batch-size", 2, "--iteration-caps", "8,1,2",
                                    "--output-dir", tmp_path])
    simultaneous = results["dynamics"]["simultaneous"]["solver_stats"]["per_sequence"]
    sequential = results["dynamics"]["sequential"]["solver_stats"]["per_token"]
    assert simultaneous["count"] == 2 and sequential["count"] == 32
    for stats in (simultaneous, sequential):
        assert 1 <= stats["iterations_mean"] <= stats["iterations_max"] <= results["eval_max_iterations"]
        assert stats["residual_max"] < results["tolerance"]
    points = results["test_time_compute"]["points"]
    assert [p["iteration_cap"] for p in points] == [1, 2, 8]
    for point in points:
        assert point["iterations_mean"] <= point["iteration_cap"]
        assert 0 <= point["accuracy"] <= 1 and point["perplexity"] > 1
    # One iteration from z = 0 is far from the fixed point; more iterations shrink the residual.
    assert points[0]["converged_fraction"] == 0 and points[-1]["residual_mean"] < points[0]["residual_mean"]
    assert (tmp_path / "solver_dynamics.png").stat().st_size > 0


def test_solver_dynamics_bad_input(tmp_path, saved_models, explicit_baseline, text_file, capsys):
    expect_error(solver_dynamics, ["--model", explicit_baseline, "--data", text_file, "--output-dir", tmp_path],
                 capsys, "runs no solver")
    with pytest.raises(SystemExit):
        solver_dynamics.main(["--model", str(saved_models["mamba2"]), "--data", str(text_file),
                              "--iteration-caps", "0,4"])
    assert "positive integers" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["perplexity", "duality", "solver_dynamics"])
def test_help_runs_as_a_module(module, capsys):
    assert run_module(f"implicit_lm.eval.{module}", "--help") == 0
    out = capsys.readouterr().out
    assert "--model" in out and "--data" in out
