"""bench/_driver.py: the command line, table and output files of the kernel benchmarks,
exercised on CPU with stand-in families (the benchmarks themselves need the GPU)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import _driver  # noqa: E402


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Stand-in GPU")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setenv("DSV4_COMMIT", "abc1234")
    monkeypatch.setenv("OUT", str(tmp_path))
    return tmp_path


def _fam(op, t):
    return lambda quick: [dict(op=op, case="quick" if quick else "full", time_us=t, note="")]


def _boom(quick):
    raise RuntimeError("kernel missing")


def test_one_table_with_every_family(fake_gpu, capsys):
    fams = {"a": _fam("op_a", 12.345), "b": _fam("op_b", 0.1234)}
    assert _driver.run_bench("bench_x", "X.\n", fams, ("op", "case", "time_us", "note"),
                             argv=["--quick"]) == 0
    out = capsys.readouterr().out
    assert "Stand-in GPU" in out and "commit abc1234" in out
    assert "| op_a | quick | 12.3 |  |" in out and "| op_b | quick | 0.123 |  |" in out
    data = json.loads((fake_gpu / "bench_x.json").read_text())
    assert [r["op"] for r in data["rows"]] == ["op_a", "op_b"]
    assert (fake_gpu / "bench_x.md").read_text().strip() == out.strip()


def test_per_family_tables_and_only(fake_gpu, capsys):
    fams = {"a": _fam("op_a", 1.0), "b": _fam("op_b", 2.0)}
    cols = {"a": ("op", "time_us"), "b": ("op", "case")}
    assert _driver.run_bench("bench_y", "Y.\n", fams, cols, argv=["--only", "b"]) == 0
    out = capsys.readouterr().out
    assert "### b" in out and "| op_b | full |" in out and "op_a" not in out
    assert set(json.loads((fake_gpu / "bench_y.json").read_text())["rows"]) == {"b"}


def test_a_failing_family_fails_the_run_but_not_the_others(fake_gpu, capsys):
    fams = {"bad": _boom, "good": _fam("op_g", 3.0)}
    assert _driver.run_bench("bench_z", "Z.\n", fams, ("op", "time_us"), argv=[]) == 1
    out = capsys.readouterr().out
    assert "| op_g | 3 |" in out and "FAILED families: bad" in out


def test_no_rows_is_a_failure_and_unknown_family_an_error(fake_gpu):
    assert _driver.run_bench("bench_e", "E.\n", {"a": lambda quick: []}, ("op",), argv=[]) == 1
    with pytest.raises(SystemExit):
        _driver.run_bench("bench_e", "E.\n", {"a": _fam("x", 1.0), "b": _fam("y", 1.0)},
                          ("op",), argv=["--only", "c"])


def test_without_a_gpu_nothing_is_measured(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _driver.run_bench("bench_n", "N.\n", {"a": _boom}, ("op",), argv=[]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_cuda_time_us_samples_warmup_flush_and_index(monkeypatch):
    """The kernel benches' one timer (bench/_driver.cuda_time_us) on a fake clock: warm-up calls
    untimed, ``calls`` calls per sample averaged, the median of the samples, the L2 flushed
    before each sample and outside it, ``fn(k)`` with the running index."""
    clock = {"ms": 0.0}
    log = []

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self):
            self.t = clock["ms"]

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return end.t - self.t

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(_driver, "l2_flush", lambda: (log.append("flush"),
                                                      clock.__setitem__("ms", clock["ms"] + 50)))
    costs = iter([9.0, 9.0] + [1.0, 3.0] + [2.0, 2.0] + [30.0, 30.0])   # ms per call

    def fn(k):
        log.append(k)
        clock["ms"] += next(costs)

    # 2 warm-up calls, then 3 samples of 2 calls: per-call means 2, 2 and 30 ms -> median 2 ms
    assert _driver.cuda_time_us(fn, reps=3, warmup=2, calls=2, flush=True, indexed=True) == 2000
    assert log == [0, 1, "flush", 2, 3, "flush", 4, 5, "flush", 6, 7]
    n = []
    assert _driver.cuda_time_us(lambda: n.append(1), reps=4, warmup=1) == 0.0
    assert len(n) == 5


def test_write_out_json_to_out_or_the_default_dir(monkeypatch, tmp_path):
    """Standalone bench scripts' JSON: $OUT/<name>.json (the directory created), else under
    /tmp/dsv4_out; the rows read back equal."""
    rows = [{"batch": 2, "ms_step": 1.5, "note": None}]
    monkeypatch.setenv("OUT", str(tmp_path / "new"))
    path = _driver.write_out_json("bench_y", rows)
    assert path == str(tmp_path / "new" / "bench_y.json")
    assert json.loads((tmp_path / "new" / "bench_y.json").read_text()) == rows
    monkeypatch.delenv("OUT")
    made = []
    monkeypatch.setattr(os, "makedirs", lambda d, exist_ok=False: made.append(d))

    def refuse(path, *a, **kw):  # the default directory is shared: write nothing there
        raise OSError(f"not writing {path}")
    monkeypatch.setattr("builtins.open", refuse)
    with pytest.raises(OSError, match="not writing /tmp/dsv4_out/bench_y.json"):
        _driver.write_out_json("bench_y", rows)
    assert made == ["/tmp/dsv4_out"]
