"""The training curriculum (training/curriculum.py), the learning-rate schedule (training/schedule.py) and the
phantom-gradient memory benchmark at tiny size."""

from __future__ import annotations

import json
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_llama, tiny_mamba2
from implicit_lm.benchmarks.phantom_memory import measure
from implicit_lm.training.curriculum import (
    Curriculum,
    CurriculumCallback,
    CurriculumError,
    Phase,
    implicit_backbones,
    resolve_curriculum,
)
from implicit_lm.training.schedule import lr_multiplier, make_scheduler

import modeling_implicit as mi


def two_phases(first: int = 2, second: int = 5) -> Curriculum:
    """Two halves with distinguishable iteration caps, each running its cap exactly."""
    return Curriculum(
        (
            Phase("first", 0.5, max_iterations=first, tolerance=None, phantom_steps=1),
            Phase("second", 0.5, max_iterations=second, tolerance=None, phantom_steps=2),
        )
    )


def phase_dict(**overrides) -> dict:
    entry = dict(name="only", fraction=1.0, max_iterations=4, tolerance=0.05, phantom_steps=1)
    entry.update(overrides)
    return entry


# ---------------------------------------------------------------------------------------------------- validation


def test_empty_curriculum_is_refused():
    with pytest.raises(CurriculumError, match="at least one phase"):
        Curriculum(())


def test_fractions_must_sum_to_one():
    with pytest.raises(CurriculumError, match="sum to 1"):
        Curriculum((Phase("a", 0.5, 4, 0.05, 1), Phase("b", 0.4, 4, 0.05, 1)))
    # Within 1e-6 is accepted (decimal fractions do not add up exactly in binary).
    Curriculum((Phase("a", 0.1, 4, 0.05, 1), Phase("b", 0.2, 4, 0.05, 1), Phase("c", 0.7, 4, 0.05, 1)))


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(fraction=0), "fraction"),
        (dict(fraction=1.5), "fraction"),
        (dict(fraction=True), "fraction"),
        (dict(max_iterations=0), "max_iterations"),
        (dict(max_iterations=2.0), "max_iterations"),
        (dict(tolerance=0), "tolerance"),
        (dict(tolerance=float("inf")), "tolerance"),
        (dict(tolerance="0.05"), "tolerance"),
        (dict(phantom_steps=0), "phantom_steps"),
        (dict(backward="implicit"), "backward"),
    ],
)
def test_invalid_phase_fields_name_the_phase_and_field(overrides, field):
    with pytest.raises(CurriculumError, match=rf"Phase 'only'.*{field}"):
        Phase(**phase_dict(**overrides))


def test_phase_names_are_unique_and_non_empty():
    with pytest.raises(CurriculumError, match="unique.*'a'"):
        Curriculum((Phase("a", 0.5, 4, 0.05, 1), Phase("a", 0.5, 4, 0.05, 1)))
    with pytest.raises(CurriculumError, match="name"):
        Phase("", 1.0, 4, 0.05, 1)


def test_phases_list_becomes_a_tuple_and_must_hold_phases():
    curriculum = Curriculum([Phase("a", 1.0, 4, 0.05, 1)])
    assert isinstance(curriculum.phases, tuple)
    with pytest.raises(CurriculumError, match="Phase"):
        Curriculum((phase_dict(),))


# ---------------------------------------------------------------------------------------------------- boundaries


@pytest.mark.parametrize(
    "fractions, total, expected",
    [
        ((1.0,), 1, [0]),
        ((0.8, 0.2), 10, [0, 8]),
        ((0.8, 0.2), 100, [0, 80]),
        ((0.8, 0.2), 2, [0, 1]),  # the rounded boundary (2) would leave the free phase no step
        ((0.5, 0.5), 5, [0, 3]),  # rounded half up
        ((0.98, 0.01, 0.01), 3, [0, 1, 2]),
        ((0.98, 0.01, 0.01), 100, [0, 98, 99]),
        ((0.01, 0.01, 0.98), 10, [0, 1, 2]),  # both small phases keep a step
    ],
)
def test_boundaries(fractions, total, expected):
    curriculum = Curriculum(tuple(Phase(f"p{i}", f, 4, 0.05, 1) for i, f in enumerate(fractions)))
    starts = curriculum.boundaries(total)
    assert starts == expected
    lengths = [end - start for start, end in zip(starts, starts[1:] + [total])]
    assert min(lengths) >= 1


def test_boundaries_need_a_step_per_phase():
    curriculum = Curriculum.paper("mamba2")
    with pytest.raises(CurriculumError, match="2 phases but the run only 1"):
        curriculum.boundaries(1)
    for bad in (0, -3, 2.0, True):
        with pytest.raises(CurriculumError, match="total_steps"):
            curriculum.boundaries(bad)


