"""The reference checkpoint layouts (three public codebases) and their mapping onto our models.

A reference folder holds a nested `config.json` (`backbone_type`, `backbone_config` with `block_cfg`, `deq_params`
with `solver`/`training`/..., ...) and a state dict whose implicit models are weight-normalised. The layouts differ:

- `torchdeq` (GitHub microsoft/implicit_languagemodels): torchdeq weight norm on every Linear/Conv1d weight inside
  the backbone (the injection included), stored as `weight_g` (norm over all dimensions but the first) and
  `weight_v`; the embedding is `word_emb.emb.weight`; `deq_params.training.tau` damps the inference iterations and
  the phantom steps; the inference cap is `f_max_iter * eval_factor` (default 4).
- `noise-fork` (markschoene/implicit_languagemodels): the torchdeq layout plus the noise study's
  `block_cfg.{state_noise_db, latent_noise_db, noise_mode}`.
- `standalone` (markschoene/implicit-languagemodels-standalone): torch's own weight-norm parametrization on every
  `nn.Linear` of the backbone (`<m>.parametrizations.weight.original0` = g `(out, 1)`, `.original1` = v); `conv1d`
  is not normalised; the embedding is `word_emb.weight` and the tied head may be absent; `training.beta` (falling back
  to `tau`, then 0.8) damps the solver and `tau` only the phantom steps; the inference cap is `eval_f_max_iter`, or
  `f_max_iter * eval_factor` with `eval_factor` defaulting to 1.

The effective weight is `v * g / ||v||` (torchdeq's `norm_no_scale`: `target_norm / ||v||`; `norm_clip`: the factor
clipped at `clip_value`). Conversion folds that into plain weights.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from modeling_implicit import (
    ImplicitLlamaConfig,
    ImplicitLlamaForCausalLM,
    ImplicitMamba2Config,
    ImplicitMamba2ForCausalLM,
    ImplicitPreTrainedConfig,
)

# Mamba2 block_cfg keys we map, and keys whose only supported value is the reference default.
_MAMBA2_BLOCK_FIELDS = {
    "d_state": "state_size",
    "d_conv": "conv_kernel",
    "expand": "expand",
    "headdim": "head_dim",
    "ngroups": "n_groups",
    "A_init_range": "A_init_range",
    "dt_min": "time_step_min",
    "dt_max": "time_step_max",
    "dt_init_floor": "time_step_floor",
    "dt_limit": "time_step_limit",
    "bias": "use_bias",
    "conv_bias": "use_conv_bias",
    "chunk_size": "chunk_size",
}
_MAMBA2_FIXED = {
    "d_ssm": None, "allow_negative_A_EV": False, "D_has_hdim": False, "rmsnorm": True, "norm_before_gate": False,
}
_LLAMA_FIXED = {"apply_rotary": True, "rope_scaling": None}
# Keys that only steer the reference's training loop or runtime, never the function the weights compute.
_IGNORED_BLOCK_KEYS = {"conv_init", "dropout", "use_mem_eff_path", "use_materializing_scan", "layer_idx",
                       "process_group", "sequence_parallel"}
_IGNORED_BACKBONE_KEYS = {"dropout", "init_gain", "initializer_cfg", "pretrain_steps", "pretrain_iter", "ema_alpha",
                          "init_z_mode", "do_weight_norm"}


class ConversionError(ValueError):
    """The source cannot be converted faithfully; the message lists every offending field, key or shape."""


LAYOUTS = {
    "torchdeq": "microsoft/implicit_languagemodels",
    "noise-fork": "markschoene/implicit_languagemodels",
    "standalone": "markschoene/implicit-languagemodels-standalone",
}
# The `inference_loop` that reproduces each codebase's own (opt-in: the default stays per sample).
REFERENCE_INFERENCE_LOOPS = {"torchdeq": "torchdeq_reference", "noise-fork": "torchdeq_reference",
                        "standalone": "standalone_reference"}
NOISE_FIELDS = ("state_noise_db", "latent_noise_db", "noise_mode")
# How each layout stores a weight-normalised weight `<m>.weight`: key suffix -> part (g: magnitude, v: direction).
_WEIGHT_NORM_SUFFIXES = {
    "torchdeq": {".weight_g": "g", ".weight_v": "v"},
    "standalone": {".parametrizations.weight.original0": "g", ".parametrizations.weight.original1": "v"},
}
_EMBEDDING_KEYS = {"torchdeq": "word_emb.emb.weight", "standalone": "word_emb.weight"}


def _key_style(layout: str) -> str:
    return "standalone" if layout == "standalone" else "torchdeq"


def embedding_key(layout: str) -> str:
    return _EMBEDDING_KEYS[_key_style(layout)]


def detect_layout(reference: dict[str, Any], source_keys: Iterable[str] = ()) -> str:
    """The codebase that wrote a checkpoint, from its weight keys and its config (keys alone when there are none:
    `--random-init`). Raises `ConversionError` when the keys and the config point at different codebases."""
    _require_reference_layout(reference)
    keys = list(source_keys)
    standalone_keys = [k for k in keys if k == _EMBEDDING_KEYS["standalone"] or ".parametrizations.weight." in k]
    torchdeq_keys = [k for k in keys if k == _EMBEDDING_KEYS["torchdeq"] or k.endswith((".weight_g", ".weight_v"))]
    block = (reference.get("backbone_config") or {}).get("block_cfg") or {}
    noise = sorted(field for field in NOISE_FIELDS if field in block)
    beta = "beta" in ((reference.get("deq_params") or {}).get("training") or {})
    if standalone_keys and torchdeq_keys:
        raise ConversionError(
            f"the weights mix two layouts: {standalone_keys[0]} (standalone) and {torchdeq_keys[0]} (torchdeq)"
        )
    if standalone_keys or (not torchdeq_keys and beta and not noise):
        if noise:
            raise ConversionError(
                f"standalone-layout weights but block_cfg.{noise[0]}: the noise fields belong to the noise fork, "
                "whose weights use the torchdeq layout; pass --layout to say which codebase wrote this checkpoint"
            )
        return "standalone"
    if beta:
        raise ConversionError(
            "deq_params.training.beta (the standalone codebase's solver damping) with torchdeq-layout weights: "
            "pass --layout to say which codebase wrote this checkpoint"
        )
    return "noise-fork" if noise else "torchdeq"


def _require_reference_layout(reference: dict[str, Any]) -> None:
    missing = [key for key in ("backbone_type", "backbone_config") if key not in reference]
    if missing:
        raise ConversionError(
            f"config.json is not in the reference layout (missing {missing}); expected the nested config of "
            "microsoft/implicit_languagemodels (backbone_type, backbone_config, deq_params, ...)."
        )


def family_of(reference: dict[str, Any]) -> str:
    """`"mamba2"` or `"llama"` from a reference config."""
    _require_reference_layout(reference)
    block_type = reference["backbone_config"].get("block_type")
    families = {"mamba2": "mamba2", "transformer": "llama"}
    if block_type not in families:
        raise ConversionError(f"backbone_config.block_type={block_type!r}: expected 'mamba2' or 'transformer'.")
    return families[block_type]


def uses_weight_norm(reference: dict[str, Any]) -> bool:
    """Whether the checkpoint stores torchdeq weight-normalised weights (implicit backbones with weight_norm)."""
    if "explicit" in str(reference["backbone_type"]):
        return False
    norm = (reference.get("deq_params") or {}).get("norm", {})
    norm_type = norm.get("norm_type", "weight_norm")
    if norm_type not in ("weight_norm", "none", None):
        raise ConversionError(f"deq_params.norm.norm_type={norm_type!r} is not supported (weight_norm or none).")
    return norm_type == "weight_norm" and reference["backbone_config"].get("do_weight_norm", True)


def _solver_fields(reference: dict[str, Any], layout: str, problems: list[str]) -> dict[str, Any]:
    """Our solver fields for the reference's `deq_params`; unsupported settings are appended to `problems`."""
    deq = reference.get("deq_params") or {}
    solver, training = deq.get("solver", {}), deq.get("training", {})
    if layout == "standalone":
        return _standalone_solver_fields(deq, problems)
    forward_solver = solver.get("f_solver", "fixed_point_iter")
    solvers = {"fixed_point_iter": "picard", "anderson": "anderson"}
    if forward_solver not in solvers:
        problems.append(f"deq_params.solver.f_solver={forward_solver!r} (supported: {sorted(solvers)})")
    if training.get("ift") or training.get("hook_ift"):
        problems.append("deq_params.training.ift/hook_ift=True (only phantom gradients are supported)")
    if (deq.get("regularization") or {}).get("jac_loss_weight", 0.0) > 0:
        problems.append("deq_params.regularization.jac_loss_weight > 0 (Jacobian regularisation is not supported)")
    max_iterations = int(solver.get("f_max_iter", 24))
    eval_cap = int(solver.get("eval_f_max_iter", 0)) or int(max_iterations * float(solver.get("eval_factor", 4.0)))
    return {
        "max_iterations": max_iterations,
        "eval_max_iterations": max(eval_cap, 1),
        "tolerance": float(solver.get("f_tol", 0.05)),
        "stop_mode": solver.get("f_stop_mode", "rel"),
        "solver": solvers.get(forward_solver, "picard"),
        # The reference damps its inference iterations and its phantom steps with the same `tau`.
        "damping": float(training.get("tau", 0.8)),
        "phantom_steps": int(training.get("grad", 4)),
        "phantom_damping": float(training.get("tau", 0.8)),
        "backward": "phantom",
    }


