"""Robustness to analog noise: a state-tracking model's accuracy and solver iterations against the signal-to-noise
ratio of the noise study (the markschoene/implicit_languagemodels fork), at small scale.

    implicit-lm eval noise --model models/implicit-mamba2-a5 --snr-db 40,30,20,10,5 --output-dir outputs/noise

Each setting adds Gaussian noise at the same SNR to every mixer input at every solver iteration (latent noise) and to
the committed states once per token (state noise), in sequential mode (see `ImplicitMamba2Config`), additive and
multiplicative, next to the noise-free model. The noise is drawn from torch's default generator, seeded per setting
by `--seed`, so a run repeats exactly. Writes `noise.json` and `noise.png` (accuracy and iterations per token vs SNR).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

import torch
from implicit_lm.eval.arguments import add_model_arguments
from implicit_lm.eval.plots import new_figure, save_figure
from implicit_lm.eval.state_tracking import length_generalization
from tqdm.auto import tqdm

from implicit_lm.cli import InputError, run_cli
from implicit_lm.files import write_json
from implicit_lm.models import load_model, model_fields
from implicit_lm.provenance import run_metadata
from implicit_lm.tasks.word_problems import GROUPS
from modeling_implicit.configuration_implicit_mamba2 import NOISE_MODES


def noise_sweep(
    model: torch.nn.Module, group: str, length: int, num_samples: int, snr_db: list[float], modes: list[str],
    seed: int,
) -> list[dict[str, Any]]:
    """One row per (noise mode, SNR in dB) plus the noise-free row (`snr_db` None): sequential-mode per-token,
    sequence and final-position accuracy and iterations per token, on the same fresh problems for every setting."""
    settings = [(None, None)] + [(mode, db) for mode in modes for db in snr_db]
    rows = []
    for mode, db in tqdm(settings, desc="noise settings", unit="setting", disable=None):
        overrides = {"latent_noise_db": 0.0, "state_noise_db": 0.0}
        if mode is not None:
            overrides = {"latent_noise_db": db, "state_noise_db": db, "noise_mode": mode}
        torch.manual_seed(seed)
        with model_fields(model, **overrides), warnings.catch_warnings():
            # Fresh noise at every iteration leaves no exact fixed point: non-convergence is part of the measurement.
            warnings.simplefilter("ignore")
            (row,) = length_generalization(model, group, [length], num_samples, seed=seed, modes=("sequential",))
        rows.append({"noise_mode": mode, "snr_db": db, **row})
    return rows


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    clean = next(row for row in rows if row["snr_db"] is None)
    figure, axes = new_figure(columns=2)
    for mode in NOISE_MODES:
        points = sorted((row["snr_db"], row) for row in rows if row["noise_mode"] == mode)
        if not points:
            continue
        snr = [db for db, _ in points]
        axes[0][0].plot(snr, [row["accuracy"] for _, row in points], marker="o", label=mode)
        axes[0][1].plot(snr, [row["iterations_mean"] for _, row in points], marker="o", label=mode)
    for axis, key, label in ((axes[0][0], "accuracy", "per-token accuracy"),
                             (axes[0][1], "iterations_mean", "solver iterations per token")):
        axis.axhline(clean[key], color="gray", linestyle="--", label="no noise")
        axis.set_xlabel("SNR (dB)")
        axis.set_ylabel(label)
        axis.legend()
    axes[0][0].set_title(title)
    save_figure(figure, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="implicit-lm eval noise", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser, solver_flags=False)
    parser.add_argument("--group", default="A5", choices=GROUPS, help="word problems of this group")
    parser.add_argument("--length", type=int, default=64, help="problem length (tokens)")
    parser.add_argument("--samples", type=int, default=64, help="fresh problems per setting")
    parser.add_argument("--snr-db", default="40,30,20,10,5", help="comma-separated SNRs in dB (each > 0)")
    parser.add_argument("--modes", default=",".join(NOISE_MODES), help="comma-separated noise modes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/noise"))
    return parser.parse_args(argv)


@run_cli
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    try:
        snr_db = [float(part) for part in args.snr_db.split(",")]
    except ValueError as error:
        raise InputError(f"--snr-db must be comma-separated numbers, got {args.snr_db!r}") from error
    modes = args.modes.split(",")
    if min(snr_db) <= 0:
        raise InputError(f"--snr-db values must be > 0 (0 dB means no noise), got {args.snr_db}")
    if set(modes) - set(NOISE_MODES):
        raise InputError(f"--modes must be among {NOISE_MODES}, got {args.modes!r}")
    if args.length < 2 or args.samples < 1:
        raise InputError("--length must be >= 2 (the first token takes no noisy step) and --samples positive")
    model, _ = load_model(args.model, dtype=args.dtype, device=args.device)
    if not hasattr(model.config, "noise_mode"):
        raise InputError(f"{args.model} is a {model.config.model_type!r} model: the noise study is for Mamba2 models")
    rows = noise_sweep(model, args.group, args.length, args.samples, snr_db, modes, args.seed)
    payload = {"results": rows, "metadata": run_metadata(args, model)}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_json(args.output_dir / "noise.json", payload)
    plot(rows, args.output_dir / "noise.png", f"{Path(args.model).name}: {args.group}, length {args.length}")
    print("| noise | SNR (dB) | accuracy | final accuracy | iterations per token | converged |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        label = row["noise_mode"] or "none"
        snr = "-" if row["snr_db"] is None else f"{row['snr_db']:g}"
        print(f"| {label} | {snr} | {row['accuracy']:.3f} | {row['final_accuracy']:.3f} | "
              f"{row['iterations_mean']:.1f} | {row['converged_fraction']:.2f} |")
    print(f"wrote {args.output_dir / 'noise.json'} and {args.output_dir / 'noise.png'}")
    return payload


if __name__ == "__main__":
    main()