def test_phase_index():
    curriculum = Curriculum.paper("llama")
    assert [curriculum.phase_index(step, 10) for step in range(10)] == [0] * 8 + [1] * 2
    assert curriculum.phase_index(10, 10) == 1  # past the end: the last phase
    assert curriculum.phase_index(25, 10) == 1
    with pytest.raises(CurriculumError, match="step"):
        curriculum.phase_index(-1, 10)


# ---------------------------------------------------------------------------------------------------- apply


def test_overrides_are_each_phases_settings():
    config = tiny_mamba2().config
    before = config.to_dict()
    curriculum = Curriculum.paper("mamba2")
    assert curriculum.overrides(0) == dict(max_iterations=4, early_stop=False, phantom_steps=1, backward="phantom")
    second = curriculum.overrides(1)
    assert (second["max_iterations"], second["tolerance"], second["phantom_steps"]) == (24, 0.05, 4)
    with pytest.raises(CurriculumError, match="out of range"):
        curriculum.overrides(2)
    resolved = config.with_overrides(curriculum.overrides(0))  # what a training forward runs with
    assert (resolved.max_iterations, resolved.early_stop, resolved.phantom_steps) == (4, False, 1)
    assert config.to_dict() == before


def test_applied_phase_runs_its_iterations(make_model):
    # Picard: the unrolled backward through Anderson's in-place history buffers fails today (solver.py).
    model = make_model(solver="picard").train()
    input_ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    curriculum = Curriculum(
        (
            Phase("bounded", 0.5, max_iterations=3, tolerance=None, phantom_steps=1),
            Phase("unrolled", 0.5, max_iterations=7, tolerance=None, phantom_steps=1, backward="unrolled"),
        )
    )
    for index, expected in ((0, 3), (1, 7)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", mi.ConvergenceWarning)
            outputs = model(input_ids=input_ids, labels=input_ids, use_cache=False,
                            solver_overrides=curriculum.overrides(index))
        assert outputs.solver_stats.iterations.tolist() == [expected, expected]
        outputs.loss.backward()


# ---------------------------------------------------------------------------------------------------- files


def test_dict_round_trip_and_fingerprint():
    curriculum = Curriculum.paper("mamba2")
    data = json.loads(json.dumps(curriculum.to_dict()))
    assert Curriculum.from_dict(data) == curriculum
    assert Curriculum.from_dict(data).fingerprint() == curriculum.fingerprint()
    assert Curriculum.paper("llama").fingerprint() != curriculum.fingerprint()
    assert Curriculum.from_dict({"phases": [phase_dict()]}).phases[0].backward == "phantom"  # optional key


@pytest.mark.parametrize(
    "data, message",
    [
        ({"phases": [phase_dict(max_iter=4)]}, r"Phase 0 \('only'\): unknown keys \['max_iter'\]"),
        ({"phases": [{k: v for k, v in phase_dict().items() if k != "tolerance"}]}, r"missing keys \['tolerance'\]"),
        ({"phases": [phase_dict()], "version": 1}, "single key 'phases'"),
        ([phase_dict()], "single key 'phases'"),
        ({"phases": phase_dict()}, "must be a list"),
        ({"phases": ["bounded"]}, "Phase 0: expected a mapping"),
        ({"phases": []}, "at least one phase"),
    ],
)
def test_from_dict_errors(data, message):
    with pytest.raises(CurriculumError, match=message):
        Curriculum.from_dict(data)


def test_load_json_and_yaml(tmp_path):
    expected = Curriculum.paper("mamba2")
    (tmp_path / "c.json").write_text(json.dumps(expected.to_dict()))
    (tmp_path / "c.yaml").write_text(
        "phases:\n"
        "  - {name: bounded, fraction: 0.8, max_iterations: 4, tolerance: null, phantom_steps: 1}\n"
        "  - name: free\n    fraction: 0.2\n    max_iterations: 24\n    tolerance: 0.05\n    phantom_steps: 4\n"
    )
    assert Curriculum.load(tmp_path / "c.json") == expected
    assert Curriculum.load(str(tmp_path / "c.yaml")) == expected

    with pytest.raises(CurriculumError, match="does not exist"):
        Curriculum.load(tmp_path / "missing.yaml")
    (tmp_path / "c.toml").write_text("")
    with pytest.raises(CurriculumError, match=r"\.json, \.yaml or \.yml"):
        Curriculum.load(tmp_path / "c.toml")
    (tmp_path / "bad.json").write_text("{phases: ")
    with pytest.raises(CurriculumError, match="not valid JSON"):
        Curriculum.load(tmp_path / "bad.json")
    (tmp_path / "bad.yml").write_text("phases: [")
    with pytest.raises(CurriculumError, match="not valid YAML"):
        Curriculum.load(tmp_path / "bad.yml")
    (tmp_path / "sum.yml").write_text("phases:\n  - {name: a, fraction: 0.5, max_iterations: 4, tolerance: 0.1, "
                                      "phantom_steps: 1}\n")
    with pytest.raises(CurriculumError, match=r"sum\.yml: Phase fractions must sum to 1"):
        Curriculum.load(tmp_path / "sum.yml")


# ---------------------------------------------------------------------------------------------------- presets


@pytest.mark.parametrize("family, free_cap", [("mamba2", 24), ("llama", 32)])
def test_paper_curriculum(family, free_cap):
    bounded, free = Curriculum.paper(family).phases
    assert (bounded.fraction, bounded.max_iterations, bounded.tolerance, bounded.phantom_steps) == (0.8, 4, None, 1)
    assert (free.fraction, free.max_iterations, free.tolerance, free.phantom_steps) == (0.2, free_cap, 0.05, 4)
    assert bounded.backward == free.backward == "phantom"
    with pytest.raises(CurriculumError, match="Unknown model family"):
        Curriculum.paper("gpt2")


def test_resolve_curriculum(tmp_path):
    config = tiny_llama().config
    for spec in (None, "none"):
        (phase,) = resolve_curriculum(spec, config).phases
        assert phase.fraction == 1
        assert phase.settings() == dict(max_iterations=60, tolerance=1e-6, early_stop=True, phantom_steps=4,
                                        backward="phantom")
    assert resolve_curriculum("paper", config) == Curriculum.paper("llama")
    assert resolve_curriculum("paper", tiny_mamba2().config) == Curriculum.paper("mamba2")
    path = tmp_path / "two.json"
    path.write_text(json.dumps(two_phases().to_dict()))
    assert resolve_curriculum(str(path), config) == two_phases()
    with pytest.raises(CurriculumError, match="neither 'none', 'paper' nor an existing"):
        resolve_curriculum(str(tmp_path / "nope.json"), config)
    with pytest.raises(CurriculumError, match="explicit"):
        resolve_curriculum("paper", tiny_mamba2(implicit=False).config)
    with pytest.raises(CurriculumError, match="'gpt2'"):
        resolve_curriculum("paper", SimpleNamespace(model_type="gpt2", implicit=True))


# ---------------------------------------------------------------------------------------------------- schedule


def test_lr_multiplier_phases():
    kwargs = dict(total_steps=100, warmup_steps=10, decay_start=80, min_ratio=0.1)
    assert lr_multiplier(0, **kwargs) == 0
    assert lr_multiplier(5, **kwargs) == pytest.approx(0.5)
    assert lr_multiplier(10, **kwargs) == lr_multiplier(79, **kwargs) == lr_multiplier(80, **kwargs) == 1
    assert lr_multiplier(85, **kwargs) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(5 / 20)))
    assert lr_multiplier(100, **kwargs) == lr_multiplier(150, **kwargs) == pytest.approx(0.1)
    decay = [lr_multiplier(step, **kwargs) for step in range(80, 101)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    # No warm-up, decay from the first step.
    assert lr_multiplier(0, total_steps=4, warmup_steps=0, decay_start=0, min_ratio=0.0) == 1
    assert lr_multiplier(1, total_steps=4, warmup_steps=0, decay_start=0, min_ratio=0.0) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(total_steps=0, warmup_steps=0, decay_start=0, min_ratio=0.1), "total_steps must be positive"),
        (dict(total_steps=10, warmup_steps=5, decay_start=4, min_ratio=0.1), "warmup_steps <= decay_start"),
        (dict(total_steps=10, warmup_steps=0, decay_start=11, min_ratio=0.1), "decay_start <= total_steps"),
        (dict(total_steps=10, warmup_steps=-1, decay_start=5, min_ratio=0.1), "0 <= warmup_steps"),
        (dict(total_steps=10, warmup_steps=0, decay_start=5.0, min_ratio=0.1), "decay_start must be an integer"),
        (dict(total_steps=10, warmup_steps=0, decay_start=5, min_ratio=1.5), "min_ratio"),
    ],
)
def test_lr_multiplier_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lr_multiplier(0, **kwargs)


