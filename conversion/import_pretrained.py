"""Import explicit pretrained weights into our models: as the explicit model, or as the start of an implicit one.

    implicit-lm import-pretrained --src SRC --dst DST [--implicit] [--dtype float32|bfloat16|float16]
        [--tokenizer DIR_OR_ID] [--max-shard-size 2GB] [--overwrite]

SRC is a local folder holding a transformers `Mamba2ForCausalLM` or `LlamaForCausalLM` checkpoint, or an original
`state-spaces/mamba2-*` checkpoint (`config.json` with `d_model`/`ssm_cfg`, `pytorch_model.bin`).

With `--implicit` ("implicitising" a model before fine-tuning) the blocks keep their weights and the new input
injection is initialised from the first block's input path: its RMSNorm weight is the first block's pre-norm weight
and its Linear is the first block's input projection (Mamba2 `in_proj`; Llama the stacked q/k/v projections), bias 0.
At the first iterate (`z = 0`) the first block therefore sees exactly the projection of the embeddings the explicit
model computes there; the other blocks receive the same injection, which fine-tuning adapts.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch
from implicit_lm.model_cards import render_model_card, validate_model_card

from modeling_implicit import ImplicitLlamaConfig, ImplicitMamba2Config, ImplicitPreTrainedConfig

from .checkpoint_io import CheckpointReader
from .export import (
    prepare_command,
    check_dtype,
    empty_model,
    expected_shapes,
    export_model,
    fill_model,
    load_tokenizer,
    run_command,
)
from .reference import ConversionError

logger = logging.getLogger("implicit_lm.conversion")

_MAMBA2_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "state_size", "head_dim", "expand", "n_groups",
                  "conv_kernel", "chunk_size", "use_bias", "use_conv_bias", "layer_norm_epsilon", "residual_in_fp32",
                  "time_step_min", "time_step_max", "time_step_floor", "time_step_limit", "tie_word_embeddings",
                  "bos_token_id", "eos_token_id", "pad_token_id")
_LLAMA_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rope_parameters",
                 "attention_bias", "mlp_bias", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
                 "rms_norm_eps")


def _source_config(source: dict[str, Any], implicit: bool) -> tuple[ImplicitPreTrainedConfig, str]:
    """Our config for a source `config.json`, and the layout name (`transformers-mamba2`, `transformers-llama`,
    `state-spaces-mamba2`)."""
    model_type = source.get("model_type")
    if model_type == "mamba2":
        fields = {name: source[name] for name in _MAMBA2_FIELDS if name in source}
        heads = source.get("num_heads")
        if heads is not None and heads * source.get("head_dim", 64) != source.get("expand", 2) * source["hidden_size"]:
            raise ConversionError(f"num_heads={heads} x head_dim != expand x hidden_size: unsupported Mamba2 shape")
        if source.get("norm_before_gate") or source.get("hidden_act", "silu") != "silu":
            raise ConversionError("Only Mamba2 with norm_before_gate=False and hidden_act='silu' is supported")
        return ImplicitMamba2Config(**fields, implicit=implicit), "transformers-mamba2"
    if model_type == "llama":
        fields = {name: source[name] for name in _LLAMA_FIELDS if name in source}
        if source.get("pretraining_tp", 1) != 1:
            raise ConversionError(f"pretraining_tp={source['pretraining_tp']} is not supported")
        if "rope_parameters" not in fields and "rope_theta" in source:
            fields["rope_parameters"] = {"rope_type": "default", "rope_theta": float(source["rope_theta"])}
        # transformers' Llama adds residuals in the model dtype.
        return ImplicitLlamaConfig(**fields, residual_in_fp32=False, implicit=implicit), "transformers-llama"
    if "d_model" in source and "ssm_cfg" in source:
        ssm = source.get("ssm_cfg") or {}
        if ssm.get("layer", "Mamba2") != "Mamba2" or source.get("d_intermediate", 0) or source.get("attn_layer_idx"):
            raise ConversionError("Only pure Mamba2 state-spaces checkpoints (no MLP, no attention layers) are supported")
        vocab, multiple = source["vocab_size"], source.get("pad_vocab_size_multiple", 1)
        vocab += (-vocab) % multiple
        config = ImplicitMamba2Config(
            vocab_size=vocab, hidden_size=source["d_model"], num_hidden_layers=source["n_layer"],
            state_size=ssm.get("d_state", 128), head_dim=ssm.get("headdim", 64), expand=ssm.get("expand", 2),
            n_groups=ssm.get("ngroups", 1), conv_kernel=ssm.get("d_conv", 4), chunk_size=ssm.get("chunk_size", 256),
            residual_in_fp32=source.get("residual_in_fp32", True),
            tie_word_embeddings=source.get("tie_embeddings", True), implicit=implicit,
        )
        return config, "state-spaces-mamba2"
    raise ConversionError(
        f"Unrecognised config.json (model_type={model_type!r}): expected a transformers mamba2/llama config or a "
        "state-spaces Mamba2 config (d_model, n_layer, ssm_cfg)."
    )


def _read_config(path: Path) -> dict[str, Any]:
    """A config.json as written by transformers 5, which encodes non-finite floats as `{"__float__": "Infinity"}`."""

    def decode(value: dict[str, Any]) -> Any:
        return float(value["__float__"]) if set(value) == {"__float__"} else value

    try:
        return json.loads(path.read_text(), object_hook=decode)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ConversionError(f"{path} is not valid JSON: {error}") from error


def _source_name(layout: str, target: str) -> str:
    if layout == "state-spaces-mamba2" and target.startswith("backbone.embeddings."):
        return target.replace("backbone.embeddings.", "backbone.embedding.", 1)
    return target


def _injection_source(config: ImplicitPreTrainedConfig, target: str) -> list[str] | None:
    """The first block's input-path tensors the injection `target` is initialised from (concatenated), or None."""
    if isinstance(config, ImplicitLlamaConfig):
        first = "model.layers.0"
        sources = {
            "model.injection.norm.weight": [f"{first}.input_layernorm.weight"],
            "model.injection.weight": [f"{first}.self_attn.{p}_proj.weight" for p in "qkv"],
        }
    else:
        first = "backbone.layers.0"
        sources = {
            "backbone.injection.norm.weight": [f"{first}.norm.weight"],
            "backbone.injection.weight": [f"{first}.mixer.in_proj.weight"],
        }
    return sources.get(target)


