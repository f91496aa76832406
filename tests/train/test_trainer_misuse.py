"""The Trainer misused or interrupted: Ctrl-C inside the update, a checkpoint whose two files do
not belong together, a saved state of other settings or an impossible step, schedules that
cannot be laid out."""

from __future__ import annotations

import os
import signal

import pytest
import torch

import dsv4
import dsv4.optim.muon as muon_mod
from dsv4.train import Trainer
from dsv4.train.trainer import deferred_sigint

from .test_gradients import micro_config
from .test_routing import _corpus, _state, _trainer


def _optimizer_state(tr):
    return {(i, k): v.clone() for i, p in enumerate(tr.params)
            for k, v in tr.optimizer.state.get(p, {}).items() if isinstance(v, torch.Tensor)}


def test_ctrl_c_inside_the_optimizer_step_completes_the_step_then_interrupts(monkeypatch):
    """SIGINT while Muon orthogonalises (after every momentum buffer was updated): the step is
    applied whole (weights, momenta, biases, step counter, metrics, as an uninterrupted step),
    then KeyboardInterrupt; the SIGINT handler is the previous one again."""
    a, b = _trainer(), _trainer()
    a.train_step()
    real = muon_mod.orthogonalize
    sent = []

    def orthogonalize(*args, **kw):
        if not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kw)
    monkeypatch.setattr(muon_mod, "orthogonalize", orthogonalize)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        b.train_step()
    assert sent and signal.getsignal(signal.SIGINT) is handler
    assert b.step == 1 and len(b.history) == 1
    sa, sb = _state(a), _state(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    oa, ob = _optimizer_state(a), _optimizer_state(b)
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k], ob[k]) for k in oa)
    assert b.history[0]["loss"] == a.history[0]["loss"]


def test_deferred_sigint_outside_the_main_thread_and_without_a_signal():
    import threading
    handler = signal.getsignal(signal.SIGINT)
    with deferred_sigint():
        x = 1
    assert x == 1 and signal.getsignal(signal.SIGINT) is handler
    out = []

    def run():
        with deferred_sigint():
            out.append(signal.getsignal(signal.SIGINT) is handler)
    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert out == [True]


def test_ctrl_c_inside_save_writes_the_whole_checkpoint(tmp_path, monkeypatch):
    tr = _trainer()
    tr.train_step()
    real = type(tr.model).save_pretrained

    def save_pretrained(self, out):
        real(self, out)
        os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(type(tr.model), "save_pretrained", save_pretrained)
    with pytest.raises(KeyboardInterrupt):
        tr.save(tmp_path)
    assert Trainer.read_state(tmp_path)["step"] == 1 and (tmp_path / "metrics.jsonl").is_file()


def test_a_state_saved_with_other_weights_is_refused(tmp_path):
    """model.safetensors of step 2 beside trainer_state.pt of step 1 (a save killed between
    the two files): refused, and the trainer is unchanged."""
    tr = _trainer()
    tr.train_step()
    tr.save(tmp_path)
    tr.train_step()
    tr.model.save_pretrained(tmp_path)      # the weights of the next save, not its state
    model = dsv4.Model.from_pretrained(tmp_path, dtype=torch.float32, progress=False)
    c = Trainer(model, _corpus(), tr.cfg)
    with pytest.raises(ValueError, match="was saved with other weights than this model's"):
        c.load_state(tmp_path)
    assert c.step == 0 and not c.optimizer.state and c.history == []


@pytest.mark.parametrize("changes, named", [
    (dict(weight_decay=0.0), "weight_decay 0.1 saved, 0.0 given"),
    (dict(optimizer="adamw", bias_update_speed=0.5),
     "optimizer 'muon' saved, 'adamw' given; bias_update_speed 0.001 saved, 0.5 given"),
    (dict(balance_alpha=0.0), "balance_alpha 0.0001 saved, 0.0 given"),
    (dict(anticipatory_delta=2), "anticipatory_delta 1 saved, 2 given"),
])
def test_a_state_of_other_optimizer_or_routing_settings_is_refused(tmp_path, changes, named):
    """load_state replaced the trainer's optimizer groups and routing rates with the saved ones
    while trainer.cfg still showed the caller's: refused now, naming saved and given values,
    with the trainer unchanged. The number of steps may change (a resume extends a run)."""
    import dataclasses
    a = _trainer()
    a.train_step()
    a.save(tmp_path)
    model = dsv4.Model.from_pretrained(tmp_path, dtype=torch.float32, progress=False)
    b = Trainer(model, _corpus(), dataclasses.replace(a.cfg, **changes))
    groups = [dict((k, v) for k, v in g.items() if k != "params")
              for g in b.optimizer.param_groups]
    with pytest.raises(ValueError, match="was saved by a run of other optimizer / routing "
                       "settings") as e:
        b.load_state(tmp_path)
    assert named in str(e.value)
    assert b.step == 0 and not b.optimizer.state
    assert groups == [dict((k, v) for k, v in g.items() if k != "params")
                      for g in b.optimizer.param_groups]
    assert b.routing.bias_update_speed == b.cfg.bias_update_speed
    model = dsv4.Model.from_pretrained(tmp_path, dtype=torch.float32, progress=False)
    c = Trainer(model, _corpus(), dataclasses.replace(a.cfg, steps=20))
    c.load_state(tmp_path)
    assert c.step == 1


