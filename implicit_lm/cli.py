"""The `implicit-lm` command: one entry point with subcommands, each the `main(argv)` of a module of the package.

    implicit-lm demo                                  # the main job on the bundled models
    implicit-lm convert --src CKPT_DIR --dst OUT_DIR  # a reference checkpoint -> Hub repo
    implicit-lm eval perplexity --model DIR --data FILE
    implicit-lm serve DIR --port 8000                 # an OpenAI-compatible server
    accelerate launch -m implicit_lm.training.finetune ...   # what `implicit-lm finetune` runs, on several processes

`implicit-lm <command> --help` shows a command's options; every command is also `python -m <its module>`.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import sys
from collections.abc import Callable
from typing import Any

# command -> module whose `main(argv)` it runs; commands with sub-commands map names to modules.
COMMANDS: dict[str, str | dict[str, str]] = {
    "demo": "implicit_lm.demo.__main__",
    "demo-random": "implicit_lm.demo.random_model",
    "convert": "implicit_lm.conversion.convert_reference",
    "import-pretrained": "implicit_lm.conversion.import_pretrained",
    "publish": "implicit_lm.conversion.publish",
    "refresh-remote-code": "implicit_lm.conversion.refresh_remote_code",
    "corpus": "implicit_lm.training.corpus",
    "serve": "implicit_lm.serve",
    "finetune": "implicit_lm.training.finetune",
    "eval": {
        "harness": "implicit_lm.eval.harness",
        "perplexity": "implicit_lm.eval.perplexity",
        "duality": "implicit_lm.eval.duality",
        "state-tracking": "implicit_lm.eval.state_tracking",
        "stories": "implicit_lm.eval.stories",
        "jacobian": "implicit_lm.eval.jacobian",
        "noise": "implicit_lm.eval.noise",
        "solver-dynamics": "implicit_lm.eval.solver_dynamics",
    },
    "experiment": {
        "state-tracking": "implicit_lm.training.state_tracking_experiment",
        "stories": "implicit_lm.training.stories_experiment",
        "language-model": "implicit_lm.training.language_model_experiment",
    },
    "benchmark": {
        "inference": "implicit_lm.benchmarks.inference",
        "phantom-memory": "implicit_lm.benchmarks.phantom_memory",
        "convert-reference-scale": "implicit_lm.benchmarks.convert_reference_scale",
    },
}


class InputError(Exception):
    """A problem with the user's input (files, data, model, options): reported as one line, without a traceback."""


def run_cli(main: Callable[[list[str] | None], Any]) -> Callable[[list[str] | None], Any]:
    """Wrap a command's `main` so input errors print `error: ...` and exit with status 2."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> Any:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        try:
            return main(argv)
        except InputError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper


def check_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    """Reject zero or negative values of integer options (None means unset)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")


def usage() -> str:
    lines = [__doc__.strip(), "", "commands:"]
    for name, target in COMMANDS.items():
        if isinstance(target, str):
            lines.append(f"  {name:<34} python -m {target.removesuffix('.__main__')}")
        else:
            lines.extend(f"  {name + ' ' + sub:<34} python -m {module}" for sub, module in target.items())
    return "\n".join(lines)


def resolve(argv: list[str]) -> tuple[str, list[str]]:
    """The module a command line names and the arguments left for its `main`; `SystemExit(2)` with the choices for
    an unknown or missing command."""
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        raise SystemExit(0)
    if not argv:
        raise SystemExit(f"usage: implicit-lm <command> ...\n\n{usage()}")
    target = COMMANDS.get(argv[0])
    if target is None:
        raise SystemExit(f"implicit-lm: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}")
    if isinstance(target, str):
        return target, argv[1:]
    if len(argv) < 2 or argv[1] not in target:
        given = f"unknown {argv[0]} command {argv[1]!r}" if len(argv) > 1 else f"{argv[0]} needs a command"
        raise SystemExit(f"implicit-lm: {given}; choose from {', '.join(target)}")
    return target[argv[1]], argv[2:]


def main(argv: list[str] | None = None) -> None:
    """Run the command; its result (what the module's `main` returns, for scripts and tests) is not the exit status."""
    module, arguments = resolve(sys.argv[1:] if argv is None else argv)
    importlib.import_module(module).main(arguments)


if __name__ == "__main__":
    main()
