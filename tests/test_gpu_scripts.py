"""The GPU-machine harness's step filter (scripts/gpu_common.sh): ONLY=a,b runs just the
steps named, logs each to $OUT/NAME.log and remembers a failure; the others print that they
were skipped."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, tmp_path, **env) -> subprocess.CompletedProcess:
    full = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path), "CUDA_HOME": "/nonexistent", **env}
    return subprocess.run(["bash", "-c", f"source scripts/gpu_common.sh; {script}"], cwd=ROOT,
                          env=full, capture_output=True, text=True, timeout=60)


def test_only_runs_the_named_steps(tmp_path):
    r = _run('step one echo ran-one; step two echo ran-two; step three false; '
             'echo "status=$status"', tmp_path, ONLY="one, three")
    assert "ran-one" in r.stdout and "ran-two" not in r.stdout, r.stdout
    assert "=== two: skipped (not in ONLY)" in r.stdout
    assert "status=1" in r.stdout                    # the named step that failed counts
    assert "ran-one" in (tmp_path / "one.log").read_text().splitlines()   # the output line
    assert not (tmp_path / "two.log").exists()


def test_without_only_every_step_runs(tmp_path):
    r = _run('step one echo ran-one; step two echo ran-two; echo "status=$status"', tmp_path)
    assert "ran-one" in r.stdout and "ran-two" in r.stdout and "status=0" in r.stdout
