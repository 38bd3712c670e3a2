"""The `implicit-lm` console command and the one installed namespace."""

from __future__ import annotations

import importlib
import importlib.metadata
import shutil
import subprocess
import sys

import pytest
from conftest import run_module

from implicit_lm import cli


def test_the_installed_distribution_adds_only_its_namespace_and_the_remote_code(tmp_path):
    distribution = importlib.metadata.distribution("implicit-lm")
    assert sorted(distribution.read_text("top_level.txt").split()) == ["implicit_lm", "modeling_implicit"]
    scripts = {entry.name: entry.value for entry in distribution.entry_points if entry.group == "console_scripts"}
    assert scripts == {"implicit-lm": "implicit_lm.cli:main"}
    # Outside the checkout (whose folders `python -m` would put on the path), only the namespace imports.
    probe = ("import importlib.util, implicit_lm.eval, implicit_lm.training; print([name for name in ('eval', "
             "'training', 'demo', 'benchmarks', 'conversion', 'model_cards') if importlib.util.find_spec(name)])")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_every_command_names_a_module_with_a_main():
    for target in cli.COMMANDS.values():
        for module in [target] if isinstance(target, str) else target.values():
            assert callable(importlib.import_module(module).main), module


def test_a_command_runs_its_module_with_the_remaining_arguments(monkeypatch):
    seen = []
    monkeypatch.setattr(importlib.import_module("implicit_lm.eval.perplexity"), "main", seen.append)
    cli.main(["eval", "perplexity", "--model", "m", "--data", "d"])
    assert seen == [["--model", "m", "--data", "d"]]


@pytest.mark.parametrize(
    "argv, message",
    [([], "usage: implicit-lm"), (["train"], "unknown command 'train'"),
     (["eval"], "eval needs a command"), (["eval", "bleu"], "unknown eval command 'bleu'; choose from harness")],
)
def test_an_unknown_or_missing_command_names_the_choices(argv, message):
    with pytest.raises(SystemExit, match=message):
        cli.main(argv)


def test_the_console_script_shows_a_commands_own_help(capsys):
    executable = shutil.which("implicit-lm") or pytest.fail("the implicit-lm console script is not installed")
    result = subprocess.run([executable, "eval", "state-tracking", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--lengths" in result.stdout
    # The listing and `python -m implicit_lm` in this interpreter (an interpreter start costs seconds).
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0 and "eval state-tracking" in capsys.readouterr().out
    assert run_module("implicit_lm", "convert", "--help") == 0 and "--layout" in capsys.readouterr().out
