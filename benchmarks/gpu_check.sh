#!/usr/bin/env bash
# The GPU figures in one call on a CUDA machine (the device tool's run, or any GPU box), and its rehearsal on a CPU:
#   bash benchmarks/build_gpu_wheels.sh                       # here, once: dist/gpu-wheels (carry it to the GPU box)
#   bash benchmarks/gpu_check.sh [--rehearse] [OUTPUT_DIR]    # default OUTPUT_DIR: $OUT if set, else outputs/benchmarks
# 1. a fresh venv over the machine's torch / triton / transformers, with this project and mamba-ssm (no CUDA
#    extensions: its Triton SSD kernels need none) installed from the wheels, and the package imported from there;
# 2. the kernel tests with the Triton kernels compiled (TRITON_INTERPRET=0) against their PyTorch references,
#    CUDA-graph decoding captured and compared with eager, dispatch on CUDA (tests/test_kernels.py on CUDA);
# 3. benchmarks.inference on CUDA: decode overhead eager and with CUDA graphs, simultaneous overhead, iterations,
#    for Mamba2 (130M shape; float32 and bfloat16) and Llama (small), a JSON file per run.
# --rehearse runs every step that needs no GPU, the same commands and flags, on the CPU: the install and import, the
# kernel tests collected (not run), the benchmarks at the tiny size with one repeat, the JSON written. CI runs it
# (tests/test_gpu_check.py), so that a GPU session cannot fail on a typo, a missing file or a wrong flag.
set -euo pipefail
cd "$(dirname "$0")/.."
rehearse=false
if [ "${1:-}" = "--rehearse" ]; then
    rehearse=true
    shift
fi
out=${1:-${OUT:-outputs/benchmarks}}
wheels=${GPU_WHEELS:-dist/gpu-wheels}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if $rehearse; then
    device=cpu size=tiny llama_size=tiny tokens=2 repeats=1 pytest_mode=(--collect-only)
    export TRITON_INTERPRET=1
    echo "rehearsal on the CPU: no GPU" | tee "$out/gpu.txt"
else
    device=cuda size=130m llama_size=small tokens=32 repeats=5 pytest_mode=()
    export TRITON_INTERPRET=0
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
fi
for wheel in implicit_lm mamba_ssm einops; do
    compgen -G "$wheels/$wheel-*.whl" > /dev/null || {
        echo "error: no $wheel wheel in $wheels: run bash benchmarks/build_gpu_wheels.sh here and carry $wheels" >&2
        exit 1
    }
done

# 1. The venv: the machine's packages, plus ours from the wheels (no network on the GPU box: --no-index).
venv=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-venv-XXXXXX")
trap 'rm -rf "$venv"' EXIT
python3 -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install -q --no-index --no-deps "$wheels"/implicit_lm-*.whl "$wheels"/mamba_ssm-*.whl \
    "$wheels"/einops-*.whl
# mamba-ssm's __init__ imports its selective-scan CUDA extension, which the SSD path never calls: an empty module
# stands for it in this venv only, so that `kernels.py` finds `mamba_chunk_scan_combined`.
site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$venv/bin/python" -c "import selective_scan_cuda" 2>/dev/null || : > "$site/selective_scan_cuda.py"
python=("$venv/bin/python")
(cd "$out" && "${python[@]}" - "$device" <<'PYTHON') | tee -a "$out/gpu.txt"
import sys
import torch, transformers, triton
import modeling_implicit
from modeling_implicit import kernels
print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)
print("modeling_implicit from", modeling_implicit.__file__)
assert "gpu-check-venv" in modeling_implicit.__file__, "the package was not imported from the installed wheel"
assert kernels.mamba_chunk_scan_combined is not None, "mamba-ssm's SSD kernels did not import"
print("kernels:", kernels.backends(sys.argv[1]))
PYTHON

# 2. The kernel tests, on CUDA when TRITON_INTERPRET=0 (run from the tree: the tests import its conftest).
"${python[@]}" -m pytest -q -p no:cacheprovider "${pytest_mode[@]}" tests/test_kernels.py 2>&1 | tee "$out/test_kernels.log"

# 3. The benchmarks.
for dtype in float32 bfloat16; do
    "${python[@]}" -m benchmarks.inference --device "$device" --size "$size" --dtype "$dtype" --new-tokens "$tokens" \
        --repeats "$repeats" --convergence-check-interval 4 --json "$out/inference-mamba2-$size-$device-$dtype.json" \
        | tee -a "$out/inference.txt"
done
"${python[@]}" -m benchmarks.inference --device "$device" --family llama --size "$llama_size" --new-tokens "$tokens" \
    --repeats "$repeats" --json "$out/inference-llama-$llama_size-$device.json" | tee -a "$out/inference.txt"
echo "gpu_check: done ($([ "$rehearse" = true ] && echo rehearsal || echo GPU)), results in $out"
