#!/usr/bin/env bash
# Install dsv4 with its CUDA extension against torch 2.14.1 and run the test suite.
# This is the README's test command; CI (.ci/run) calls it too. Extra arguments go to pytest.
#   scripts/test.sh                      # everything (GPU tests skip without a GPU)
#   DSV4_SKIP_CUDA_BUILD=1 scripts/test.sh   # pure-Python install, reference ops only
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python}

"$PY" -m pip install torch==2.14.1 "setuptools>=64" wheel
if [[ -z "${CUDA_HOME:-}" ]]; then  # the nvcc on PATH may be a wrapper: find the real toolkit
  CUDA_HOME=$("$PY" -c 'import setup; print(setup.find_cuda_home() or "")')
  [[ -n "$CUDA_HOME" ]] && export CUDA_HOME
fi
"$PY" -m pip install --no-build-isolation -e ".[test]"

# A CUDA build must produce an importable dsv4._C with its kernels (tests/test_build.py).
if [[ "${DSV4_SKIP_CUDA_BUILD:-0}" != "1" ]]; then
  export DSV4_EXPECT_C=${DSV4_EXPECT_C:-1}
fi
"$PY" -m pytest -q "$@"
