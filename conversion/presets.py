"""The 24 reference configurations (mamba2/llama x 130m/370m/760m/1.3b x explicit/implicit/pretrain), as the
reference repo's `hf_models/*/config.json` state them (solver, vocabulary padding and all).

`explicit` is the paper's in-house baseline (Mamba2* / Llama-dagger), `pretrain` the (4+1) implicit model of the
bounded phase (4 iterations, 1 phantom step), `implicit` the (24+4) Mamba2 / (32+4) Llama model of the free phase.
"""

from __future__ import annotations

import copy
from typing import Any

# size: (d_model, n_layer, attention heads (Llama), d_inner (Llama))
_MAMBA2_SIZES = {"130m": (768, 24), "370m": (1024, 48), "760m": (1536, 48), "1.3b": (2048, 48)}
_LLAMA_SIZES = {"130m": (768, 12, 12, 3072), "370m": (1024, 24, 16, 4096), "760m": (1536, 24, 16, 6144),
                "1.3b": (2048, 24, 32, 8192)}
# Free-phase iteration caps of the implicit models (the 370m Llama was trained with 24).
_FREE_PHASE_ITERATIONS = {"mamba2": dict.fromkeys(_MAMBA2_SIZES, 24), "llama": {"130m": 32, "370m": 24, "760m": 32,
                                                                                  "1.3b": 32}}


def _deq_params(max_iterations: int, phantom_steps: int) -> dict[str, Any]:
    return {
        "norm": {"norm_clip": False, "norm_clip_val": 1.0, "norm_no_scale": False, "norm_target_norm": 1.0,
                 "norm_type": "weight_norm", "sn_n_power_iters": 1},
        "regularization": {"jac_incremental": 0, "jac_loss_freq": 0.0, "jac_loss_weight": 0.0, "sradius_mode": True},
        "solver": {"b_max_iter": 32, "b_solver": "fixed_point_iter", "b_stop_mode": "rel", "b_tol": 0.001,
                   "eval_f_max_iter": 0, "eval_factor": 4.0, "f_max_iter": max_iterations,
                   "f_solver": "fixed_point_iter", "f_stop_mode": "rel", "f_tol": 0.05},
        "training": {"core": "sliced", "gamma": 0.8, "grad": phantom_steps, "hook_ift": False, "ift": False,
                     "indexing": [], "n_states": 1, "sup_gap": -1, "sup_loc": [], "tau": 0.8},
    }


def _preset(family: str, size: str, variant: str) -> dict[str, Any]:
    if family == "mamba2":
        d_model, n_layer = _MAMBA2_SIZES[size]
        backbone = {"block_cfg": {"d_state": 128, "expand": 2, "headdim": 64}, "block_type": "mamba2",
                    "d_inner": 0, "d_model": d_model, "dropout": 0.0, "n_layer": n_layer, "pre_norm": True,
                    "rms_norm": True}
        # Every Mamba2 pads its vocabulary to a multiple of 16, except the 130m explicit baseline.
        padded = not (size == "130m" and variant == "explicit")
    else:
        d_model, n_layer, heads, d_inner = _LLAMA_SIZES[size]
        backbone = {"block_cfg": {"n_head": heads}, "block_type": "transformer", "d_inner": d_inner,
                    "d_model": d_model, "dropout": 0.0, "mlp_type": "llama_mlp", "n_layer": n_layer,
                    "pre_norm": True, "rms_norm": True}
        padded = False
    config = {
        "backbone_type": "explicit" if variant == "explicit" else "implicit",
        "backbone_config": backbone,
        "d_embed": d_model,
        "deq_params": {},
        "head_bias": False,
        "n_tokens": 50277,
        "vocab_size": 50277,
        "pad_vocab": padded,
        "pad_vocab_size_multiple": 16 if padded else 8,
        "tie_embeddings": True,
        "tokenizer": "EleutherAI/gpt-neox-20b",
    }
    if variant != "explicit":
        backbone.update({"init_gain": 0.5, "pretrain_iter": 4, "pretrain_steps": 0})
        if variant == "pretrain":
            config["deq_params"] = _deq_params(max_iterations=4, phantom_steps=1)
        else:
            config["deq_params"] = _deq_params(_FREE_PHASE_ITERATIONS[family][size], phantom_steps=4)
    return config


PRESETS: dict[str, dict[str, Any]] = {
    f"{family}-{size}-{variant}": _preset(family, size, variant)
    for family, sizes in (("mamba2", _MAMBA2_SIZES), ("llama", _LLAMA_SIZES))
    for size in sizes
    for variant in ("explicit", "implicit", "pretrain")
}


def preset_reference_config(name: str) -> dict[str, Any]:
    """A copy of the reference `config.json` of preset `name` (e.g. `"mamba2-1.3b-implicit"`)."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
    return copy.deepcopy(PRESETS[name])
