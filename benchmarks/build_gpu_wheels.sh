#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh installs on a GPU machine that has no network (the device tool's image has torch,
# triton, transformers and nvcc, but not this project or mamba-ssm), built here in one command:
#   bash benchmarks/build_gpu_wheels.sh [DIR]      (default: dist/gpu-wheels; carry it with the working tree)
# - this project (pure Python);
# - mamba-ssm without its CUDA extensions (MAMBA_SKIP_CUDA_BUILD): its Triton SSD kernels, which our dispatch calls, need
#   none; building the extensions takes far longer than a GPU session lasts;
# - einops, the one dependency of mamba-ssm's Triton path the image lacks.
# Refuses to write into a folder holding anything but wheels, and keeps the total small (they travel with the tree).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-dist/gpu-wheels}
mamba_ssm="mamba-ssm==2.3.2.post1"
einops="einops==0.8.1"
limit_mib=32
if [ -d "$dir" ] && find "$dir" -mindepth 1 ! -name '*.whl' | grep -q .; then
    echo "error: $dir holds files other than wheels; choose an empty or new folder" >&2
    exit 1
fi
mkdir -p "$dir"
staging=$(mktemp -d "$dir/.partial-XXXXXX")
trap 'rm -rf "$staging"' EXIT
python -m pip install -q wheel packaging ninja
# setuptools builds in the tree: its build/ folder is removed afterwards unless it was there before.
[ -e build ] && had_build=true || had_build=false
python -m pip wheel -q --no-deps --no-build-isolation -w "$staging" .
$had_build || rm -rf build
MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE python -m pip wheel -q --no-deps --no-build-isolation -w "$staging" "$mamba_ssm"
python -m pip download -q --no-deps --only-binary :all: -d "$staging" "$einops"
size_mib=$(du -sm "$staging" | cut -f1)
if [ "$size_mib" -gt "$limit_mib" ]; then
    echo "error: the wheels take $size_mib MiB (limit $limit_mib): they travel with the working tree" >&2
    exit 1
fi
for wheel in "$staging"/*.whl; do
    mv -f "$wheel" "$dir/"
done
ls -1 "$dir"
echo "wheels: $size_mib MiB in $dir"
