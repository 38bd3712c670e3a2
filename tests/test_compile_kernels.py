"""Every Triton kernel of ours compiles for A100 (sm_80) and H100 (sm_90), for every specialization the models launch
(benchmarks/compile_kernels.py: the presets' and bundled models' shapes, float32 / bfloat16 / float16, padded or not,
both stop modes). The interpreter the other kernel tests use accepts programs the compiler rejects."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

pytest.importorskip("triton", reason="triton is not installed")


@pytest.mark.e2e  # about two minutes of compiling
def test_every_kernel_compiles_for_a100_and_h100(tmp_path):
    report = tmp_path / "compiled.json"
    # A cache of its own: a kernel compiled earlier on this machine must be compiled again.
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "triton-cache")}
    result = subprocess.run([sys.executable, "-m", "benchmarks.compile_kernels", "--json", str(report)], cwd=ROOT,
                            check=False, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    print(result.stdout)  # the list of what was compiled (pytest -s or -rA shows it)
    kernels = json.loads(report.read_text())["kernels"]
    compiled = json.loads(report.read_text())["compiled"]
    assert kernels == ["_mamba2_decode_step_kernel", "_picard_update_kernel"]
    for capability in (80, 90):
        here = [entry for entry in compiled if entry["capability"] == capability]
        # A kernel added to triton_kernels.py that no model launches (or that this check misses) fails here.
        assert sorted({entry["kernel"] for entry in here}) == kernels, capability
        assert all(entry["cubin_bytes"] > 0 and entry["ptx_bytes"] > 0 for entry in here)
        for kernel in kernels:
            for dtype in ("fp32", "bf16", "fp16"):  # the iterate's / the activations' type
                pointer = "z_ptr" if "picard" in kernel else "xbc_ptr"
                assert any(entry["kernel"] == kernel and entry["signature"][pointer]
                           == f"*{dtype}" for entry in here), (capability, kernel, dtype)
        picard = [entry["constants"] for entry in here if entry["kernel"] == "_picard_update_kernel"]
        assert {constants["RELATIVE"] for constants in picard} == {True, False}
        decode = [entry["constants"] for entry in here if entry["kernel"] == "_mamba2_decode_step_kernel"]
        assert {constants["HAS_KEEP"] for constants in decode} == {True, False}
        # the presets' heads (64 wide, state 128) and the bundled models' narrower ones
        assert {(c["HEAD_DIM"], c["STATE_SIZE"]) for c in decode} >= {(64, 128), (16, 16), (32, 64)}
