"""Render the model card (the Hub repo's README.md) of an implicit-LM checkpoint from its config, and check one."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import validate_repo_id

from modeling_implicit import IMPLICIT_FAMILIES

from .paper_results import PAPER_ARCHITECTURES, PAPER_RESULTS, TABLE_COLUMNS, VARIANTS, split_preset

if TYPE_CHECKING:
    from modeling_implicit import ImplicitPreTrainedConfig

PAPER_TITLE = "Implicit Language Models are RNNs: Balancing Parallelization and Expressivity"
ARXIV_ID = "2502.07827"
PAPER_URL = f"https://arxiv.org/abs/{ARXIV_ID}"
DEFAULT_DATASETS = ("EleutherAI/the_pile_deduplicated",)
DEFAULT_TOKENIZER = "EleutherAI/gpt-neox-20b"


@dataclass(frozen=True)
class _Family:
    """What a card says differently per model family."""

    display_name: str
    template: str
    tags: tuple[str, ...]
    architecture_fields: tuple[str, ...]
    free_stage_iterations: int  # the paper's iteration cap in the free stage of the curriculum
    cooldown: str


_FAMILIES = {
    "mamba2": _Family(
        display_name="Mamba2",
        template="implicit_mamba2.md",
        tags=("mamba2", "state-space-model"),
        architecture_fields=(
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "state_size",
            "head_dim",
            "expand",
            "n_groups",
            "conv_kernel",
            "tie_word_embeddings",
        ),
        free_stage_iterations=24,
        cooldown="the learning-rate cooldown starts after 90% of training",
    ),
    "llama": _Family(
        display_name="Llama",
        template="implicit_llama.md",
        tags=("llama", "transformer"),
        architecture_fields=(
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
            "rope_parameters",
            "tie_word_embeddings",
        ),
        free_stage_iterations=32,
        cooldown="the learning-rate cooldown starts with the free stage",
    ),
}
# Families are matched on `model_type` (IMPLICIT_FAMILIES) rather than the class: a config loaded as remote code is a
# different class object.

_TABLE_CAPTIONS = {
    "table_1": (
        "perplexity and downstream accuracy",
        (
            "Test perplexity on D-PILE, and accuracy on downstream tasks with the LM Evaluation Harness. Rel. WCT: "
            "training wall-clock time relative to the explicit model."
        ),
    ),
    "table_6": (
        "inference dynamics",
        (
            "Average solver steps on length-2048 sequences of the D-PILE test split in simultaneous mode, and the "
            "relative difference of the solutions found."
        ),
    ),
    "table_7": (
        "length extrapolation",
        "D-PILE test perplexity by sequence length; the models were trained on 2048 tokens.",
    ),
}

_SOLVER_FIELDS = {
    "solver": "`picard`: damped fixed-point iteration; `anderson`: Anderson acceleration",
    "tolerance": "stop once a sample's residual is below it",
    "stop_mode": "`rel`: residual `‖f(z) − z‖ / ‖z‖`; `abs`: `‖f(z) − z‖`",
    "max_iterations": "iteration cap while training",
    "eval_max_iterations": "iteration cap at inference (test-time iterations)",
    "damping": "step of the update `z ← (1 − damping) z + damping f(z)`",
    "anderson_memory": "past iterates mixed by Anderson acceleration",
    "phantom_steps": "`k`: damped steps with gradient tape after the tape-free solve (training)",
    "phantom_damping": "`λ` of the phantom gradient (eq. 5 of the paper)",
    "backward": "`phantom` gradient, or `unrolled` through every iteration",
    "inference_mode": "how a full sequence is solved without a cache: `simultaneous` or `sequential`",
    "prefill_mode": "how `generate` solves the prompt: `simultaneous` or `sequential`",
}


def render_model_card(
    config: ImplicitPreTrainedConfig,
    *,
    repo_id: str,
    preset: str | None = None,
    base_model: str | None = None,
    license: str = "mit",
    datasets: list[str] | None = None,
    tokenizer: str | None = None,
    source_layout: str | None = None,
) -> str:
    """Render the README.md of a Hub repo holding an implicit Mamba2 or implicit Llama checkpoint.

    Args:
        config: the checkpoint's `ImplicitMamba2Config` or `ImplicitLlamaConfig`.
        repo_id: the Hub repo the card is for (`"owner/name"`); the usage snippet loads it.
        preset: the paper checkpoint this is, `"{family}-{size}-{variant}"` (see `paper_results.PRESETS`); adds its
            training recipe and the paper's reported results.
        base_model: the Hub repo this checkpoint was trained from, for the `base_model` metadata.
        license: the license identifier for the metadata.
        datasets: training datasets for the metadata; defaults to the deduplicated Pile.
        tokenizer: the tokenizer repo; defaults to `EleutherAI/gpt-neox-20b`.
        source_layout: for a converted checkpoint, the layout of the codebase it came from
            (`config.converted_from`); the card says which codebase and which of its settings it records.

    Raises:
        ValueError: unknown model type or preset, a preset whose family or variant (explicit or implicit) does not
            match the config, or an invalid `repo_id`.
    """
    model_type = getattr(config, "model_type", None)
    family_key = IMPLICIT_FAMILIES.get(model_type)
    if family_key is None:
        raise ValueError(f"Expected an implicit Mamba2 or Llama config; got model_type {model_type!r}.")
    validate_repo_id(repo_id)
    if preset is not None:
        preset_family, _, variant = split_preset(preset)
        if preset_family != family_key:
            raise ValueError(f"Preset {preset!r} is a {preset_family} model but the config is {config.model_type}.")
        if (variant == "explicit") == config.implicit:
            raise ValueError(
                f"Preset {preset!r} is {'an explicit' if variant == 'explicit' else 'an implicit'} model but the "
                f"config has implicit={config.implicit}."
            )
    family = _FAMILIES[family_key]
    tokenizer = tokenizer or DEFAULT_TOKENIZER
    return _render(
        family.template, _card_data(family, config, license, list(datasets or DEFAULT_DATASETS), base_model),
        model_name=repo_id.split("/")[-1],
        summary=_summary(family, config, preset),
        config_table=_config_table(family, config),
        solver_section=_solver_section(config),
        usage=_usage(config, repo_id, tokenizer),
        training=_training(family, preset, base_model) + _provenance(config, source_layout),
        paper_results=_paper_results(family, preset),
    )


def render_demo_model_card(
    config: ImplicitPreTrainedConfig,
    *,
    model_name: str,
    summary: str,
    task: str,
    usage: str,
    results: str,
    command: str,
    tags: tuple[str, ...] = (),
    eval_results: list[EvalResult] | None = None,
    datasets: list[str] | None = None,
    license: str = "mit",
) -> str:
    """Render the README.md of a small model trained by one of the package's experiments (the bundled models under
    `models/`): what it is, the task it was trained on, how to use it, its config and solver, and its measured
    results with the command that reproduces them; `eval_results` (the measured figures) become the card's
    `model-index`, which the Hub shows as evaluation results; `datasets` are Hub datasets it was trained on (None:
    data that is not on the Hub). Raises `ValueError` for a config that is not ours."""
    family_key = IMPLICIT_FAMILIES.get(getattr(config, "model_type", None))
    if family_key is None:
        raise ValueError(f"Expected an implicit Mamba2 or Llama config; got model_type {config.model_type!r}.")
    family = _FAMILIES[family_key]
    card_data = _card_data(family, config, license, datasets, None)
    card_data.tags = [*card_data.tags, *tags]
    if eval_results:
        card_data.model_name, card_data.eval_results = model_name, eval_results
    return _render(
        "demo_model.md", card_data, model_name=model_name, summary=summary, task=task, usage=usage,
        config_table=_config_table(family, config), solver_section=_solver_section(config), results=results,
        command=command,
    )


def _render(template: str, card_data: ModelCardData, **sections: str) -> str:
    """A card from one of our Jinja templates through `huggingface_hub.ModelCard.from_template`, which writes
    `card_data` (validated metadata, `model-index` included) as the YAML header."""
    card = ModelCard.from_template(
        card_data, template_str=resources.files(__package__).joinpath(template).read_text(encoding="utf-8"),
        **sections)
    # Sections a card leaves out (the solver of an explicit model, results without a preset) leave blank runs.
    return re.sub(r"\n{3,}", "\n\n", card.content).rstrip("\n") + "\n"


def validate_model_card(text: str) -> dict[str, Any]:
    """Parse a model card offline and check the metadata the Hub needs to list and load the model.

    Returns the metadata as a dict. Raises `ValueError` naming every missing or invalid field.
    """
    try:
        metadata = ModelCard(text).data.to_dict()
    except (yaml.YAMLError, ValueError) as error:
        raise ValueError(f"Model card metadata is not a YAML mapping: {error}") from error
    problems = []
    if not isinstance(metadata.get("license"), str) or not metadata["license"]:
        problems.append("`license` is missing")
    if metadata.get("library_name") != "transformers":
        problems.append(f"`library_name` must be 'transformers', got {metadata.get('library_name')!r}")
    if metadata.get("pipeline_tag") != "text-generation":
        problems.append(f"`pipeline_tag` must be 'text-generation', got {metadata.get('pipeline_tag')!r}")
    tags = metadata.get("tags")
    if not isinstance(tags, list) or not tags or not all(isinstance(tag, str) and tag for tag in tags):
        problems.append(f"`tags` must be a non-empty list of strings, got {tags!r}")
    if problems:
        raise ValueError("Invalid model card metadata: " + "; ".join(problems) + ".")
    return metadata


def _card_data(
    family: _Family, config: ImplicitPreTrainedConfig, license: str, datasets: list[str] | None, base_model: str | None
) -> ModelCardData:
    kind_tag = "deep-equilibrium" if config.implicit else "explicit-baseline"
    card_data = ModelCardData(
        language=["en"],
        license=license,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["implicit-lm", kind_tag, *family.tags, f"arxiv:{ARXIV_ID}"],
        datasets=datasets,
        base_model=base_model,
    )
    return card_data


def _summary(family: _Family, config: ImplicitPreTrainedConfig, preset: str | None) -> str:
    paper = f"[{PAPER_TITLE}]({PAPER_URL}) (Schöne et al., ICML 2025)"
    name, layers = family.display_name, config.num_hidden_layers
    if not config.implicit:
        label = f" ({_paper_label(preset, 'table_1')} in the paper's tables)" if preset else ""
        return (
            f"The **explicit {name} baseline**{label} of {paper}: a conventional {name} language model that runs its "
            f"{layers} blocks once (`implicit=False`: no input injection, no fixed-point solver). It loads with the "
            "same code as the implicit models and is their point of comparison."
        )
    return (
        f"An **implicit {name}** language model from {paper}: the stack of {layers} {name} blocks is iterated to a "
        "fixed point `z* = f(z*, x)`, with the embedded input injected into every block. It is trained in "
        "simultaneous mode (all tokens iterate together, parallel over the sequence) with phantom gradients; "
        "generation runs in sequential mode (each token is iterated to convergence, then its fixed-point state is "
        "committed), which makes the model an RNN with non-linear state transitions."
    )


def _paper_label(preset: str, table: str) -> str:
    """The paper's row label for a preset in a table, with markdown's emphasis marker escaped (`Mamba2*`)."""
    return PAPER_RESULTS[preset][table]["model"].replace("*", "\\*")


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _format_value(value: Any) -> str:
    if isinstance(value, dict):
        return f"`{json.dumps(value, sort_keys=True)}`"
    return f"`{value}`"


def _config_table(family: _Family, config: ImplicitPreTrainedConfig) -> str:
    fields = ("model_type", "implicit", *family.architecture_fields)
    rows = [[f"`{name}`", _format_value(getattr(config, name))] for name in fields]
    return _markdown_table(["config field", "value"], rows)


def _solver_section(config: ImplicitPreTrainedConfig) -> str:
    if not config.implicit:
        return ""
    rows = [[f"`{name}`", _format_value(getattr(config, name)), meaning] for name, meaning in _SOLVER_FIELDS.items()]
    return (
        "## Fixed-point solver\n\n"
        "The solver settings are config fields. Training solves in simultaneous mode with "
        f"`max_iterations` = {config.max_iterations} tape-free iterations, then `phantom_steps` = "
        f"{config.phantom_steps} phantom-gradient steps: ({config.max_iterations}+{config.phantom_steps}) in the "
        "paper's notation.\n\n" + _markdown_table(["config field", "value", "meaning"], rows)
    )


def _usage(config: ImplicitPreTrainedConfig, repo_id: str, tokenizer: str) -> str:
    load = (
        f"Tokenizer: [`{tokenizer}`](https://huggingface.co/{tokenizer}).\n\n"
        "```python\n"
        "import torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{tokenizer}")\n\n'
        'inputs = tokenizer("The capital of France is", return_tensors="pt")\n'
        "output_ids = model.generate(**inputs, max_new_tokens=20)\n"
        "print(tokenizer.decode(output_ids[0], skip_special_tokens=True))\n"
    )
    if not config.implicit:
        return load + "```\n\nThe model has no solver: the `solver_stats` of its outputs are `None`."
    return (
        load + "\n"
        "# Solver statistics per sample: iterations, final residual, whether it converged.\n"
        "with torch.no_grad():\n"
        "    outputs = model(**inputs)\n"
        "print(outputs.solver_stats.iterations, outputs.solver_stats.residual, outputs.solver_stats.converged)\n"
        "```\n\n"
        "Test-time compute is chosen per call with `solver_overrides` (checked, and `model.config` left as it is): "
        "more iterations or a tighter tolerance spend more compute per token. The same fields given to "
        "`from_pretrained` change the model's defaults.\n\n"
        "```python\n"
        "overrides = {\n"
        f'    "eval_max_iterations": {2 * config.eval_max_iterations},  # this model: {config.eval_max_iterations}\n'
        f'    "tolerance": {config.tolerance / 5:g},  # this model: {config.tolerance:g}\n'
        '    "solver": "anderson",  # Anderson acceleration instead of damped fixed-point iteration\n'
        "}\n"
        "output_ids = model.generate(**inputs, max_new_tokens=20, solver_overrides=overrides)\n"
        "with torch.no_grad():  # a full-sequence forward token by token, like generation\n"
        '    outputs = model(**inputs, solver_overrides={"inference_mode": "sequential"})\n'
        "```"
    )


def _paper_recipe(family: _Family) -> str:
    cap = family.free_stage_iterations
    return (
        "The paper pretrains its implicit models on 207B tokens of the deduplicated Pile (D-PILE) with a two-stage "
        "curriculum, written (s+k): s self-iterations of the stack without gradient tape, then k phantom-gradient "
        "steps (eq. 5 of the paper), whose memory does not grow with s. The bounded stage, the **(4+1)** model, "
        "covers the first 80% of the training tokens. The free stage continues from that checkpoint with up to "
        f"{cap} self-iterations, stopped once the relative residual is below 0.05, then 4 phantom-gradient steps: "
        f"the **({cap}+4)** model. At test time the iteration cap is four times the training cap ({4 * cap})."
    )


def _provenance(config: ImplicitPreTrainedConfig, source_layout: str | None) -> str:
    source = getattr(config, "converted_from", None) or {}
    layout = source_layout or source.get("layout")
    if layout is None:
        return ""
    codebase = source.get("codebase", layout)
    text = (f"\n\nConverted from a checkpoint of `{codebase}` (source layout `{layout}`); `config.converted_from` "
            "keeps that codebase's own solver settings (`deq_params`).")
    # `reference_stop_rule`: the key of folders converted before the field was renamed `inference_loop`.
    loop = source.get("reference_inference_loop") or source.get("reference_stop_rule")
    if loop and config.implicit:
        text += (f" To reproduce that codebase's own outputs and iteration counts, load it with "
                 f"`inference_loop=\"{loop}\"` (its loop couples the rows of a batch; the default per-sample loop "
                 "does not).")
    if source.get("noise"):
        state = "dropped at conversion" if source.get("noise_dropped") else "kept"
        text += f" Its noise-study settings {source['noise']} were {state}."
    return text


def _training(family: _Family, preset: str | None, base_model: str | None) -> str:
    paragraphs = []
    if preset is None:
        paragraphs.append("This card names no checkpoint of the paper; its recipe, for reference:")
        paragraphs.append(_paper_recipe(family))
    else:
        family_key, size, variant = split_preset(preset)
        architecture = PAPER_ARCHITECTURES[f"{family_key}-{size}"]
        if variant == "explicit":
            paragraphs.append(
                f"This is the paper's explicit baseline {_paper_label(preset, 'table_1')}, trained with the same code and data as the implicit "
                "models: one pass through the stack, no self-iteration."
            )
        elif variant == "pretrain":
            paragraphs.append(
                f"This is the paper's **(4+1)** implicit {family.display_name}: in every training step the stack is "
                "self-iterated 4 times without gradient tape, then 1 phantom-gradient step is taken. It reaches a "
                "fixed point at inference although its training does not enforce one (Table 6 of the paper)."
            )
            paragraphs.append(_paper_recipe(family))
        else:
            cap = family.free_stage_iterations
            paragraphs.append(
                f"This is the paper's **({cap}+4)** implicit {family.display_name}, the end of its curriculum; "
                f"{family.cooldown}."
            )
            paragraphs.append(_paper_recipe(family))
        heads = (
            f", {architecture['num_attention_heads']} attention heads of dimension {architecture['head_dim']}"
            if "num_attention_heads" in architecture
            else ""
        )
        paragraphs.append(
            f"Setup (Table 3 and Appendix D.3 of the paper): {architecture['parameters']} parameters, "
            f"{architecture['num_hidden_layers']} layers, hidden size {architecture['hidden_size']}{heads}; "
            f"{architecture['training_steps']} steps on D-PILE (207B tokens) at sequence length 2048 and "
            f"{architecture['batch_size_tokens']} tokens per batch; AdamW with betas (0.9, 0.95) and weight decay 0.1, "
            f"peak learning rate {architecture['peak_learning_rate']} after a linear warm-up, held constant, then a "
            "square-root decay to 1e-5."
        )
    if base_model:
        paragraphs.append(f"Trained from [`{base_model}`](https://huggingface.co/{base_model}).")
    return "\n\n".join(paragraphs)


def _paper_results(family: _Family, preset: str | None) -> str:
    if preset is None or preset not in PAPER_RESULTS:
        return ""
    family_key, size, _ = split_preset(preset)
    intro = (
        "## Results as reported by the paper (not re-measured here)\n\n"
        f"The numbers the paper reports for this checkpoint (`{preset}`), next to the paper's other "
        f"{family.display_name} models of the same size. They are copied from the paper, not measured on the weights "
        "in this repo."
    )
    sections = [intro]
    for table, (title, description) in _TABLE_CAPTIONS.items():
        if table not in PAPER_RESULTS[preset]:
            continue
        shown = [f"{family_key}-{size}-{variant}" for variant in VARIANTS]
        shown = [name for name in shown if table in PAPER_RESULTS[name]]
        records = [PAPER_RESULTS[name][table] for name in shown]
        header = [""] + [
            f"**{_paper_label(name, table)}** (this model)" if name == preset else _paper_label(name, table)
            for name in shown
        ]
        rows = [
            [label] + [str(record.get(key, "-")) for record in records]
            for key, label in TABLE_COLUMNS[records[0]["source"]].items()
            if any(key in record for record in records)
        ]
        this = PAPER_RESULTS[preset][table]
        sections.append(
            f"### {this['source']} ({this['size']}): {title}\n\n{description}\n\n" + _markdown_table(header, rows)
        )
    return "\n\n".join(sections)
