#!/usr/bin/env bash
# Expert parallelism on a machine with 2+ GPUs (the device tool's nvidia-h200-x2; issue 12).
# Each stage fits the device tool's 10-minute limit per command; logs go to ${OUT:-/tmp/dsv4_out}.
#
#   bash scripts/ep_check.sh build    # pip install -e . (compiles the extension)
#   bash scripts/ep_check.sh test     # CUDA tests of dsv4.distributed (NCCL, 1 and 2 GPUs)
#   bash scripts/ep_check.sh bench    # torchrun --nproc-per-node 2 bench/bench_ep.py (V4-Flash)
#   bash scripts/ep_check.sh quick    # test + bench --quick
#   bash scripts/ep_check.sh all      # build, test, bench
#   NPROC=4 bash scripts/ep_check.sh bench   # EP = 4 on the x4 kind
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/gpu_common.sh   # PY, OUT, status, step(), CUDA_HOME, the .whl/ wheels
NPROC=${NPROC:-2}
STAGE=${1:-all}
nvidia-smi topo -m > "$OUT/nvidia-smi-topo.log" 2>&1
export DSV4_EXPECT_C=1

case "$STAGE" in
  build|all)
    MAX_JOBS=${MAX_JOBS:-32} step ep_build "$PY" -m pip install --no-build-isolation --no-deps -e . \
      || exit 1 ;;
esac
case "$STAGE" in
  test|quick|all)
    step ep_pytest_cuda "$PY" -m pytest -q -m cuda -rfE tests/distributed ;;
esac
case "$STAGE" in
  bench|all)
    step ep_bench torchrun --nproc-per-node "$NPROC" bench/bench_ep.py --json "$OUT/bench_ep.json" ;;
  quick)
    step ep_bench_quick torchrun --nproc-per-node "$NPROC" bench/bench_ep.py --quick \
      --json "$OUT/bench_ep_quick.json" ;;
esac
echo "ep_check ($STAGE): $([[ $status -eq 0 ]] && echo OK || echo FAILED); logs in $OUT"
exit "$status"
