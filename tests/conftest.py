"""Shared fixtures: tiny configs and a tokenizer built locally (nothing is downloaded)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton kernels run in its interpreter on the CPU (read when the kernels are defined, so before any import of them).
os.environ.setdefault("TRITON_INTERPRET", "1")
# transformers copies remote code into a module cache (read when it is imported): one of the run's own, so that the
# tests neither use nor change the user's, and parallel workers (pytest -n) never write the same files.
if "HF_MODULES_CACHE" not in os.environ:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix=f"implicit-lm-tests-{worker}-")
    atexit.register(shutil.rmtree, os.environ["HF_MODULES_CACHE"], ignore_errors=True)

import modeling_implicit as mi  # noqa: E402  (after the offline and interpreter setup)


def tiny_mamba2_config(**overrides) -> mi.ImplicitMamba2Config:
    """A 2-layer model small enough for CPU tests; tight tolerance so both modes reach the same fixed point."""
    settings = dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        state_size=8,
        head_dim=8,
        n_groups=2,
        chunk_size=4,
        max_iterations=60,
        eval_max_iterations=200,
        tolerance=1e-6,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    settings.update(overrides)
    return mi.ImplicitMamba2Config(**settings)


def tiny_mamba2(seed: int = 0, **overrides) -> mi.ImplicitMamba2ForCausalLM:
    torch.manual_seed(seed)
    return mi.ImplicitMamba2ForCausalLM(tiny_mamba2_config(**overrides)).eval()


def tiny_llama_config(**overrides) -> mi.ImplicitLlamaConfig:
    """A 2-layer grouped-query model. Anderson by default: with small random residual branches the final norm leaves
    the plain iteration barely contractive, and tests want tight tolerances."""
    settings = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        solver="anderson",
        max_iterations=60,
        eval_max_iterations=400,
        tolerance=1e-6,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    settings.update(overrides)
    return mi.ImplicitLlamaConfig(**settings)


def tiny_llama(seed: int = 0, attn_implementation: str = "sdpa", **overrides) -> mi.ImplicitLlamaForCausalLM:
    torch.manual_seed(seed)
    config = tiny_llama_config(**overrides)
    return mi.ImplicitLlamaForCausalLM._from_config(config, attn_implementation=attn_implementation).eval()


@pytest.fixture(scope="session", autouse=True)
def single_thread():
    """The tests' models are tiny: each op takes microseconds, and a second intra-op thread costs more in
    synchronisation than it saves (on a loaded 2-core machine, milliseconds per op)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_module(module: str, *argv: str) -> int:
    """Run `python -m module *argv` in this interpreter (runpy runs the module's `__main__` block as `-m` does; a
    fresh interpreter would cost seconds of imports) and return its exit status. Read its output with capsys."""
    import runpy
    import sys
    import warnings

    saved = sys.argv
    sys.argv = [module, *argv]
    try:
        with warnings.catch_warnings():  # runpy warns that the module is already imported: the tests imported it
            warnings.filterwarnings("ignore", message=".*found in sys.modules", category=RuntimeWarning)
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exit_info:
        return 0 if exit_info.code is None else exit_info.code
    finally:
        sys.argv = saved
    return 0


# Every model family runs the shared suite (tests/test_modeling_common.py).
FAMILIES = {"mamba2": tiny_mamba2, "llama": tiny_llama}


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture
def make_model(family):
    """Builds a tiny model of the family under test: `make_model(seed=0, **config_overrides)`."""
    return FAMILIES[family]


@pytest.fixture
def tiny_tokenizer():
    """A byte-level BPE tokenizer trained on a few sentences, wrapped as a transformers fast tokenizer."""
    return build_tokenizer()


def build_tokenizer():
    """The `tiny_tokenizer` fixture's tokenizer, for session-scoped fixtures."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = [
        "the implicit model iterates its layers to a fixed point",
        "mary went to the kitchen and john went to the garden",
        "a state space model is a recurrent network with linear transitions",
    ] * 20
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory) -> dict[str, Path]:
    """Hub-layout folders (config with auto_map, safetensors, remote code, tokenizer) of a tiny random implicit model
    of each family, with the tokenizer's vocabulary; built once per test session. Treat them as read-only."""
    tokenizer = build_tokenizer()
    folders = {}
    for name, build in FAMILIES.items():
        model = build(seed=0, vocab_size=len(tokenizer), eval_max_iterations=100, tolerance=1e-5)
        folder = tmp_path_factory.mktemp(f"saved-{name}")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[name] = folder
    return folders


@pytest.fixture
def saved_model(saved_models, family) -> Path:
    """The saved tiny model of the family under test (see `saved_models`)."""
    return saved_models[family]


@pytest.fixture(scope="session")
def explicit_baseline(tmp_path_factory) -> Path:
    """A Hub-layout folder of a tiny transformers `LlamaForCausalLM` (not ours) with the test tokenizer: the
    baseline that evaluation commands must handle without solver options or statistics."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("explicit-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def verify_in_process(request, monkeypatch):
    """Conversions verify their written folder by reloading it in this interpreter (with the package's registered
    classes) instead of a fresh one with only its remote code: an interpreter start costs several seconds per
    conversion. The weights, config and logits are checked the same way; tests marked `fresh_interpreter` (and
    tests/test_remote_code.py) keep the isolated remote-code reload."""
    if request.node.get_closest_marker("fresh_interpreter"):
        return
    from implicit_lm.conversion import export
    from transformers import AutoModelForCausalLM

    def reload_here(folder: Path, dtype: str, workdir: Path) -> torch.Tensor:
        return export.verification_logits(AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)))

    monkeypatch.setattr(export, "_reload_logits", reload_here)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave out `slow` tests unless the `-m` expression names them, so that `-m "not e2e"` (the fast lane) does not
    bring them back the way a second `-m` replaces an `addopts` one."""
    if "slow" in (config.getoption("markexpr") or ""):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