def test_make_scheduler_absolute_min_lr_per_group_and_resume():
    weights = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]

    def optimizer():
        return torch.optim.SGD([{"params": [weights[0]], "lr": 1e-3}, {"params": [weights[1]], "lr": 1e-4}])

    def run(scheduler, steps):
        lrs = []
        for _ in range(steps):
            lrs.append(scheduler.get_last_lr())
            scheduler.optimizer.step()
            scheduler.step()
        return lrs

    kwargs = dict(total_steps=10, warmup_steps=2, decay_start=6, min_lr=1e-5)
    scheduler = make_scheduler(optimizer(), **kwargs)
    lrs = run(scheduler, 11)
    assert lrs[0] == [0, 0]
    assert lrs[1] == pytest.approx([5e-4, 5e-5])
    assert lrs[2] == lrs[5] == pytest.approx([1e-3, 1e-4])
    assert lrs[10] == pytest.approx([1e-5, 1e-5])  # the floor is absolute, the same for both groups
    # A scheduler restored from a state dict continues the schedule.
    first = make_scheduler(optimizer(), **kwargs)
    run(first, 7)
    resumed = make_scheduler(optimizer(), **kwargs)
    resumed.load_state_dict(first.state_dict())
    assert run(resumed, 4) == lrs[7:11]

    with pytest.raises(ValueError, match="exceeds the peak"):
        make_scheduler(optimizer(), total_steps=10, warmup_steps=0, decay_start=5, min_lr=5e-4)
    with pytest.raises(ValueError, match="decay_start <= total_steps"):
        make_scheduler(optimizer(), total_steps=10, warmup_steps=0, decay_start=20, min_lr=1e-5)


