#!/usr/bin/env bash
# Install dsv4 with its CUDA extension against torch 2.14.1 and run the test suite.
# This is the README's test command; CI (.ci/run) calls it too. Extra arguments go to pytest.
#   scripts/test.sh                      # everything (GPU tests skip without a GPU)
#   DSV4_SKIP_CUDA_BUILD=1 scripts/test.sh   # pure-Python install, reference ops only
#   DSV4_REBUILD=1 scripts/test.sh       # reinstall even if nothing changed
#
# The install (and the extension build, 2-4 minutes from scratch) runs only when something it
# depends on changed since the last successful one: a file under csrc/, setup.py,
# pyproject.toml, or the build environment (python, torch, CUDA_HOME, TORCH_CUDA_ARCH_LIST,
# DSV4_SKIP_CUDA_BUILD) -- setup.py's source_digest(), kept in build/dsv4-install.digest.
# When it runs, each compile step is shown as it starts; the full log is build/install.log.
# Object files persist in build/, so a rebuild recompiles only the changed sources.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python}
ROOT=$(pwd)

if ! "$PY" -c 'import sys, torch, setuptools, wheel
sys.exit(torch.__version__.split("+")[0] != "2.14.1"
         or int(setuptools.__version__.split(".")[0]) < 64)' 2>/dev/null; then
  "$PY" -m pip install torch==2.14.1 "setuptools>=64" wheel
fi
# ninja: parallel, incremental compiles (and the [n/N] progress lines below)
command -v ninja >/dev/null || "$PY" -m pip install ninja
if [[ -z "${CUDA_HOME:-}" ]]; then  # the nvcc on PATH may be a wrapper: find the real toolkit
  CUDA_HOME=$("$PY" -c 'import setup; print(setup.find_cuda_home() or "")')
  [[ -n "$CUDA_HOME" ]] && export CUDA_HOME
fi

mkdir -p build
digest_file=build/dsv4-install.digest
digest=$("$PY" -c 'import setup; print(setup.source_digest())')
# Up to date: same digest as the last install, dsv4 imports from this checkout, the extension
# is there when a CUDA build is expected, and the test dependencies are installed.
installed() {
  [[ -f "$digest_file" && "$(cat "$digest_file")" == "$digest" ]] || return 1
  (cd /tmp && "$PY" - "$ROOT" <<'EOF'
import os, sys
import pytest, hypothesis  # noqa: F401  (the [test] extra)
import dsv4
root = os.path.realpath(sys.argv[1])
assert os.path.realpath(dsv4.__file__).startswith(os.path.join(root, "python", "dsv4") + os.sep)
if os.environ.get("DSV4_SKIP_CUDA_BUILD", "0") != "1":
    import dsv4._C  # noqa: F401
EOF
  ) >/dev/null 2>&1
}

# Print one short line per compile/link step of the (verbose) pip output.
progress() {
  awk '
    /^[[:space:]]*\[[0-9]+\/[0-9]+\]/ {
      src = ""
      for (i = 2; i <= NF; i++) if ($i ~ /\.(cu|cpp|cc|c)$/ && $(i - 1) == "-c") { src = $i }
      sub(".*/csrc/", "csrc/", src)
      print "  " $1 " " (src != "" ? "compiling " src : "building")
      fflush(); next
    }
    /-shared / { print "  linking dsv4/_C"; fflush(); next }
    /^[[:space:]]*(dsv4 setup:|Successfully installed)|[Ee]rror:/ { sub(/^[[:space:]]+/, ""); print "  " $0; fflush() }
  '
}

if [[ "${DSV4_REBUILD:-0}" != "1" ]] && installed; then
  echo "dsv4: install up to date (nothing under csrc/, setup.py, pyproject.toml or the build" \
       "environment changed since the last build); skipping pip install"
else
  echo "dsv4: installing (editable) and compiling the extension; full log: build/install.log"
  rm -f "$digest_file"
  set +e
  "$PY" -m pip install -v --no-build-isolation -e ".[test]" 2>&1 | tee build/install.log | progress
  rc=${PIPESTATUS[0]}
  set -e
  if (( rc != 0 )); then
    echo "dsv4: pip install failed (exit $rc); the end of build/install.log:" >&2
    tail -n 40 build/install.log >&2
    exit "$rc"
  fi
  echo "$digest" > "$digest_file"
fi

# A CUDA build must produce an importable dsv4._C with its kernels (tests/test_build.py).
if [[ "${DSV4_SKIP_CUDA_BUILD:-0}" != "1" ]]; then
  export DSV4_EXPECT_C=${DSV4_EXPECT_C:-1}
fi
"$PY" -m pytest -q "$@"
