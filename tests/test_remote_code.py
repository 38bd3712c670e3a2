"""Saved folders are self-contained Hub repos: remote code, auto_map, tokenizer, pipeline."""

import json
import os
import subprocess
import sys
import textwrap

import torch
from conftest import ROOT

import modeling_implicit as mi

SHARED_FILES = {"compat.py", "configuration_implicit.py", "modeling_implicit_utils.py", "numerics.py", "solver.py"}
REMOTE_FILES = {
    "mamba2": SHARED_FILES
    | {"configuration_implicit_mamba2.py", "modeling_implicit_mamba2.py", "mamba2_ops.py"},
    "llama": SHARED_FILES | {"configuration_implicit_llama.py", "modeling_implicit_llama.py"},
}


def test_save_writes_code_and_auto_map(tmp_path, make_model, family):
    model = make_model()
    model.save_pretrained(tmp_path)
    assert REMOTE_FILES[family] <= {p.name for p in tmp_path.iterdir()}
    config = json.loads((tmp_path / "config.json").read_text())
    name = type(model).__name__
    assert config["model_type"] == f"implicit_{family}"
    assert config["auto_map"]["AutoModelForCausalLM"] == f"modeling_implicit_{family}.{name}"
    assert config["auto_map"]["AutoConfig"] == f"configuration_implicit_{family}.{type(model.config).__name__}"
    assert config["auto_map"]["AutoModel"] == f"modeling_implicit_{family}.{type(model.base_model).__name__}"


def test_remote_code_loads_without_the_package(tmp_path, make_model):
    model = make_model()
    folder = tmp_path / "repo"
    model.save_pretrained(folder)
    tokens = torch.tensor([[5, 9, 13, 2, 40]])
    with torch.no_grad():
        expected = model(tokens).logits
        hidden = model.base_model(tokens).last_hidden_state
    torch.save({"tokens": tokens, "logits": expected, "hidden": hidden}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        torch.set_num_threads({torch.get_num_threads()})  # bitwise equality needs the same reduction order
        from transformers import AutoModel
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        backbone = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert "modeling_implicit" not in sys.modules, "the package was imported"
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert type(backbone).__name__ == {type(model.base_model).__name__!r}, type(backbone)
        data = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            logits = model(data["tokens"]).logits
            hidden = backbone(data["tokens"]).last_hidden_state
        assert torch.equal(logits, data["logits"]), (logits - data["logits"]).abs().max()
        assert torch.equal(hidden, data["hidden"]), (hidden - data["hidden"]).abs().max()
        print("REMOTE_OK", type(model).__name__)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env["PYTHONPATH"] = ""  # the subprocess must not see this repo
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"REMOTE_OK {type(model).__name__}" in result.stdout


def test_pipeline_text_generation(tmp_path, tiny_tokenizer, make_model):
    from transformers import AutoModelForCausalLM, pipeline

    model = make_model(
        vocab_size=len(tiny_tokenizer),
        pad_token_id=tiny_tokenizer.pad_token_id,
        bos_token_id=tiny_tokenizer.bos_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
    )
    model.generation_config.do_sample = False
    model.generation_config.max_new_tokens = 8
    model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    generator = pipeline("text-generation", model=loaded, tokenizer=tiny_tokenizer, device="cpu")
    outputs = generator(["mary went to the", "the implicit"], max_new_tokens=8, do_sample=False)
    assert len(outputs) == 2
    for prompt, out in zip(["mary went to the", "the implicit"], outputs):
        assert out[0]["generated_text"].startswith(prompt)
    # Batched pipeline output equals the single-prompt run (left padding is masked inside the recurrence).
    single = generator("the implicit", max_new_tokens=8, do_sample=False)
    assert single[0]["generated_text"] == outputs[1][0]["generated_text"]
    batched = generator(["mary went to the", "the implicit"], max_new_tokens=8, do_sample=False, batch_size=2)
    assert [b[0]["generated_text"] for b in batched] == [o[0]["generated_text"] for o in outputs]


def test_modeling_folder_imports_nothing_from_the_repo():
    for path in (ROOT / "modeling_implicit").glob("*.py"):
        text = path.read_text()
        for forbidden in (
            "from conversion", "from eval", "import conversion", "import eval", "from ..", "from . import"
        ):
            assert forbidden not in text, f"{path.name}: {forbidden}"
    assert mi.ImplicitMamba2ForCausalLM.__module__ == "modeling_implicit.modeling_implicit_mamba2"
    assert mi.ImplicitLlamaForCausalLM.__module__ == "modeling_implicit.modeling_implicit_llama"
