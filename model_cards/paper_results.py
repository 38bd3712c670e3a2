"""Numbers from "Implicit Language Models are RNNs: Balancing Parallelization and Expressivity" (Schöne et al., ICML
2025), transcribed as printed, for the model cards of the converted checkpoints.

`PAPER_RESULTS` is keyed by preset name `"{family}-{size}-{variant}"`: family `mamba2` or `llama`, size `130m`,
`370m`, `760m` or `1.3b` (the paper also calls the 370M models "350M"), variant `explicit` (the paper's in-house
baselines Mamba2* / Llama†, trained with the same code and data), `pretrain` (the (4+1) models) or `implicit` (the
(24+4) Mamba2 / (32+4) Llama models). Each preset maps to records keyed `table_1`, `table_6` and `table_7`; a record
names its `source` table, the paper's row label (`model`) and size label (`size`), and holds that row's numbers.
Entries a table does not have (a "-" cell, or no row for the model) are left out, never filled in. The paper's
external baselines (the original Mamba2 and the SlimPajama Llama of Beck et al.) are no presets and not transcribed.

`PAPER_ARCHITECTURES` holds Table 3, keyed `"{family}-{size}"`, with transformers' field names where one exists.

Numbers are Python ints and floats: a printed trailing zero ("9.70") is not kept by the float, only in this source.
"""

from __future__ import annotations

from typing import Any

FAMILIES = ("mamba2", "llama")
SIZES = ("130m", "370m", "760m", "1.3b")
VARIANTS = ("explicit", "pretrain", "implicit")
PRESETS = tuple(f"{family}-{size}-{variant}" for family in FAMILIES for size in SIZES for variant in VARIANTS)

# Printed column headers, in the paper's order: the cards label rows with them.
TABLE_1_COLUMNS = {
    "dataset_tokens": "Dataset/Tokens (B)",
    "relative_wall_clock_time": "Rel. WCT Impl/Expl",
    "d_pile_ppl": "D-Pile ppl↓",
    "lambada_ppl": "LAMBADA ppl↓",
    "lambada_acc": "LAMBADA acc↑",
    "hellaswag_acc": "HellaSwag acc↑",
    "piqa_acc": "PIQA acc↑",
    "arc_easy_acc": "Arc-E acc↑",
    "arc_challenge_acc": "Arc-C acc↑",
    "winogrande_acc": "WinoGrande acc↑",
    "openbookqa_acc": "OpenbookQA acc↑",
    "average_acc": "Average acc↑",
}
TABLE_6_COLUMNS = {
    "d_pile_ppl": "D-Pile Perplexity",
    "inference_steps": "Inference Steps",
    "relative_difference": "Rel. Diff.",
}
TABLE_7_COLUMNS = {
    "ppl_2048": "2048 ppl↓",
    "ppl_4096": "4096 ppl↓",
    "ppl_8192": "8192 ppl↓",
    "ppl_16384": "16384 ppl↓",
}
TABLE_COLUMNS = {"Table 1": TABLE_1_COLUMNS, "Table 6": TABLE_6_COLUMNS, "Table 7": TABLE_7_COLUMNS}

