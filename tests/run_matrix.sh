#!/usr/bin/env bash
# The test command (README; .ci/run calls it): the whole suite on the newest transformers, which is what a newcomer's
# pip resolves, then the model contract, generation, remote-code and pipeline tests again on the oldest transformers
# pyproject.toml declares (`transformers>=FLOOR`), in a venv of their own holding only torch, transformers, this
# package's requirements and pytest (without the bundled models' accuracy regression tests: their figures do not depend
# on the transformers version, the loading and generation tests beside them do). torch is pinned so that pip takes
# the CPU wheel instead of CUDA packages. A third leg runs our dispatch into the real mamba-ssm and causal-conv1d code,
# installed without CUDA builds in .venv-kernels/ (tests/test_kernel_libraries.py). Each leg runs its contract tests
# on every core (pytest-xdist), and the end-to-end tests (real training processes, one of them listening on
# accelerate's default port) one at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
torch_pin="torch==2.13.0"
floor_tests=(tests/test_transformers_compat.py tests/test_transformers_outputs.py tests/test_solver_overrides.py tests/test_config.py tests/test_modeling_common.py
             tests/test_modeling_mamba2.py tests/test_modeling_llama.py tests/test_remote_code.py
             tests/test_bundled_models.py)

pip install -q "$torch_pin"
pip install -q -e ".[dev]"
pip install -q --upgrade "transformers<6"
echo "== newest leg: transformers $(python -c 'import transformers; print(transformers.__version__)')"
python -m pytest -q -m "not e2e" -n auto
python -m pytest -q -m e2e

floor=$(sed -n 's/^ *"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)
[ -n "$floor" ] || { echo "pyproject.toml declares no transformers floor" >&2; exit 1; }
venv=.venv-floor
installed=$("$venv/bin/python" -c 'import transformers; print(transformers.__version__)' 2>/dev/null || true)
if [ "$installed" != "$floor" ]; then
    rm -rf "$venv"
    python -m venv "$venv"
    "$venv/bin/pip" install -q "$torch_pin"
    "$venv/bin/pip" install -q -e . "transformers==$floor" "pytest>=8" "pytest-timeout>=2.3" "pytest-xdist>=3.5"
else
    "$venv/bin/pip" install -q --no-deps -e .  # an existing venv: this checkout's current package layout
    "$venv/bin/pip" install -q "pytest-xdist>=3.5"
fi
echo "== floor leg: transformers $floor"
"$venv/bin/python" -m pytest -q -n auto "${floor_tests[@]}" -k "not recorded_accuracy"

# The kernel-libraries leg: mamba-ssm and causal-conv1d installed without their CUDA builds (the versions tested), in a
# venv over the newest leg's packages; mamba-ssm's Triton SSD kernels run in Triton's interpreter.
kernel_libraries=("mamba-ssm==2.3.2.post1" "causal-conv1d==1.7.0")
kvenv=.venv-kernels
installed_libraries=$("$kvenv/bin/pip" freeze 2>/dev/null || true)
if ! (for pin in "${kernel_libraries[@]}"; do grep -qx "$pin" <<<"$installed_libraries" || exit 1; done); then
    rm -rf "$kvenv"
    python -m venv --system-site-packages "$kvenv"
    "$kvenv/bin/pip" install -q wheel packaging ninja einops
    MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE \
        "$kvenv/bin/pip" install -q --no-build-isolation --no-deps "${kernel_libraries[@]}"
fi
echo "== kernel-libraries leg: ${kernel_libraries[*]} (no CUDA builds)"
IMPLICIT_LM_REQUIRE_KERNEL_LIBRARIES=1 "$kvenv/bin/python" -m pytest -q -n auto tests/test_kernel_libraries.py
