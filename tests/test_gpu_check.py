"""The GPU session's script, rehearsed on the CPU: the wheels it carries build in one command and stay small, and
`benchmarks/gpu_check.sh --rehearse` runs every step a GPU does not need (install into a fresh venv, import from the
wheel, collect the kernel tests, the benchmarks at the tiny size) with the GPU run's own commands and flags."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import ROOT


def run(*command: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
                          env={**os.environ, **env})


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpu") / "wheels"
    had_build = (ROOT / "build").exists()
    result = run("bash", "benchmarks/build_gpu_wheels.sh", str(folder))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (ROOT / "build").exists() == had_build  # setuptools' in-tree build folder is not left behind
    return folder


@pytest.mark.e2e  # builds wheels and a venv, runs the benchmarks
def test_the_wheels_build_small_and_the_rehearsal_runs_every_step(wheels, tmp_path):
    names = sorted(path.name.split("-")[0] for path in wheels.glob("*.whl"))
    assert names == ["einops", "implicit_lm", "mamba_ssm"]
    assert sum(path.stat().st_size for path in wheels.iterdir()) < 8 * 2**20

    out = tmp_path / "out"
    result = run("bash", "benchmarks/gpu_check.sh", "--rehearse", str(out), GPU_WHEELS=str(wheels))
    assert result.returncode == 0, result.stderr[-3000:]
    report = (out / "gpu.txt").read_text()
    assert "rehearsal on the CPU" in report and "gpu-check-venv" in report  # imported from the installed wheel
    assert "tests collected" in (out / "test_kernels.log").read_text()
    for name in ("inference-mamba2-tiny-cpu-float32", "inference-mamba2-tiny-cpu-bfloat16", "inference-llama-tiny-cpu"):
        figures = json.loads((out / f"{name}.json").read_text())
        assert figures["device_name"] == "cpu" and figures["size"] == "tiny" and figures["decode"]["eager"], name


@pytest.mark.e2e
def test_without_the_wheels_the_script_names_the_command_that_builds_them(tmp_path):
    result = run("bash", "benchmarks/gpu_check.sh", "--rehearse", str(tmp_path / "out"), GPU_WHEELS=str(tmp_path))
    assert result.returncode == 1
    assert f"error: no implicit_lm wheel in {tmp_path}: run bash benchmarks/build_gpu_wheels.sh" in result.stderr


@pytest.mark.e2e
def test_the_wheel_builder_never_writes_into_a_folder_of_other_files(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes\n")
    result = run("bash", "benchmarks/build_gpu_wheels.sh", str(folder))
    assert result.returncode == 1 and "holds files other than wheels" in result.stderr
    assert [path.name for path in folder.iterdir()] == ["notes.txt"]
    assert (folder / "notes.txt").read_text() == "my notes\n"