@pytest.mark.parametrize("step", [-1, 7, 1.5, "1"])
def test_a_saved_step_outside_the_run_is_refused(tmp_path, step):
    """A negative step gave a negative learning rate; one past cfg.steps a run that never
    ends its schedule."""
    a = _trainer()                              # steps=6
    a.train_step()
    a.save(tmp_path)
    state = Trainer.read_state(tmp_path)
    state["step"] = step
    model = dsv4.Model.from_pretrained(tmp_path, dtype=torch.float32, progress=False)
    b = Trainer(model, _corpus(), a.cfg)
    with pytest.raises(ValueError, match="trainer_state.pt: its step must be an integer"):
        b.load_state(tmp_path, state)
    assert b.step == 0 and not b.optimizer.state


def test_lr_at_refuses_a_negative_step():
    from dsv4.train import TrainConfig, lr_at
    c = TrainConfig(steps=10)
    with pytest.raises(ValueError, match="step must be an integer >= 0, got -1"):
        lr_at(c, -1)
    assert lr_at(c, 0) > 0


@pytest.mark.parametrize("bad", [[[5, 2]], [[-3, -1]], [[1.7, 3.9]], [["1", "3"]],
                                 [[0, float("inf")]], "3:5", 5, [[1, 2, 3]]])
def test_anticipatory_ranges_follow_the_cli_rule(bad):
    """TrainConfig took [[5, 2]] and [[-3, -1]] (routing never on, silently), truncated floats,
    parsed strings and raised OverflowError for inf; --anticipatory refused them. One rule now
    (step_ranges)."""
    from dsv4.train.trainer import TrainConfig
    with pytest.raises(ValueError, match=r"anticipatory must be None, 'all' or a list of "
                                         r"\[start, end\) step ranges of integers"):
        TrainConfig(anticipatory=bad)
    assert TrainConfig(anticipatory=[[0, 3], (5, 9)]).anticipatory == [[0, 3], [5, 9]]


def test_warmup_never_runs_into_the_decay():
    """steps 10, warmup 9, decay from step 5: the lr fell from its peak to the final value in
    one step. An explicit warm-up past the decay's start is refused; the default one (5 % of
    the steps) stops at the decay's start."""
    from dsv4.train.trainer import TrainConfig, lr_at
    with pytest.raises(ValueError, match=r"warmup 9 exceeds the decay's start, step 5"):
        TrainConfig(steps=10, warmup=9, decay_start=0.5)
    c = TrainConfig(steps=10, warmup=5, decay_start=0.5)
    lrs = [lr_at(c, s) / c.lr for s in range(10)]
    assert lrs[:6] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0]) and all(
        a >= b for a, b in zip(lrs[4:], lrs[5:]))
    c = TrainConfig(steps=100, decay_start=0.02)
    assert c.warmup_steps == 2 and lr_at(c, 1) == lr_at(c, 2) == c.lr
    assert TrainConfig(steps=1).warmup_steps == 1


@pytest.mark.parametrize("scores, topk", [((2, 0, 8), 2), ((2, 4, 8), 0), ((0, 4, 8), 2),
                                          ((2, 4, 8), 9), ((4, 8), 2)])
def test_sequence_balance_loss_refuses_empty_or_bad_shapes(scores, topk):
    """0 tokens or topk 0 raised ZeroDivisionError, batch 0 an opaque reshape error."""
    from dsv4.train.routing import sequence_balance_loss
    with pytest.raises(ValueError, match="sequence_balance_loss: (scores|topk)"):
        sequence_balance_loss(torch.rand(scores), topk)


def test_routing_helpers_show_nan_and_refuse_a_nan_speed():
    """All-NaN scores gave a balance loss of 1.0 (taken for all-zero rows); a NaN speed made
    every bias NaN."""
    from dsv4.train.routing import bias_update, sequence_balance_loss
    assert sequence_balance_loss(torch.full((1, 3, 4), float("nan")), 2).isnan()
    zeros = torch.zeros(1, 3, 4)
    assert sequence_balance_loss(zeros, 2).item() == pytest.approx(1.0)   # all-zero: uniform
    b = torch.zeros(4)
    for speed, load in ((float("nan"), torch.arange(4.0)), (-1.0, torch.arange(4.0)),
                        (0.1, torch.arange(3.0))):
        with pytest.raises(ValueError, match="bias_update: (speed|load)"):
            bias_update(b, load, speed)
        assert torch.equal(b, torch.zeros(4))


def test_a_sequence_longer_than_the_models_positions_is_refused():
    """Windows of seq_len tokens past max_position_embeddings trained silently (dsv4 generate
    refuses such positions)."""
    from dsv4.train.trainer import TrainConfig
    torch.manual_seed(0)
    model = dsv4.Model(micro_config(max_position_embeddings=8))
    with pytest.raises(ValueError, match="seq_len 12 exceeds the model's max_position_embeddings 8"):
        Trainer(model, _corpus(), TrainConfig(steps=2, batch=2, seq_len=12))
    Trainer(model, _corpus(), TrainConfig(steps=2, batch=2, seq_len=8))
