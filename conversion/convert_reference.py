"""Convert a reference checkpoint (any of the three public codebases' layouts) into a verified Hub repo folder.

    implicit-lm convert --src SRC --dst DST [--dtype float32|bfloat16|float16]
        [--layout auto|torchdeq|noise-fork|standalone] [--drop-noise]
        [--tokenizer DIR_OR_ID] [--max-shard-size 2GB] [--overwrite]
    implicit-lm convert --preset mamba2-1.3b-implicit --random-init --dst DST

SRC holds the reference's nested `config.json` and its weights (`model.safetensors`, `pytorch_model.bin`, or sharded
with an index). The layout (see `conversion.reference`) is detected from the keys and the config unless `--layout`
names it. Every source key is mapped (weight normalisation folded into plain weights); unknown or
missing keys and shape mismatches stop the conversion with the full list. DST is written next to its final place and
renamed in only after the reloaded folder reproduced the source logits.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch
from implicit_lm.model_cards import render_model_card, validate_model_card
from transformers import GenerationConfig

from modeling_implicit import ImplicitPreTrainedConfig

from .checkpoint_io import CheckpointReader, read_json
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
from .presets import PRESETS, preset_reference_config
from .reference import (
    LAYOUTS,
    ConversionError,
    config_from_reference,
    detect_layout,
    embedding_key,
    model_class,
    plan_conversion,
)

logger = logging.getLogger("implicit_lm.conversion")


def detect_preset(config: ImplicitPreTrainedConfig) -> str | None:
    """The preset whose converted config equals `config` (ignoring token ids), if any."""
    def comparable(c: ImplicitPreTrainedConfig) -> dict[str, Any]:
        ignored = ("transformers_version", "converted_from")  # provenance: a preset is the same model in any layout
        return {k: v for k, v in c.to_dict().items() if not k.endswith("token_id") and k not in ignored}

    target = comparable(config)
    for name, reference in PRESETS.items():
        if comparable(config_from_reference(reference)) == target:
            return name
    return None


def _generation_config(source: Path | None, config: ImplicitPreTrainedConfig) -> GenerationConfig:
    if source is not None and (source / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(source)
    else:
        generation = GenerationConfig()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(generation, name) is None and getattr(config, name) is not None:
            setattr(generation, name, getattr(config, name))
        if getattr(config, name) is None and getattr(generation, name) is not None:
            setattr(config, name, getattr(generation, name))
    return generation


@torch.no_grad()
def _check_tied_head(reader: CheckpointReader, reference: dict[str, Any], layout: str) -> None:
    head, embedding = "criterion.decoder.weight", embedding_key(layout)
    shapes = reader.shapes
    if reference.get("tie_embeddings", True) and head in shapes and embedding in shapes:
        if shapes[head] != shapes[embedding] or not torch.equal(reader.read(head), reader.read(embedding)):
            raise ConversionError(
                f"tie_embeddings=True but {head} {shapes[head]} differs from {embedding} {shapes[embedding]}."
            )


def convert(args: argparse.Namespace) -> float:
    prepare_command(args)
    dtype = check_dtype(args.dtype)
    source = Path(args.src) if args.src else None
    if args.preset:
        reference = preset_reference_config(args.preset)
    else:
        config_file = source / "config.json"
        if not config_file.is_file():
            raise ConversionError(f"{config_file} not found (or pass --preset to name the configuration).")
        reference = read_json(config_file)
    reader = None if args.random_init else CheckpointReader(source)
    layout = args.layout if args.layout != "auto" else detect_layout(reference, reader.shapes if reader else ())
    config = config_from_reference(reference, layout, drop_noise=args.drop_noise)
    preset = args.preset or detect_preset(config)
    tokenizer = load_tokenizer(args.tokenizer)
    generation = _generation_config(source, config)

    if reader is None:
        torch.manual_seed(args.seed)
        model = model_class(config)._from_config(config, dtype=dtype)
    else:
        model = empty_model(config, dtype)
        plan = plan_conversion(reference, reader.shapes, expected_shapes(model), layout)
        _check_tied_head(reader, reference, layout)
        fill_model(model, sorted(plan.sources), lambda name: plan.materialize(name, reader.read))
    model.eval()

    card = render_model_card(
        config,
        repo_id=args.repo_id or Path(args.dst).name,
        preset=preset,
        tokenizer=reference.get("tokenizer"),
        source_layout=layout,
    )
    validate_model_card(card)
    parameters = sum(p.numel() for p in model.parameters())
    difference = export_model(
        model,
        args.dst,
        dtype=args.dtype,
        card=card,
        tokenizer=tokenizer,
        generation_config=generation,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        tolerance=args.tolerance,
    )
    logger.info(
        "Wrote %s: %s, %.1fM parameters, %s, preset %s; reloaded logits differ by at most %.3g",
        args.dst, type(model).__name__, parameters / 1e6, args.dtype, preset, difference,
    )
    return difference


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="implicit-lm convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--src", help="reference checkpoint folder")
    parser.add_argument("--dst", required=True, help="output Hub repo folder")
    parser.add_argument("--preset", help=f"reference configuration by name: {', '.join(sorted(PRESETS))}")
    parser.add_argument("--layout", default="auto", choices=["auto", *LAYOUTS],
                        help="the codebase that wrote SRC (default: detected from its weight keys and config): "
                        + "; ".join(f"{name} = {codebase}" for name, codebase in LAYOUTS.items()))
    parser.add_argument("--drop-noise", action="store_true",
                        help="convert a noise-fork checkpoint without its noise study (default: keep its settings)")
    parser.add_argument("--random-init", action="store_true", help="random weights for --preset (no --src)")
    parser.add_argument("--seed", type=int, default=0, help="seed for --random-init")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--tokenizer", help="tokenizer folder or Hub id to include")
    parser.add_argument("--max-shard-size", default="2GB")
    parser.add_argument("--repo-id", help="Hub id named in the model card (default: the DST folder name)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max |logit difference| after reload")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing DST, if it is a model folder written by implicit-lm (nothing else)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.random_init and (args.src or not args.preset):
        parser.error("--random-init needs --preset and no --src")
    if not args.random_init and not args.src:
        parser.error("pass --src (or --preset NAME --random-init)")
    run_command(convert, args)


if __name__ == "__main__":
    main()
