"""eval.noise: the noise study's accuracy/iterations sweep on a bundled state-tracking model."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT
from implicit_lm.eval import noise

MODEL = str(ROOT / "models" / "implicit-mamba2-a5")


def test_sweep_writes_json_and_figure_and_repeats(tmp_path):
    argv = ["--model", MODEL, "--length", "6", "--samples", "4", "--snr-db", "30,3", "--modes", "additive",
            "--output-dir", str(tmp_path / "a")]
    first = noise.main(argv)
    rows = first["results"]
    assert [(row["noise_mode"], row["snr_db"]) for row in rows] == [(None, None), ("additive", 30.0), ("additive", 3.0)]
    assert (tmp_path / "a" / "noise.png").stat().st_size > 0
    assert json.loads((tmp_path / "a" / "noise.json").read_text())["results"] == rows
    clean, mild, loud = rows
    assert loud["iterations_mean"] > clean["iterations_mean"]  # noise at every iteration slows the solver
    again = noise.main([*argv[:-1], str(tmp_path / "b")])["results"]
    assert again == rows  # seeded: the same noise


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--snr-db", "0"], "must be > 0"),
        (["--snr-db", "loud"], "comma-separated numbers"),
        (["--modes", "pink"], "--modes must be among"),
        (["--length", "1"], "--length must be >= 2"),
    ],
)
def test_bad_arguments_are_named(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        noise.main(["--model", MODEL, "--output-dir", str(tmp_path), *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
