"""torch's FSDP2 shards our models on CPUs (gloo, two processes): every block and the root sharded, trained, saved
and resumed through a distributed checkpoint, matching one unsharded process; no FSDP warning (a block once
returned views of its states: "returned a view tensor")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama, tiny_mamba2

WORKER = Path(__file__).resolve().parent / "fsdp2_worker.py"
FAMILIES = {"mamba2": tiny_mamba2, "llama": tiny_llama}


def sharded(tmp_path: Path, family: str, *options: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), "--family", family, *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.e2e  # two processes with a process group
@pytest.mark.parametrize("family", FAMILIES)
def test_fsdp2_training_saved_and_resumed_matches_one_process(tmp_path, family):
    sharded(tmp_path, family, "--steps", "2", "--save", str(tmp_path / "checkpoint"), "--out", str(tmp_path / "a.pt"))
    sharded(tmp_path, family, "--steps", "1", "--first-step", "2", "--resume", str(tmp_path / "checkpoint"),
            "--out", str(tmp_path / "b.pt"))
    for part in ("a", "b"):
        assert json.loads((tmp_path / f"{part}.pt.json").read_text()) == []  # no warning from FSDP or the model

    torch.manual_seed(0)
    model = FAMILIES[family](max_iterations=6).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(3):
        tokens = torch.randint(3, 64, (4, 8), generator=torch.Generator().manual_seed(step))
        model(tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    resumed = torch.load(tmp_path / "b.pt", weights_only=True)
    expected = model.state_dict()
    assert resumed.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, atol=1e-5, rtol=1e-4, msg=name)
