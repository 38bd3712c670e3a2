#!/usr/bin/env bash
# The GPU figures of issue 8 in one call on a CUDA machine (the device tool's run, or any GPU box):
#   bash benchmarks/gpu_check.sh [OUTPUT_DIR]      (default: $OUT if set, else outputs/benchmarks)
# 1. the Triton kernels compiled (TRITON_INTERPRET=0) against their PyTorch references, CUDA-graph decoding captured
#    and compared with eager, dispatch on CUDA (tests/test_kernels.py with DEVICE=cuda);
# 2. benchmarks.inference on CUDA: decode overhead eager and with CUDA graphs, simultaneous overhead, iterations,
#    for Mamba2 (130M shape; float32 and bfloat16) and Llama (small), JSON per run.
# mamba-ssm and causal-conv1d are used when importable (the report's "kernels" line says which paths ran).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-outputs/benchmarks}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" \
  | tee -a "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tee "$out/test_kernels.log"
for dtype in float32 bfloat16; do
  python3 -m benchmarks.inference --device cuda --size 130m --dtype "$dtype" --new-tokens 32 --repeats 5 \
    --convergence-check-interval 4 --json "$out/inference-mamba2-130m-cuda-$dtype.json" | tee -a "$out/inference.txt"
done
python3 -m benchmarks.inference --device cuda --family llama --size small --new-tokens 32 --repeats 5 \
  --json "$out/inference-llama-small-cuda.json" | tee -a "$out/inference.txt"