# Table 1: test perplexity on D-PILE and lm-eval downstream accuracy. Every preset model is trained on "D-Pile/207";
# the relative wall-clock time is "-" for the whole 370M series (run on various node sizes) and left out there.
# Columns: Rel. WCT, D-Pile ppl, LAMBADA ppl, LAMBADA acc, HellaSwag, PIQA, Arc-E, Arc-C, WinoGrande, OpenbookQA,
# Average.
_TABLE_1_LABELS = {
    ("mamba2", "explicit"): "Mamba2*",
    ("mamba2", "pretrain"): "Mamba2(4+1)-ours",
    ("mamba2", "implicit"): "Mamba2(24+4)-ours",
    ("llama", "explicit"): "Llama†",
    ("llama", "pretrain"): "Llama (4+1)-ours",
    ("llama", "implicit"): "Llama (32+4)-ours",
}
_TABLE_1_SIZES = {"130m": "130M", "370m": "370M", "760m": "760M", "1.3b": "1.3B"}
_TABLE_1_ROWS = {
    "mamba2-130m-explicit": (1, 13.05, 18.51, 0.4116, 0.3527, 0.6572, 0.4815, 0.2372, 0.5130, 0.300, 0.4219),
    "mamba2-130m-pretrain": (1.97, 13.76, 18.58, 0.4118, 0.3628, 0.6485, 0.4537, 0.2287, 0.5107, 0.288, 0.4149),
    "mamba2-130m-implicit": (3.27, 12.86, 18.03, 0.4174, 0.3673, 0.6496, 0.4604, 0.2372, 0.5178, 0.290, 0.4200),
    "llama-130m-explicit": (1, 12.77, 17.08, 0.4297, 0.3513, 0.6540, 0.4794, 0.2440, 0.5122, 0.280, 0.4215),
    "llama-130m-pretrain": (0.90, 12.73, 15.54, 0.4518, 0.3706, 0.6447, 0.4823, 0.2372, 0.5391, 0.290, 0.4308),
    "llama-130m-implicit": (2.08, 11.73, 13.39, 0.4801, 0.3958, 0.6676, 0.4886, 0.2355, 0.5304, 0.298, 0.4423),
    "mamba2-370m-explicit": (None, 10.18, 8.96, 0.5333, 0.4653, 0.6942, 0.5526, 0.2696, 0.5320, 0.306, 0.4790),
    "mamba2-370m-pretrain": (None, 10.02, 8.79, 0.5457, 0.4684, 0.6899, 0.5358, 0.2696, 0.5162, 0.308, 0.4762),
    "mamba2-370m-implicit": (None, 9.70, 8.26, 0.5575, 0.4792, 0.7040, 0.5484, 0.2688, 0.5351, 0.316, 0.487),
    "llama-370m-explicit": (None, 10.30, 8.37, 0.5624, 0.4537, 0.6844, 0.5476, 0.2577, 0.5541, 0.318, 0.4826),
    "llama-370m-pretrain": (None, 9.66, 7.03, 0.5898, 0.5030, 0.7024, 0.5539, 0.2611, 0.5572, 0.314, 0.4973),
    "llama-370m-implicit": (None, 9.43, 7.04, 0.5956, 0.5114, 0.7078, 0.5244, 0.2705, 0.5722, 0.320, 0.5003),
    "mamba2-760m-explicit": (1, 8.98, 6.24, 0.6125, 0.5418, 0.7231, 0.6044, 0.2858, 0.5777, 0.338, 0.5262),
    "mamba2-760m-pretrain": (2.05, 8.60, 6.15, 0.6117, 0.5569, 0.7296, 0.6077, 0.3140, 0.5509, 0.336, 0.5295),
    "mamba2-760m-implicit": (3.43, 8.35, 5.90, 0.6191, 0.5698, 0.7334, 0.6090, 0.3131, 0.5730, 0.338, 0.5365),
    "llama-760m-explicit": (1, 8.88, 5.77, 0.6375, 0.5448, 0.7171, 0.5905, 0.2816, 0.6054, 0.338, 0.5307),
    "llama-760m-pretrain": (1.64, 8.27, 5.15, 0.6524, 0.5853, 0.7312, 0.6052, 0.3097, 0.5967, 0.356, 0.5481),
    "llama-760m-implicit": (2.97, 7.90, 4.82, 0.6703, 0.5995, 0.7416, 0.6187, 0.3012, 0.5991, 0.344, 0.5535),
    "mamba2-1.3b-explicit": (1, 8.28, 5.12, 0.6456, 0.5939, 0.7416, 0.6145, 0.3123, 0.6117, 0.352, 0.5531),
    "mamba2-1.3b-pretrain": (1.91, 7.97, 5.21, 0.6383, 0.6136, 0.7437, 0.6343, 0.3302, 0.5746, 0.354, 0.5555),
    "mamba2-1.3b-implicit": (3.19, 7.70, 4.99, 0.6489, 0.6267, 0.7416, 0.6423, 0.3336, 0.5888, 0.352, 0.5620),
    "llama-1.3b-explicit": (1, 7.99, 4.95, 0.6569, 0.5936, 0.7432, 0.6385, 0.3217, 0.6062, 0.352, 0.5589),
    "llama-1.3b-pretrain": (1.96, 7.66, 4.40, 0.6852, 0.6397, 0.7448, 0.6338, 0.3396, 0.6575, 0.360, 0.5801),
    "llama-1.3b-implicit": (3.91, 7.24, 4.24, 0.6901, 0.6583, 0.7465, 0.6654, 0.3601, 0.6401, 0.364, 0.5892),
}

