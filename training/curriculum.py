"""The training curriculum of implicit models as data: phases, each with its share of the optimizer steps and the
solver settings it trains with.

The paper ("Implicit Language Models are RNNs", App. D.3) trains in two phases: a *bounded* phase of 80% of the steps
with four tape-free solver iterations and one phantom-gradient step (the "(4 + 1)" model), then a *free* phase with up
to 24 (Mamba2) or 32 (Llama) iterations, stopping at a relative residual of 0.05, and four phantom steps. A
`Curriculum` holds such phases; a phase's settings are solver overrides (`Curriculum.overrides`), passed with every
training forward (`model(..., solver_overrides=...)`), so the model's config is never changed. Custom loops call
`phase_index` + `overrides` at every optimizer step; `transformers.Trainer` users add a `CurriculumCallback`.

A curriculum file (JSON or YAML) is the `to_dict` form:

    phases:
      - {name: bounded, fraction: 0.8, max_iterations: 4, tolerance: null, phantom_steps: 1}
      - {name: free, fraction: 0.2, max_iterations: 24, tolerance: 0.05, phantom_steps: 4, backward: phantom}

`tolerance: null` (None) states a fixed number of iterations: the phase runs exactly `max_iterations`, without early
stopping (`early_stop=False`).
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from modeling_implicit import IMPLICIT_FAMILIES, ImplicitPreTrainedConfig

logger = logging.getLogger(__name__)

# model_type of each implicit config -> the family name `Curriculum.paper` takes.
FAMILIES = IMPLICIT_FAMILIES
# The free phase's iteration cap in the paper; everything else is shared by both families.
_PAPER_FREE_ITERATIONS = {"mamba2": 24, "llama": 32}


class CurriculumError(ValueError):
    """An invalid curriculum, curriculum file or step range."""


@dataclass(frozen=True)
class Phase:
    """One phase of a curriculum.

    Args:
        name: unique within the curriculum; used in logs and checkpoints.
        fraction: share of the total optimizer steps, in (0, 1].
        max_iterations: cap on tape-free solver iterations while training (`config.max_iterations`).
        tolerance: stop tolerance of the solve while training (`config.tolerance`); None runs exactly
            `max_iterations` iterations (`early_stop=False`), as the paper's bounded phase does.
        phantom_steps: phantom-gradient steps after the solve (`config.phantom_steps`).
        backward: `"phantom"` (default) or `"unrolled"` (`config.backward`).
    """

    name: str
    fraction: float
    max_iterations: int
    tolerance: float | None
    phantom_steps: int
    backward: str = "phantom"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise CurriculumError(f"Phase name must be a non-empty string, got {self.name!r}.")
        fraction = self.fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise CurriculumError(f"Phase {self.name!r}: fraction must be a number in (0, 1], got {fraction!r}.")
        # The config's own rules, so a phase accepts exactly what a model accepts.
        try:
            ImplicitPreTrainedConfig(**self.settings())
        except ValueError as error:
            raise CurriculumError(f"Phase {self.name!r}: {error}") from None

    def settings(self) -> dict[str, Any]:
        """The solver settings of this phase, as `solver_overrides` of its training forwards."""
        stop = {"early_stop": False} if self.tolerance is None else {"tolerance": self.tolerance, "early_stop": True}
        return {"max_iterations": self.max_iterations, **stop, "phantom_steps": self.phantom_steps,
                "backward": self.backward}


_PHASE_FIELDS = tuple(field.name for field in dataclasses.fields(Phase))
_REQUIRED_PHASE_FIELDS = tuple(
    field.name for field in dataclasses.fields(Phase) if field.default is dataclasses.MISSING
)


@dataclass(frozen=True)
class Curriculum:
    """Phases run in order, each for its `fraction` of the optimizer steps (the fractions sum to 1)."""

    phases: tuple[Phase, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "phases", tuple(self.phases))
        if not self.phases:
            raise CurriculumError("A curriculum needs at least one phase.")
        for phase in self.phases:
            if not isinstance(phase, Phase):
                raise CurriculumError(f"Curriculum phases must be `Phase` objects, got {type(phase).__name__}.")
        names = [phase.name for phase in self.phases]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise CurriculumError(f"Phase names must be unique; repeated: {duplicates}.")
        total = math.fsum(phase.fraction for phase in self.phases)
        if abs(total - 1) > 1e-6:
            shares = ", ".join(f"{phase.name}={phase.fraction}" for phase in self.phases)
            raise CurriculumError(f"Phase fractions must sum to 1, got {total:.6g} ({shares}).")

    def boundaries(self, total_steps: int) -> list[int]:
        """First optimizer step (0-based) of each phase for a run of `total_steps` steps.

        Each boundary is the cumulative fraction times `total_steps`, rounded half up, then moved the least needed for
        every phase to get at least one step. Raises `CurriculumError` when `total_steps < len(phases)`.
        """
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise CurriculumError(f"total_steps must be a positive integer, got {total_steps!r}.")
        count = len(self.phases)
        if total_steps < count:
            raise CurriculumError(
                f"The curriculum has {count} phases but the run only {total_steps} optimizer steps: every phase needs "
                "at least one step."
            )
        starts = [0]
        for index in range(1, count):
            cumulative = math.fsum(phase.fraction for phase in self.phases[:index])
            start = math.floor(cumulative * total_steps + 0.5)
            # At least one step for the previous phase, and room for one step for each phase left.
            starts.append(min(max(start, starts[-1] + 1), total_steps - (count - index)))
        return starts

    def phase_index(self, step: int, total_steps: int) -> int:
        """Index of the phase optimizer step `step` (0-based) belongs to; steps past the end stay in the last phase."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise CurriculumError(f"step must be a non-negative integer, got {step!r}.")
        return bisect.bisect_right(self.boundaries(total_steps), step) - 1

    def overrides(self, index: int) -> dict[str, Any]:
        """Phase `index`'s settings, the `solver_overrides` of every training forward in that phase."""
        if not 0 <= index < len(self.phases):
            raise CurriculumError(f"Phase index {index} out of range for {len(self.phases)} phases.")
        return self.phases[index].settings()

    def describe(self, total_steps: int) -> str:
        """One line per phase: its step range in a run of `total_steps` steps and its settings, for logs."""
        starts = self.boundaries(total_steps)
        ends = starts[1:] + [total_steps]
        return "\n".join(
            f"phase {phase.name!r}: steps [{start}, {end}) {phase.settings()}"
            for phase, start, end in zip(self.phases, starts, ends)
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-serialisable form, read back by `from_dict`."""
        return {"phases": [dataclasses.asdict(phase) for phase in self.phases]}

    def save(self, path: str | os.PathLike) -> None:
        """Write the `to_dict` form as JSON, for `--curriculum FILE` (read back by `load`)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    def fingerprint(self) -> str:
        """Short hash of `to_dict()`: equal for equal curricula, for detecting a changed curriculum on resume."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: Any) -> Curriculum:
        """Build from the `to_dict` form; unknown or missing keys raise `CurriculumError`."""
        if not isinstance(data, dict) or set(data) != {"phases"}:
            found = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise CurriculumError(f"A curriculum is a mapping with the single key 'phases'; got {found}.")
        if not isinstance(data["phases"], list):
            raise CurriculumError(f"'phases' must be a list of phases, got {type(data['phases']).__name__}.")
        phases = []
        for position, entry in enumerate(data["phases"]):
            if not isinstance(entry, dict):
                raise CurriculumError(
                    f"Phase {position}: expected a mapping of {list(_PHASE_FIELDS)}, got {type(entry).__name__}."
                )
            label = f"Phase {position}" + (f" ({entry['name']!r})" if "name" in entry else "")
            unknown = sorted(set(entry) - set(_PHASE_FIELDS))
            if unknown:
                raise CurriculumError(f"{label}: unknown keys {unknown}; allowed: {list(_PHASE_FIELDS)}.")
            missing = [name for name in _REQUIRED_PHASE_FIELDS if name not in entry]
            if missing:
                raise CurriculumError(f"{label}: missing keys {missing}.")
            phases.append(Phase(**entry))
        return cls(tuple(phases))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Curriculum:
        """Read a curriculum from a `.json`, `.yaml` or `.yml` file."""
        path = Path(path)
        if not path.is_file():
            raise CurriculumError(f"Curriculum file {path} does not exist.")
        suffix = path.suffix.lower()
        if suffix not in (".json", ".yaml", ".yml"):
            raise CurriculumError(f"Curriculum file {path}: expected a .json, .yaml or .yml file.")
        text = path.read_text(encoding="utf-8")
        if suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as error:
                raise CurriculumError(f"Curriculum file {path} is not valid JSON: {error}") from None
        else:
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as error:
                raise CurriculumError(f"Curriculum file {path} is not valid YAML: {error}") from None
        try:
            return cls.from_dict(data)
        except CurriculumError as error:
            raise CurriculumError(f"Curriculum file {path}: {error}") from None

    @classmethod
    def paper(cls, family: str) -> Curriculum:
        """The paper's curriculum for `family` (`"mamba2"` or `"llama"`): bounded (4 + 1) for 80% of the steps, then
        free (24 + 4 for Mamba2, 32 + 4 for Llama) with tolerance 0.05."""
        if family not in _PAPER_FREE_ITERATIONS:
            raise CurriculumError(f"Unknown model family {family!r}; expected one of {sorted(_PAPER_FREE_ITERATIONS)}.")
        return cls(
            (
                Phase("bounded", 0.8, max_iterations=4, tolerance=None, phantom_steps=1),
                Phase("free", 0.2, max_iterations=_PAPER_FREE_ITERATIONS[family], tolerance=0.05, phantom_steps=4),
            )
        )

    @classmethod
    def single(cls, config: Any) -> Curriculum:
        """One phase holding the config's current settings: training without a curriculum."""
        return cls(
            (
                Phase(
                    "constant",
                    1.0,
                    max_iterations=config.max_iterations,
                    tolerance=config.tolerance if config.early_stop else None,
                    phantom_steps=config.phantom_steps,
                    backward=config.backward,
                ),
            )
        )


def resolve_curriculum(spec: str | os.PathLike | None, config: Any) -> Curriculum:
    """The curriculum a command-line value names: `None` or `"none"` -> `Curriculum.single(config)`, `"paper"` ->
    `Curriculum.paper` for the config's family, anything else a JSON/YAML file."""
    if spec is None or spec == "none":
        return Curriculum.single(config)
    if not getattr(config, "implicit", True):
        raise CurriculumError(
            f"Curriculum {spec!r} sets solver fields, but this model is explicit (implicit=False): it runs no solver."
        )
    if spec == "paper":
        model_type = getattr(config, "model_type", None)
        if model_type not in FAMILIES:
            raise CurriculumError(
                f"The paper's curriculum is defined for {sorted(FAMILIES)} models, not {model_type!r}."
            )
        return Curriculum.paper(FAMILIES[model_type])
    path = Path(spec)
    if not path.is_file():
        raise CurriculumError(f"Curriculum {spec!r} is neither 'none', 'paper' nor an existing .json/.yaml file.")
    return Curriculum.load(path)


def implicit_backbones(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The implicit backbones inside `model`, which may be wrapped (DDP, PEFT, `torch.compile`): found by walking the
    submodules, so no wrapper needs to be known; also remote-code ones, recognised by their config's model type."""
    return [module for module in model.modules()
            if hasattr(module, "training_overrides") and getattr(module.config, "model_type", None) in FAMILIES]


class CurriculumCallback(TrainerCallback):
    """Applies a `Curriculum` in a `transformers.Trainer` run.

    At the start of training (also when resuming) and before every optimizer step it finds the phase of
    `state.global_step` in a run of `state.max_steps` steps and, when it changed, sets its settings as the
    `training_overrides` of every implicit backbone inside the trained model: the solver overrides of its
    training-mode forwards, which `Trainer` calls without extra arguments (the config is left alone).
    `phase_index` is the phase applied last; `switches` lists `(step, phase name)` for every phase applied.

        trainer = Trainer(model, args, train_dataset=data, callbacks=[CurriculumCallback(Curriculum.paper("mamba2"))])
    """

    def __init__(self, curriculum: Curriculum):
        self.curriculum = curriculum
        self.phase_index: int | None = None
        self.switches: list[tuple[int, str]] = []

    def _update(self, state: TrainerState, model: torch.nn.Module | None) -> None:
        index = self.curriculum.phase_index(state.global_step, state.max_steps)
        if index == self.phase_index:
            return
        if model is None:
            raise CurriculumError("CurriculumCallback needs the model (the Trainer passes it to callbacks).")
        backbones = implicit_backbones(model)
        if not backbones:
            raise CurriculumError(f"CurriculumCallback found no implicit model inside {type(model).__name__}.")
        for backbone in backbones:
            backbone.training_overrides = self.curriculum.overrides(index)
        phase = self.curriculum.phases[index]
        logger.info(
            "Curriculum: step %d of %d, phase %d/%d %r: %s",
            state.global_step,
            state.max_steps,
            index + 1,
            len(self.curriculum.phases),
            phase.name,
            phase.settings(),
        )
        self.phase_index = index
        self.switches.append((state.global_step, phase.name))

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        logger.info("Curriculum over %d steps:\n%s", state.max_steps, self.curriculum.describe(state.max_steps))
        self.phase_index = None  # a new train() call (or a resume) re-applies its phase
        self._update(state, kwargs.get("model"))

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._update(state, kwargs.get("model"))
