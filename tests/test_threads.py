"""Intra-op threads for narrow models: one thread below `SMALL_MODEL_WIDTH` (a barrier per op costs more than a second
thread saves, and on a loaded machine each barrier waits for a descheduled thread), set for a block and restored."""

from __future__ import annotations

import pytest
import torch

from implicit_lm.models import SMALL_MODEL_WIDTH, intra_op_threads, threads_for_width


def test_narrow_models_get_one_thread_and_the_setting_comes_back():
    torch.set_num_threads(2)
    try:
        assert threads_for_width(128) == 1 and threads_for_width(SMALL_MODEL_WIDTH - 1) == 1
        assert threads_for_width(SMALL_MODEL_WIDTH) == threads_for_width(2048) == 2
        with pytest.raises(RuntimeError, match="inside"), intra_op_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)  # the suite's setting (conftest)


def test_the_demo_evaluates_its_bundled_models_on_one_thread(monkeypatch, tmp_path):
    import implicit_lm.demo.__main__ as demo

    seen = []
    monkeypatch.setattr(demo, "state_tracking", lambda args: seen.append(torch.get_num_threads()) or {})
    monkeypatch.setattr(demo, "stories", lambda args: seen.append(torch.get_num_threads()) or {})
    monkeypatch.setattr(demo, "english", lambda args: seen.append(torch.get_num_threads()) or {})
    torch.set_num_threads(2)
    try:
        demo.main(["--output-dir", str(tmp_path)])
        assert seen == [1, 1, 2] and torch.get_num_threads() == 2  # the wider English LMs on torch's threads
    finally:
        torch.set_num_threads(1)
