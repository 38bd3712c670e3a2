"""Compile every Triton kernel of ours ahead of time for CUDA GPUs, on a machine without one.

    python -m benchmarks.compile_kernels [--capability 80 90] [--json FILE]

Triton's interpreter (how the CPU tests run the kernels) accepts programs its compiler rejects, so only a compile
shows that a kernel builds for a GPU. What is compiled is what the models launch: one-layer models with the shapes of
every reference preset (Mamba2 and Llama, 130M to 1.3B) and of the bundled models decode a left-padded and an unpadded
batch in float32, bfloat16 and float16 (and once with `stop_mode="abs"`), with the fused paths switched on as on a GPU.
Their launches are recorded instead of run (`JITFunction.run` is replaced), and each distinct specialization (argument
types and compile-time constants) is compiled with `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`
to PTX and a cubin (triton's wheel carries ptxas). Prints one line per compile; `--json` writes them all.

Runs with `TRITON_INTERPRET=0` (set here, before triton is imported); `tests/test_compile_kernels.py` runs it in a
subprocess and checks that every kernel of `triton_kernels.py` was launched and compiled.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"  # compile, not interpret: before triton (and our kernels) are imported

import argparse
import contextlib
import json
import multiprocessing
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from modeling_implicit import ImplicitMamba2Config, kernels, triton_kernels
from modeling_implicit.compat import output_cache

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_POINTER_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
                  torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
                  torch.bool: "i1"}


def launched_kernels() -> list[str]:
    """The kernels `triton_kernels.py` defines to be launched (its `@triton.jit` functions named `*_kernel`)."""
    return sorted(name for name, value in vars(triton_kernels).items()
                  if isinstance(value, JITFunction) and name.endswith("_kernel"))


def _scalar_type(value: Any) -> str:
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__} {value!r}")


def specialization(kernel: JITFunction, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The argument types and compile-time constants of one launch, keyed by the kernel's parameter names."""
    bound = dict(zip(kernel.arg_names, args))
    bound.update({name: value for name, value in kwargs.items() if name in kernel.arg_names})
    missing = [name for name in kernel.arg_names if name not in bound]
    if missing:
        raise TypeError(f"{kernel.__name__} launched without {missing}")
    signature: dict[str, str] = {}
    constants: dict[str, Any] = {}
    for param in kernel.params:
        value = bound[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constants[param.name] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + _POINTER_TYPES[value.dtype]
        else:
            signature[param.name] = _scalar_type(value)
    return {"kernel": kernel.__name__, "signature": signature, "constants": constants}


@contextlib.contextmanager
def recording_launches(launches: list[dict[str, Any]]) -> Iterator[None]:
    """Launches of any `@triton.jit` kernel are recorded into `launches` and not run, and the dispatch in
    `kernels.py` takes the fused implementations wherever triton has one (as on a GPU)."""
    original_run, original_fast = JITFunction.run, kernels._fast

    def record(self: JITFunction, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        launches.append(specialization(self, args, kwargs))

    JITFunction.run = record
    kernels._fast = lambda tensor, implementation: implementation is not None
    try:
        yield
    finally:
        JITFunction.run, kernels._fast = original_run, original_fast


def model_configs() -> dict[str, Any]:
    """One-layer configs with the widths of every reference preset and of every bundled model."""
    from implicit_lm.conversion.presets import PRESETS, preset_reference_config
    from implicit_lm.conversion.reference import config_from_reference

    configs = {}
    for name in sorted(PRESETS):
        if name.endswith("-implicit"):  # the explicit and pretrain presets have the same widths
            configs[name] = config_from_reference(preset_reference_config(name))
    for folder in sorted((ROOT / "models").iterdir()):
        if (folder / "config.json").is_file():
            configs[f"bundled {folder.name}"] = ImplicitMamba2Config.from_pretrained(folder)
    for config in configs.values():
        config.num_hidden_layers, config.vocab_size = 1, 64
        config.eval_max_iterations, config.early_stop = 2, False  # the launches of one step are all we need
    return configs


def record_model_launches(configs: dict[str, Any], dtypes: dict[str, torch.dtype]) -> list[dict[str, Any]]:
    """The launches of a prefill and a decode step of each config in each dtype, padded and not (and with the other
    stop mode once per config)."""
    from implicit_lm.conversion.reference import model_class

    launches: list[dict[str, Any]] = []
    tokens = torch.tensor([[5, 6, 7], [8, 9, 10]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    for config in configs.values():
        for dtype_name, dtype in dtypes.items():
            for stop_mode in ("rel", "abs") if dtype_name == "float32" else ("rel",):
                config.stop_mode = stop_mode
                torch.manual_seed(0)
                model = model_class(config)(config).to(dtype).eval()
                for attention_mask in (None, mask):
                    with torch.no_grad(), warnings.catch_warnings(), recording_launches(launches):
                        warnings.simplefilter("ignore")  # the recorded kernels leave their outputs unwritten
                        with contextlib.suppress(Exception):  # ... which may also make the solver give up
                            prefill = model(tokens[:, :2], attention_mask=None if attention_mask is None
                                            else attention_mask[:, :2], use_cache=True)
                            model(tokens[:, 2:], attention_mask=attention_mask, cache=output_cache(prefill),
                                  use_cache=True)
        config.stop_mode = "rel"
    return launches


def distinct(launches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen, unique = set(), []
    for launch in launches:
        key = json.dumps(launch, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            unique.append(launch)
    return unique


def compile_launch(launch: dict[str, Any], capability: int) -> dict[str, Any]:
    """PTX and a cubin of one recorded specialization for compute capability `capability`."""
    kernel = getattr(triton_kernels, launch["kernel"])
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(fn=kernel, signature=launch["signature"], constexprs=launch["constants"]),
                              target=GPUTarget("cuda", capability, 32))
    return {**launch, "capability": capability, "seconds": round(time.perf_counter() - start, 2),
            "ptx_bytes": len(compiled.asm["ptx"]), "cubin_bytes": len(compiled.asm["cubin"])}


def _compile_job(job: tuple[dict[str, Any], int]) -> dict[str, Any]:
    return compile_launch(*job)


def describe(result: dict[str, Any]) -> str:
    pointers = sorted({kind for kind in result["signature"].values() if kind.startswith("*")})
    constants = ", ".join(f"{name}={value}" for name, value in result["constants"].items())
    return (f"sm_{result['capability']} {result['kernel']} [{' '.join(pointers)}] {constants}: "
            f"cubin {result['cubin_bytes']} B, {result['seconds']} s")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile_kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--capability", type=int, nargs="+", default=[80, 90],
                        help="CUDA compute capabilities to compile for (default: 80 90, A100 and H100)")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=sorted(DTYPES))
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="compiling processes (default: one a core)")
    parser.add_argument("--json", type=Path, help="write every compile (kernel, types, constants, sizes) here")
    args = parser.parse_args(argv)
    from tqdm.auto import tqdm

    launches = distinct(record_model_launches(model_configs(), {name: DTYPES[name] for name in args.dtype}))
    work = [(launch, capability) for capability in args.capability for launch in launches]
    results = []
    # Compiling is single-threaded (LLVM, ptxas): one process per core. Forked, so the workers have the kernels.
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        for result in tqdm(pool.map(_compile_job, work), total=len(work), desc="compiling", unit="kernel"):
            results.append(result)
            print(describe(result), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"kernels": launched_kernels(), "compiled": results}, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