def _standalone_solver_fields(deq: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    solver, training = deq.get("solver") or {}, deq.get("training") or {}
    for section, values, field in (("solver", solver, "f_max_iter"), ("solver", solver, "f_tol"),
                                   ("training", training, "grad")):
        if field not in values:
            problems.append(f"deq_params.{section}.{field} is missing (the standalone code requires it)")
    if (deq.get("regularization") or {}).get("jac_loss_weight", 0.0) > 0:
        problems.append("deq_params.regularization.jac_loss_weight > 0 (Jacobian regularisation is not supported)")
    max_iterations = int(solver.get("f_max_iter", 1))
    eval_cap = int(solver.get("eval_f_max_iter", 0))
    if eval_cap <= 0:
        eval_cap = int(max_iterations * float(solver.get("eval_factor", 1.0)))
    tau = float(training.get("tau", 0.8))
    return {
        "max_iterations": max_iterations,
        "eval_max_iterations": max(eval_cap, 1),
        "tolerance": float(solver.get("f_tol", 0.05)),
        "stop_mode": "rel",
        "solver": "picard",
        # `beta` damps every solve (training and inference); `tau` only the phantom steps.
        "damping": float(training.get("beta", tau)),
        "phantom_steps": int(training.get("grad", 1)),
        "phantom_damping": tau,
        "backward": "phantom",
    }


# The fork's defaults for a noise field its config leaves out (`Mamba2.__init__`): 20 dB multiplicative.
_FORK_NOISE_DEFAULTS = {"state_noise_db": 20.0, "latent_noise_db": 20.0, "noise_mode": "multiplicative"}


def _noise_fields(noise: dict[str, Any], drop_noise: bool, problems: list[str]) -> dict[str, Any]:
    """Our Mamba2 noise fields for the fork's `block_cfg` noise settings (the fork's defaults filling the ones left
    out); all zero with `drop_noise`. 0 dB or less is the fork's "off", as ours."""
    settings = {**_FORK_NOISE_DEFAULTS, **noise}
    if settings["noise_mode"] not in ("additive", "multiplicative"):
        problems.append(f"block_cfg.noise_mode={settings['noise_mode']!r} (the fork knows 'additive' and "
                        "'multiplicative')")
        return {}
    if drop_noise:
        return {"state_noise_db": 0.0, "latent_noise_db": 0.0}
    return {name: (float(value) if name != "noise_mode" else value) for name, value in settings.items()}


def _check_keys(section: str, given: dict[str, Any], known: Iterable[str], fixed: dict[str, Any]) -> list[str]:
    problems = []
    for key, value in given.items():
        if key in fixed and value != fixed[key]:
            problems.append(f"{section}.{key}={value!r} (only {fixed[key]!r} is supported)")
        elif key not in known and key not in fixed and key not in _IGNORED_BLOCK_KEYS | _IGNORED_BACKBONE_KEYS:
            problems.append(f"{section}.{key} (unknown field)")
    return problems


def config_from_reference(
    reference: dict[str, Any], layout: str | None = None, drop_noise: bool = False
) -> ImplicitPreTrainedConfig:
    """Our config for a reference `config.json` dict written by the codebase `layout` (see `LAYOUTS`; None: detected
    from the config alone). Raises `ConversionError` listing every unsupported field. The config records the layout
    and the reference's solver settings in `converted_from`."""
    family = family_of(reference)
    layout = layout or detect_layout(reference)
    if layout not in LAYOUTS:
        raise ConversionError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    backbone = reference["backbone_config"]
    block = dict(backbone.get("block_cfg") or {})
    noise = {field: block.pop(field) for field in NOISE_FIELDS if field in block}
    problems = _check_keys(
        "backbone_config",
        {k: v for k, v in backbone.items() if k != "block_cfg"},
        {"block_type", "d_model", "n_layer", "d_inner", "pre_norm", "rms_norm", "norm_epsilon", "residual_in_fp32",
         "mlp_type"},
        {"pre_norm": True, "rms_norm": True},
    )
    d_model = backbone["d_model"]
    if reference.get("d_embed") not in (None, d_model):
        problems.append(f"d_embed={reference['d_embed']} differs from d_model={d_model} (embedding projection)")
    if reference.get("head_bias"):
        problems.append("head_bias=True (LM head with bias)")
    vocab = int(reference.get("n_tokens", reference.get("vocab_size")))
    multiple = int(reference.get("pad_vocab_size_multiple", 1))
    if reference.get("pad_vocab") and vocab % multiple:
        vocab += multiple - vocab % multiple  # the reference pads its embedding rows
    common = {
        "vocab_size": vocab,
        "hidden_size": d_model,
        "num_hidden_layers": backbone["n_layer"],
        "layer_norm_epsilon": backbone.get("norm_epsilon", 1e-5),
        "residual_in_fp32": backbone.get("residual_in_fp32", True),
        "tie_word_embeddings": bool(reference.get("tie_embeddings", True)),
        "implicit": "explicit" not in str(reference["backbone_type"]),
    }
    if common["implicit"]:
        common.update(_solver_fields(reference, layout, problems))
    noise_fields = {}
    if noise and layout != "noise-fork":
        problems.append(f"block_cfg.{next(iter(noise))}: the noise study's fields only exist in the noise fork's "
                        f"configs, not in {layout}'s")
    elif noise and family != "mamba2":
        problems.append(f"block_cfg.{next(iter(noise))}: the noise study exists for Mamba2 blocks only")
    elif noise:
        noise_fields = _noise_fields(noise, drop_noise, problems)
    common["converted_from"] = {
        "layout": layout,
        "codebase": LAYOUTS[layout],
        "reference_inference_loop": REFERENCE_INFERENCE_LOOPS[layout],
        "deq_params": reference.get("deq_params") or {},
        **({"noise": noise, "noise_dropped": drop_noise} if noise else {}),
    }
    if family == "mamba2":
        problems += _check_keys("block_cfg", block, _MAMBA2_BLOCK_FIELDS, _MAMBA2_FIXED)
        if backbone.get("d_inner", 0):
            problems.append(f"backbone_config.d_inner={backbone['d_inner']} (Mamba2 blocks with an MLP)")
        fields = {ours: block[theirs] for theirs, ours in _MAMBA2_BLOCK_FIELDS.items() if theirs in block}
        if problems:
            raise ConversionError("Cannot convert this reference config: " + "; ".join(problems))
        return ImplicitMamba2Config(**common, **fields, **noise_fields)
    problems += _check_keys("block_cfg", block, {"n_head", "rope_theta", "max_seq_len", "bias"}, _LLAMA_FIXED)
    # The standalone code builds a gated MLP (`fc1`, `fc2`) when `mlp_type` is missing; the torchdeq code a Llama one.
    if backbone.get("mlp_type", "gated_mlp" if layout == "standalone" else "llama_mlp") != "llama_mlp":
        problems.append(f"backbone_config.mlp_type={backbone.get('mlp_type')!r} (only 'llama_mlp')")
    if problems:
        raise ConversionError("Cannot convert this reference config: " + "; ".join(problems))
    return ImplicitLlamaConfig(
        **common,
        # The reference LlamaMLP keeps 2/3 of d_inner (multiple_of=1, no ffn_dim_multiplier).
        intermediate_size=int(2 * backbone["d_inner"] / 3),
        num_attention_heads=block["n_head"],
        num_key_value_heads=block["n_head"],
        max_position_embeddings=block.get("max_seq_len", 2048),
        rope_parameters={"rope_type": "default", "rope_theta": float(block.get("rope_theta", 500000.0))},
        attention_bias=bool(block.get("bias", False)),
    )


def model_class(config: ImplicitPreTrainedConfig) -> type:
    return ImplicitLlamaForCausalLM if isinstance(config, ImplicitLlamaConfig) else ImplicitMamba2ForCausalLM


# (reference pattern, our template) per family; `{i}` is the layer index. Weight-normalised weights are matched on
# their logical name (`...weight`), their `_g`/`_v` parts being grouped first.
_COMMON_RULES = [
    (r"backbone\.injection_norm\.weight", "{prefix}.injection.norm.weight"),
    (r"backbone\.injection\.(weight|bias)", "{prefix}.injection.{0}"),
]
_RULES = {
    "mamba2": [
        (r"{embedding}", "backbone.embeddings.weight"),
        (r"backbone\.norm_f\.weight", "backbone.norm_f.weight"),
        (r"backbone\.layers\.(\d+)\.norm\.weight", "backbone.layers.{0}.norm.weight"),
        (r"backbone\.layers\.(\d+)\.mixer\.(in_proj|conv1d|out_proj)\.(weight|bias)",
         "backbone.layers.{0}.mixer.{1}.{2}"),
        (r"backbone\.layers\.(\d+)\.mixer\.(dt_bias|A_log|D|norm\.weight)", "backbone.layers.{0}.mixer.{1}"),
    ],
    "llama": [
        (r"{embedding}", "model.embed_tokens.weight"),
        (r"backbone\.norm_f\.weight", "model.norm.weight"),
        (r"backbone\.layers\.(\d+)\.norm\.weight", "model.layers.{0}.input_layernorm.weight"),
        (r"backbone\.layers\.(\d+)\.norm2\.weight", "model.layers.{0}.post_attention_layernorm.weight"),
        (r"backbone\.layers\.(\d+)\.mixer\.wq\.(weight|bias)", "model.layers.{0}.self_attn.q_proj.{1}"),
        (r"backbone\.layers\.(\d+)\.mixer\.wk\.(weight|bias)", "model.layers.{0}.self_attn.k_proj.{1}"),
        (r"backbone\.layers\.(\d+)\.mixer\.wv\.(weight|bias)", "model.layers.{0}.self_attn.v_proj.{1}"),
        (r"backbone\.layers\.(\d+)\.mixer\.out_proj\.(weight|bias)", "model.layers.{0}.self_attn.o_proj.{1}"),
        (r"backbone\.layers\.(\d+)\.mlp\.w1\.(weight|bias)", "model.layers.{0}.mlp.gate_proj.{1}"),
        (r"backbone\.layers\.(\d+)\.mlp\.w3\.(weight|bias)", "model.layers.{0}.mlp.up_proj.{1}"),
        (r"backbone\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)", "model.layers.{0}.mlp.down_proj.{1}"),
    ],
}
_PREFIX = {"mamba2": "backbone", "llama": "model"}
_HEAD = "criterion.decoder.weight"
# Buffers the reference may save that our model recomputes (rotary frequencies).
_DERIVED = re.compile(r".*rotary_emb\.(inv_freq|original_inv_freq)")


def _compile_rules(family: str, layout: str) -> list[tuple[re.Pattern, str]]:
    rules = [(p, t.replace("{prefix}", _PREFIX[family])) for p, t in _COMMON_RULES] + _RULES[family]
    embedding = re.escape(embedding_key(layout))
    return [(re.compile(pattern.replace("{embedding}", embedding) + r"$"), template) for pattern, template in rules]


def _weight_norm_part(key: str, layout: str) -> tuple[str, str | None]:
    """`(logical name, "g" | "v" | None)` of a source key: the weight a weight-norm part belongs to, or the key."""
    for suffix, part in _WEIGHT_NORM_SUFFIXES[_key_style(layout)].items():
        if key.endswith(suffix):
            return key[: -len(suffix)] + ".weight", part
    return key, None


def _target_name(rules: list[tuple[re.Pattern, str]], logical: str) -> str | None:
    for pattern, template in rules:
        match = pattern.match(logical)
        if match:
            return template.format(*match.groups())
    return None


@dataclass
class SourceTensor:
    """How to produce one of our tensors from the source: a plain key, or the `_g`/`_v` pair of a weight."""

    key: str | None = None
    magnitude: str | None = None
    direction: str | None = None

    @property
    def source_keys(self) -> list[str]:
        return [k for k in (self.key, self.magnitude, self.direction) if k is not None]


@dataclass
class WeightNormSettings:
    learn_scale: bool = True
    target_norm: float = 1.0
    clip: bool = False
    clip_value: float = 1.0

    @classmethod
    def from_reference(cls, reference: dict[str, Any]) -> WeightNormSettings:
        norm = (reference.get("deq_params") or {}).get("norm", {})
        return cls(
            learn_scale=not norm.get("norm_no_scale", False),
            target_norm=float(norm.get("norm_target_norm", 1.0)),
            clip=bool(norm.get("norm_clip", False)),
            clip_value=float(norm.get("norm_clip_val", norm.get("norm_clip_value", 1.0))),
        )


def fold_weight_norm(
    direction: torch.Tensor, magnitude: torch.Tensor | None, settings: WeightNormSettings
) -> torch.Tensor:
    """The effective weight `v * g / ||v||` (norm over all dimensions but the first), computed in float64."""
    v = direction.double()
    norm = v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))
    if settings.learn_scale:
        if magnitude is None:
            raise ConversionError("weight-normalised weight without its magnitude `_g`")
        factor = magnitude.double().view_as(norm) / norm
    else:
        factor = settings.target_norm / norm
    if settings.clip:
        factor = factor.clamp(max=settings.clip_value)
    return v * factor


