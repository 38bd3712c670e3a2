"""`implicit-lm demo-random` runs end to end for both families."""

import json

from implicit_lm.demo.random_model import main


def test_main_job_runs_end_to_end(tmp_path, family, capsys):
    main(["--family", family, "--output-dir", str(tmp_path), "--max-new-tokens", "4", "--hidden-size", "32"])
    out = capsys.readouterr().out
    assert "Reloaded with AutoModelForCausalLM(trust_remote_code=True)" in out
    assert "Duality on the prompt" in out and "Solver iterations per decoded token" in out
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == f"implicit_{family}"
    assert (tmp_path / "tokenizer.json").exists() and (tmp_path / "model.safetensors").exists()
