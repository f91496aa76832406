#!/usr/bin/env bash
# Nsight Compute profile of one launch set per benchmark case (bench/profile_kernels.py).
#
#   bash scripts/ncu_profile.sh OUTDIR CASE...      # cases: python3 bench/profile_kernels.py --list
#
# Per case, in OUTDIR: CASE.ncu-rep (ncu --set full, only the launches between
# cudaProfilerStart/Stop; deleted with NCU_KEEP_REP=0), CASE.csv (the details page of every
# kernel), CASE.raw.csv (every collected metric), CASE.txt (SpeedOfLight, Occupancy,
# WarpStateStats details + the stall reasons per issued instruction) and CASE.log (the run).
# A case that fails or passes the per-case timeout (NCU_TIMEOUT, 90 s) is reported and skipped;
# the exit status is 1 if any case failed.
# Env: PY (python, default python3), NCU (default ncu), NCU_ARGS (extra profile options, e.g.
# "--clock-control none"), DSV4_SPARSE_PREFILL=new (the warp-specialised prefill kernel),
# DSV4_GEMM_TILE / DSV4_GEMM_PIPE (a forced grouped-GEMM variant).
set -uo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: bash scripts/ncu_profile.sh OUTDIR CASE..." >&2
  exit 2
fi
mkdir -p "$1" && OUTDIR=$(cd "$1" && pwd)
shift
PY=${PY:-python3}
NCU=${NCU:-ncu}
cd "$(dirname "$0")/.."
status=0
stalls='regex:smsp__average_warps?_(latency_)?issue_stalled_.*_per_issue_active\.ratio'

for c in "$@"; do
  rep="$OUTDIR/$c"
  echo "=== $c"
  rm -f "$rep.ncu-rep"
  # shellcheck disable=SC2086  # NCU_ARGS is a list of options
  timeout "${NCU_TIMEOUT:-90}" "$NCU" --profile-from-start off --set full -f -o "$rep" \
    ${NCU_ARGS:-} "$PY" bench/profile_kernels.py "$c" > "$rep.log" 2>&1
  rc=$?
  tail -n 3 "$rep.log"
  if [[ $rc -ne 0 || ! -s "$rep.ncu-rep" ]]; then
    echo "=== $c: FAILED (exit $rc$([[ $rc -eq 124 ]] && echo ', timeout'); log $rep.log)"
    status=1
    continue
  fi
  "$NCU" --import "$rep.ncu-rep" --page details --csv > "$rep.csv"
  "$NCU" --import "$rep.ncu-rep" --page raw --csv > "$rep.raw.csv"
  {
    sections=(--section SpeedOfLight --section Occupancy --section WarpStateStats)
    "$NCU" --import "$rep.ncu-rep" --page details "${sections[@]}" --print-details all \
      2>/dev/null || "$NCU" --import "$rep.ncu-rep" --page details "${sections[@]}"
    echo "--- stall reasons (warps per issued instruction)"
    "$NCU" --import "$rep.ncu-rep" --page raw --csv --metrics "$stalls" || true
  } > "$rep.txt" 2>&1
  [[ ${NCU_KEEP_REP:-1} == 0 ]] && rm -f "$rep.ncu-rep"
  echo "=== $c: ok ($rep.txt)"
done
exit $status