# ---------------------------------------------------------------------------------------------------- callback


class _TokenRows(torch.utils.data.Dataset):
    def __init__(self, rows: int, seq_len: int, vocab_size: int):
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, vocab_size, (rows, seq_len), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def test_callback_switches_phases_in_a_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_mamba2()
    config_before = model.config.to_dict()
    iterations_per_forward = []

    def record(module, args, output):
        if module.training:
            iterations_per_forward.append(output.solver_stats.iterations.tolist())

    model.register_forward_hook(record)
    callback = CurriculumCallback(two_phases(first=2, second=5))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_TokenRows(12, 8, 64), callbacks=[callback])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mi.ConvergenceWarning)
        trainer.train()
    assert iterations_per_forward == [[2, 2]] * 3 + [[5, 5]] * 3
    assert callback.switches == [(0, "first"), (3, "second")]
    assert callback.phase_index == 1
    assert model.base_model.training_overrides["max_iterations"] == 5
    assert model.base_model.training_overrides["phantom_steps"] == 2
    assert (model.config.max_iterations, model.config.phantom_steps) == (config_before["max_iterations"],
                                                                        config_before["phantom_steps"])


class _Wrapper(torch.nn.Module):
    """Stands in for DistributedDataParallel: the trained model under `.module`."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module


def test_callback_on_resume_and_through_wrappers():
    from transformers import TrainerControl, TrainerState

    model = tiny_llama()
    callback = CurriculumCallback(two_phases(first=2, second=5))
    state = TrainerState(global_step=4, max_steps=6)  # resumed in the second half
    callback.on_train_begin(None, state, TrainerControl(), model=_Wrapper(model))
    assert callback.switches == [(4, "second")]
    assert model.base_model.training_overrides["max_iterations"] == 5
    assert implicit_backbones(_Wrapper(model)) == [model.base_model]  # one backbone inside the LM and its wrapper
    state.global_step = 5
    callback.on_step_begin(None, state, TrainerControl(), model=_Wrapper(model))
    assert callback.switches == [(4, "second")]  # no switch inside a phase
    with pytest.raises(CurriculumError, match="no implicit model"):
        CurriculumCallback(two_phases()).on_train_begin(None, state, TrainerControl(), model=torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------------- benchmark


def test_phantom_memory_does_not_grow_with_iterations():
    results = measure(iterations=(2, 6), phantom_steps=2, batch_size=1, seq_len=8, hidden_size=32, vocab_size=64)
    for family in ("mamba2", "llama"):
        phantom = [r.saved_bytes for r in results if r.family == family and r.backward == "phantom"]
        unrolled = [r.saved_bytes for r in results if r.family == family and r.backward == "unrolled"]
        assert phantom[0] == phantom[1] > 0
        assert unrolled[1] > 2 * unrolled[0]


def test_save_round_trips_through_load(tmp_path):
    curriculum = Curriculum.paper("mamba2")
    curriculum.save(tmp_path / "curriculum.json")
    assert Curriculum.load(tmp_path / "curriculum.json") == curriculum