@dataclass
class ConversionPlan:
    """Every target tensor of our model and where it comes from, checked against the model's expected shapes."""

    sources: dict[str, SourceTensor]
    weight_norm: WeightNormSettings

    def materialize(self, target: str, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        source = self.sources[target]
        if source.key is not None:
            return read(source.key)
        magnitude = read(source.magnitude) if source.magnitude is not None else None
        return fold_weight_norm(read(source.direction), magnitude, self.weight_norm)


def plan_conversion(
    reference: dict[str, Any],
    source_shapes: dict[str, tuple[int, ...]],
    expected_shapes: dict[str, tuple[int, ...]],
    layout: str = "torchdeq",
) -> ConversionPlan:
    """Map every source key (in `layout`'s naming) onto our state dict. Raises `ConversionError` listing every unknown
    source key, every target key no source provides and every shape mismatch (with both shapes)."""
    family = family_of(reference)
    rules = _compile_rules(family, layout)
    tied = bool(reference.get("tie_embeddings", True))
    sources: dict[str, SourceTensor] = {}
    origin: dict[str, str] = {}
    unknown, problems = [], []
    for key in sorted(source_shapes):
        if _DERIVED.match(key) or (key == _HEAD and tied):
            continue  # recomputed by our model / the tied head is the embedding
        if key == _HEAD:
            target = "lm_head.weight"
            sources[target] = SourceTensor(key=key)
            origin[target] = key
            continue
        logical, part = _weight_norm_part(key, layout)
        target = _target_name(rules, logical)
        if target is None:
            unknown.append(f"{key} {tuple(source_shapes[key])}")
            continue
        source = sources.setdefault(target, SourceTensor())
        if part == "g":
            source.magnitude = key
        elif part == "v":
            source.direction = key
        else:
            source.key = key
        origin[target] = logical
    if unknown:
        problems.append("unknown source keys: " + ", ".join(unknown))
    for target, source in sources.items():
        if source.key is not None and (source.direction or source.magnitude):
            problems.append(f"{origin[target]}: both a plain weight and weight-norm parts")
        elif source.key is None and source.direction is None:
            problems.append(f"{origin[target]}: a weight-norm magnitude without its direction")
        shape = tuple(source_shapes[source.key or source.direction])
        if target not in expected_shapes:
            problems.append(f"{origin[target]} -> {target}: not a parameter of the {family} model")
        elif shape != tuple(expected_shapes[target]):
            problems.append(
                f"shape mismatch for {origin[target]} -> {target}: source {shape}, expected {tuple(expected_shapes[target])}"
            )
    weight_norm = WeightNormSettings.from_reference(reference)
    for target, source in sources.items():
        if source.direction is not None and source.magnitude is None and weight_norm.learn_scale:
            problems.append(f"{origin[target]}: a weight-norm direction without its magnitude")
    missing = sorted(set(expected_shapes) - set(sources))
    if missing:
        problems.append("missing from the source: " + ", ".join(f"{k} {tuple(expected_shapes[k])}" for k in missing))
    if problems:
        raise ConversionError("The checkpoint does not match the model:\n  " + "\n  ".join(problems))
    return ConversionPlan(sources, weight_norm)


def reference_state_dict(
    model: torch.nn.Module, reference: dict[str, Any], seed: int = 0
) -> dict[str, torch.Tensor]:
    """The reference-layout state dict of `model`'s weights (used by tests and benchmarks to make checkpoints).

    Weight-normalised weights are written as a direction `v = w * c` with a random positive row scale `c` and the
    magnitude `g = ||w||`, so folding them back is a real computation, not a copy.
    """
    family = family_of(reference)
    generator = torch.Generator().manual_seed(seed)
    normalised = uses_weight_norm(reference)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            state[_HEAD] = tensor.clone()
            continue
        reference_name = _reference_name(family, name)
        if reference_name is None:
            raise ConversionError(f"no reference name for {name}")
        # torchdeq normalises the Linear/Conv1d weights of the backbone: every matrix/kernel but the embedding.
        if normalised and tensor.dim() >= 2 and reference_name.startswith("backbone."):
            scale = torch.rand(tensor.shape[0], *([1] * (tensor.dim() - 1)), generator=generator) + 0.5
            state[reference_name + "_v"] = (tensor.double() * scale).to(tensor.dtype)
            state[reference_name + "_g"] = tensor.double().flatten(1).norm(dim=1).view_as(scale).to(tensor.dtype)
        else:
            state[reference_name] = tensor.clone()
    return state


_REVERSE = {
    "mamba2": [
        (r"backbone\.embeddings\.weight", "word_emb.emb.weight"),
        (r"backbone\.norm_f\.weight", "backbone.norm_f.weight"),
        (r"backbone\.injection\.norm\.weight", "backbone.injection_norm.weight"),
        (r"backbone\.injection\.(weight|bias)", "backbone.injection.{0}"),
        (r"backbone\.layers\.(\d+)\.(.+)", "backbone.layers.{0}.{1}"),
    ],
    "llama": [
        (r"model\.embed_tokens\.weight", "word_emb.emb.weight"),
        (r"model\.norm\.weight", "backbone.norm_f.weight"),
        (r"model\.injection\.norm\.weight", "backbone.injection_norm.weight"),
        (r"model\.injection\.(weight|bias)", "backbone.injection.{0}"),
        (r"model\.layers\.(\d+)\.input_layernorm\.weight", "backbone.layers.{0}.norm.weight"),
        (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "backbone.layers.{0}.norm2.weight"),
        (r"model\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", "backbone.layers.{0}.mixer.wq.{1}"),
        (r"model\.layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)", "backbone.layers.{0}.mixer.wk.{1}"),
        (r"model\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)", "backbone.layers.{0}.mixer.wv.{1}"),
        (r"model\.layers\.(\d+)\.self_attn\.o_proj\.(weight|bias)", "backbone.layers.{0}.mixer.out_proj.{1}"),
        (r"model\.layers\.(\d+)\.mlp\.gate_proj\.(weight|bias)", "backbone.layers.{0}.mlp.w1.{1}"),
        (r"model\.layers\.(\d+)\.mlp\.up_proj\.(weight|bias)", "backbone.layers.{0}.mlp.w3.{1}"),
        (r"model\.layers\.(\d+)\.mlp\.down_proj\.(weight|bias)", "backbone.layers.{0}.mlp.fc2.{1}"),
    ],
}


def _reference_name(family: str, name: str) -> str | None:
    for pattern, template in _REVERSE[family]:
        match = re.fullmatch(pattern, name)
        if match:
            return template.format(*match.groups())
    return None


def write_reference_checkpoint(
    reference: dict[str, Any],
    folder: str | os.PathLike,
    *,
    seed: int = 0,
    file_format: str = "safetensors",
    shards: int = 1,
) -> torch.nn.Module:
    """Write a random-weight checkpoint in the reference layout (nested `config.json`, weight-normalised tensors)
    to `folder`, for tests and benchmarks. Returns our model holding the same (effective) weights."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = config_from_reference(reference, drop_noise=True)  # the weights do not depend on the noise settings
    torch.manual_seed(seed)
    model = model_class(config)(config).eval()
    state = reference_state_dict(model, reference, seed=seed)
    (folder / "config.json").write_text(json.dumps(reference, indent=2))
    names = sorted(state)
    groups = [names[i::shards] for i in range(shards)]
    suffix = "safetensors" if file_format == "safetensors" else "bin"
    stem = "model" if file_format == "safetensors" else "pytorch_model"
    weight_map = {}
    for index, group in enumerate(groups):
        file = f"{stem}.{suffix}" if shards == 1 else f"{stem}-{index + 1:05d}-of-{shards:05d}.{suffix}"
        tensors = {name: state.pop(name).contiguous() for name in group}
        if file_format == "safetensors":
            save_file(tensors, folder / file)
        else:
            torch.save(tensors, folder / file)
        weight_map.update(dict.fromkeys(group, file))
    if shards > 1:
        index_file = f"{stem}.{suffix}.index.json"
        (folder / index_file).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return model