# Table 6: inference dynamics on length-2048 sequences of the D-PILE test split, simultaneous mode. Implicit models
# only. Columns: D-Pile Perplexity, Inference Steps (average), Rel. Diff.
_TABLE_6_LABELS = {
    ("mamba2", "pretrain"): "Mamba2(4+1)",
    ("mamba2", "implicit"): "Mamba2(24+4)",
    ("llama", "pretrain"): "Llama(4+1)",
    ("llama", "implicit"): "Llama(32+4)",
}
_TABLE_6_SIZES = {"130m": "130M", "370m": "350M", "760m": "760M", "1.3b": "1.3B"}
_TABLE_6_ROWS = {
    "mamba2-130m-pretrain": (13.76, 14, 0.035),
    "mamba2-130m-implicit": (12.86, 62, 0.036),
    "llama-130m-pretrain": (12.73, 13, 0.014),
    "llama-130m-implicit": (11.73, 53, 0.033),
    "mamba2-370m-pretrain": (10.02, 10, 0.012),
    "mamba2-370m-implicit": (9.70, 49, 0.024),
    "llama-370m-pretrain": (9.66, 12, 0.015),
    "llama-370m-implicit": (9.43, 57, 0.037),
    "mamba2-760m-pretrain": (8.60, 10, 0.013),
    "mamba2-760m-implicit": (8.35, 45, 0.025),
    "llama-760m-pretrain": (8.27, 12, 0.014),
    "llama-760m-implicit": (7.90, 77, 0.044),
    "mamba2-1.3b-pretrain": (7.97, 10, 0.013),
    "mamba2-1.3b-implicit": (7.70, 47, 0.029),
    "llama-1.3b-pretrain": (7.66, 13, 0.015),
    "llama-1.3b-implicit": (7.24, 69, 0.048),
}

# Table 7: length extrapolation, D-PILE test perplexity at 2048/4096/8192/16384 tokens (trained on 2048). Mamba2 only;
# the table has no Llama rows.
_TABLE_7_LABELS = {
    ("mamba2", "explicit"): "Mamba2*",
    ("mamba2", "pretrain"): "Mamba2(4+1)-ours",
    ("mamba2", "implicit"): "Mamba2(24+4)-ours",
}
_TABLE_7_SIZES = _TABLE_1_SIZES
_TABLE_7_ROWS = {
    "mamba2-130m-explicit": (13.05, 12.72, 12.76, 12.94),
    "mamba2-130m-pretrain": (13.76, 13.04, 13.06, 13.25),
    "mamba2-130m-implicit": (12.86, 12.53, 12.55, 12.78),
    "mamba2-370m-explicit": (10.18, 9.94, 10.07, 10.34),
    "mamba2-370m-pretrain": (10.02, 9.74, 9.73, 9.86),
    "mamba2-370m-implicit": (9.70, 9.45, 9.44, 9.59),
    "mamba2-760m-explicit": (8.98, 8.94, 10.38, 12.56),
    "mamba2-760m-pretrain": (8.60, 8.38, 8.40, 8.55),
    "mamba2-760m-implicit": (8.35, 8.16, 8.18, 8.33),
    "mamba2-1.3b-explicit": (8.28, 8.24, 9.96, 15.06),
    "mamba2-1.3b-pretrain": (7.97, 7.81, 8.36, 9.53),
    "mamba2-1.3b-implicit": (7.70, 7.59, 8.19, 9.63),
}