def import_pretrained(args: argparse.Namespace) -> float:
    prepare_command(args)
    dtype = check_dtype(args.dtype)
    source = Path(args.src)
    config_file = source / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{config_file} not found")
    config, layout = _source_config(_read_config(config_file), implicit=args.implicit)
    tokenizer = load_tokenizer(args.tokenizer)  # before the heavy work, so a bad name fails fast
    reader = CheckpointReader(source)
    model = empty_model(config, dtype)
    expected = expected_shapes(model)
    shapes = reader.shapes
    problems, plan = [], {}
    for target, shape in expected.items():
        injection = _injection_source(config, target) if config.implicit else None
        if target.endswith("injection.bias"):
            plan[target] = lambda shape=shape: torch.zeros(shape)
            continue
        names = injection or [_source_name(layout, target)]
        absent = [n for n in names if n not in shapes]
        if absent:
            problems.append(f"missing {absent} for {target} {shape}")
            continue
        plan[target] = lambda names=names: torch.cat([reader.read(n) for n in names], dim=0)
        got = (sum(shapes[n][0] for n in names), *shapes[names[0]][1:])
        if got != shape:
            problems.append(f"shape mismatch for {target}: source {got}, expected {shape}")
    used = {_source_name(layout, t) for t in expected}
    if config.tie_word_embeddings:
        used.add("lm_head.weight")  # a stored copy of the tied head
    unknown = sorted(set(shapes) - used)
    if unknown:
        problems.append("unknown source keys: " + ", ".join(f"{k} {shapes[k]}" for k in unknown))
    if problems:
        raise ConversionError("The checkpoint does not match the model:\n  " + "\n  ".join(problems))
    fill_model(model, sorted(plan), lambda name: plan[name]())
    model.eval()

    card = render_model_card(config, repo_id=args.repo_id or Path(args.dst).name, base_model=args.base_model)
    validate_model_card(card)
    difference = export_model(
        model, args.dst, dtype=args.dtype, card=card, tokenizer=tokenizer,
        max_shard_size=args.max_shard_size, overwrite=args.overwrite, tolerance=args.tolerance,
    )
    logger.info("Imported %s (%s) into %s as %s; reloaded logits differ by at most %.3g",
                source, layout, args.dst, "implicit" if config.implicit else "explicit", difference)
    return difference


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="implicit-lm import-pretrained", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--src", required=True, help="local folder with the pretrained checkpoint")
    parser.add_argument("--dst", required=True, help="output Hub repo folder")
    parser.add_argument("--implicit", action="store_true", help="start an implicit model from these weights")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--tokenizer", help="tokenizer folder or Hub id to include")
    parser.add_argument("--base-model", help="Hub id of the source model, for the card's base_model")
    parser.add_argument("--repo-id", help="Hub id named in the model card (default: the DST folder name)")
    parser.add_argument("--max-shard-size", default="2GB")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max |logit difference| after reload")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing DST, if it is a model folder written by implicit-lm (nothing else)")
    args = parser.parse_args(argv)
    run_command(import_pretrained, args)


if __name__ == "__main__":
    main()
