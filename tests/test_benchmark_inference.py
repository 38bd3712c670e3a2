"""The inference benchmark runs end to end on a tiny model and reports every figure issue 8 asks for."""

import json

import pytest
from implicit_lm.benchmarks import inference


@pytest.mark.parametrize("family", ["mamba2", "llama"])
def test_benchmark_reports_every_ratio(tmp_path, capsys, family):
    path = tmp_path / "report.json"
    report = inference.main(["--family", family, "--size", "tiny", "--device", "cpu", "--new-tokens", "2",
                             "--prompt-length", "6", "--repeats", "1", "--json", str(path)])
    assert json.loads(path.read_text())["family"] == family
    eager = report["decode"]["eager"]
    assert eager["mean_iterations"] > 1 and eager["decode_overhead"] > 0 and eager["strict_decode_overhead"] > 0
    assert "cuda_graphs" not in report["decode"]  # CPU: no graphs to time
    assert report["simultaneous"]["by_iterations"][8]["simultaneous_overhead"] > 0
    rows = report["iterations"]["random tiny"]
    assert set(rows) == {"picard", "anderson", "picard + warm start", "anderson + warm start"}
    assert rows["picard"]["saved"] == 0 and rows["picard"]["max_logit_change"] == 0
    assert all(row["converged"] == 1 for row in rows.values())
    assert set(report["kernels"].values()) == {"torch"}
    printed = capsys.readouterr().out
    assert "decode overhead" in printed and "simultaneous, S=8" in printed and "anderson + warm start" in printed


def test_benchmark_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        inference.main(["--size", "tiny", "--tolerance", "0"])


def test_a_batch_reports_what_it_paid_with_and_without_setting_rows_aside():
    report = inference.main(["--family", "mamba2", "--size", "tiny", "--device", "cpu", "--new-tokens", "3",
                             "--prompt-length", "4", "--batch", "4", "--repeats", "1", "--sections", "decode"])
    decode = report["decode"]
    assert decode["eager"]["paid_per_needed"] == pytest.approx(1.0)  # each row pays its own iterations
    assert decode["eager_all_rows"]["paid_per_needed"] > 1.0  # every row until the slowest converged
    assert decode["eager"]["mean_iterations"] == pytest.approx(decode["eager_all_rows"]["mean_iterations"], rel=0.1)