def split_preset(preset: str) -> tuple[str, str, str]:
    """Split a preset name into `(family, size, variant)`; raise `ValueError` listing the valid names if unknown."""
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}.")
    family, size, variant = preset.split("-")
    return family, size, variant


def _records(
    source: str,
    labels: dict[tuple[str, str], str],
    sizes: dict[str, str],
    rows: dict[str, tuple[Any, ...]],
    extra: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    columns = list(TABLE_COLUMNS[source])
    if extra:
        columns = [name for name in columns if name not in extra]
    records = {}
    for preset, values in rows.items():
        family, size, variant = split_preset(preset)
        record = {"source": source, "model": labels[family, variant], "size": sizes[size], **(extra or {})}
        record.update((name, value) for name, value in zip(columns, values, strict=True) if value is not None)
        records[preset] = record
    return records


def _paper_results() -> dict[str, dict[str, dict[str, Any]]]:
    tables = {
        "table_1": _records(
            "Table 1", _TABLE_1_LABELS, _TABLE_1_SIZES, _TABLE_1_ROWS, extra={"dataset_tokens": "D-Pile/207"}
        ),
        "table_6": _records("Table 6", _TABLE_6_LABELS, _TABLE_6_SIZES, _TABLE_6_ROWS),
        "table_7": _records("Table 7", _TABLE_7_LABELS, _TABLE_7_SIZES, _TABLE_7_ROWS),
    }
    return {
        preset: {table: records[preset] for table, records in tables.items() if preset in records}
        for preset in PRESETS
        if any(preset in records for records in tables.values())
    }


PAPER_RESULTS: dict[str, dict[str, dict[str, Any]]] = _paper_results()

# Table 3: architecture and pretraining details. "SSM/Transformer # layers" is split by family. "# Heads/ Dim." is
# the Transformer's (it gives hidden_size // heads; a Mamba2 of these widths has expand * hidden_size / 64 SSM heads),
# so only the Llama entries carry it. Steps, learning rate and batch size are shared by both families.
_TABLE_3_ROWS = {
    # size: (Params., SSM # layers, Transformer # layers, Dim. Emb., # Heads, Dim., Training Steps, Peak LR, Batch)
    "1.3b": ("1.3B", 48, 24, 2048, 32, 64, 197701, 0.001, "1M"),
    "760m": ("760M", 48, 24, 1536, 16, 96, 197701, 0.00125, "1M"),
    "370m": ("350M", 48, 24, 1024, 16, 64, 197701, 0.0015, "1M"),
    "130m": ("130M", 24, 12, 768, 12, 64, 197701, 0.003, "1M"),
}


def _paper_architectures() -> dict[str, dict[str, Any]]:
    architectures = {}
    for size in SIZES:
        params, ssm_layers, transformer_layers, width, heads, head_dim, steps, peak_lr, batch = _TABLE_3_ROWS[size]
        shared = {
            "source": "Table 3",
            "parameters": params,
            "hidden_size": width,
            "training_steps": steps,
            "peak_learning_rate": peak_lr,
            "batch_size_tokens": batch,
        }
        architectures[f"mamba2-{size}"] = {**shared, "num_hidden_layers": ssm_layers}
        architectures[f"llama-{size}"] = {
            **shared,
            "num_hidden_layers": transformer_layers,
            "num_attention_heads": heads,
            "head_dim": head_dim,
        }
    return architectures


PAPER_ARCHITECTURES: dict[str, dict[str, Any]] = _paper_architectures()
