"""The training loop of ``dsv4 train``: one step = forward (main + MTP), loss, backward, optimizer
step, loss-free bias update; plus evaluation, schedules and resumable state.

Step t (training.md §2.3, §3.3-§3.7, §4.1):

1. learning rate: linear warm-up, constant, cosine decay to ``final_lr_ratio``·peak over the
   last ``1 − decay_start`` of the run (the report: warm-up, constant "for most of the
   training", cosine decay near the end); MTP weight λ = 0.3, then 0.1 from the start of the
   decay;
2. anticipatory routing, when on: a gradient-free forward of step t + Δt's batch records the
   learned gates' indices (θ_t), and the indices recorded for step t are applied now;
3. ``loss = CE_main + λ·CE_MTP + α·L_bal``; backward; gradient clipping; :class:`Muon` step;
   the gate biases move by ``γ·sign(mean_load − load)``.

Everything a step depends on is a function of the step index and the saved state, so a run
resumed from a checkpoint continues bit-identically (on the same machine and thread count).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..argtypes import check_number, check_seed
from ..cache import as_int, check_count
from ..optim import Muon, param_groups
from .data import SEED_LIMIT, Corpus
from .loss import head_features, model_losses, reference_backend
from .routing import RoutingController

__all__ = ["TrainConfig", "Trainer", "lr_at", "mtp_weight_at", "deferred_sigint", "weights_digest",
           "step_ranges"]

STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainConfig:
    """Hyper-parameters of a run (defaults: the V4 values where the report gives them).

    steps: optimizer steps of the whole run (the schedules are laid out over them).
    batch, seq_len: sequences per step and tokens per sequence (each window holds seq_len + 2
        tokens: inputs, next tokens, and the MTP targets one further).
    lr: peak learning rate, shared by the Muon and AdamW groups. optimizer: "muon" | "adamw".
    weight_decay: 0.1. warmup: warm-up steps (None: 5 % of steps). decay_start: fraction of the
        run after which the cosine decay (and MTP weight mtp_weight_decay) starts.
    final_lr_ratio: lr at the end / peak (V4: 2.7e-5 / 2.7e-4 = 0.1).
    mtp_weight, mtp_weight_decay: λ before / during the decay (0.3 / 0.1). mtp: train the MTP
        block at all.
    balance_alpha: α of the sequence-wise balance loss (1e-4). bias_update_speed: γ (1e-3).
    anticipatory_delta: Δt; anticipatory: None (off), "all" (whole run) or a list of
        [start, end) step ranges in which it is on.
    grad_clip: max global gradient norm (DeepSeek-V3 used 1.0; 0 = off).
    seed: data order (and nothing else: model init is seeded by the caller); in
        [0, 2**32) (:data:`dsv4.train.data.SEED_LIMIT`).
    eval_every, eval_windows: validation cadence (steps) and number of validation windows.
    """

    steps: int = 1000
    batch: int = 8
    seq_len: int = 128
    lr: float = 2e-3
    optimizer: str = "muon"
    weight_decay: float = 0.1
    warmup: Optional[int] = None
    decay_start: float = 0.8
    final_lr_ratio: float = 0.1
    mtp: bool = True
    mtp_weight: float = 0.3
    mtp_weight_decay: float = 0.1
    balance_alpha: float = 1e-4
    bias_update_speed: float = 1e-3
    anticipatory_delta: int = 1
    anticipatory: Optional[object] = None
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 100
    eval_windows: int = 32

    def __post_init__(self) -> None:
        errs = []

        def integer(name, minimum):
            try:
                setattr(self, name, check_count(getattr(self, name), name, minimum))
            except ValueError as e:
                errs.append(str(e))

        def number(name, ok, accepted):
            try:
                check_number(getattr(self, name), name, ok, accepted)
            except ValueError as e:
                errs.append(str(e))

        for name in ("steps", "batch", "seq_len", "eval_every", "eval_windows"):
            integer(name, 1)
        integer("anticipatory_delta", 0)
        try:
            self.seed = check_seed(self.seed, SEED_LIMIT)
        except ValueError as e:
            errs.append(str(e))
        if self.warmup is not None:
            integer("warmup", 0)
        if self.optimizer not in ("muon", "adamw"):
            errs.append(f"optimizer must be 'muon' or 'adamw', got {self.optimizer!r}")
        number("lr", lambda v: v > 0, "a finite number > 0")
        number("decay_start", lambda v: 0 <= v <= 1, "in [0, 1]")
        number("final_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1] (the end of the decay / peak)")
        for name in ("weight_decay", "mtp_weight", "mtp_weight_decay", "balance_alpha",
                     "bias_update_speed", "grad_clip"):
            number(name, lambda v: v >= 0, "a finite number >= 0")
        if self.anticipatory not in (None, "all"):
            try:
                self.anticipatory = step_ranges(self.anticipatory)
            except ValueError as e:
                errs.append(str(e))
        if not errs and self.warmup is not None and self.warmup > max(1, self.decay_start_step):
            errs.append(f"warmup {self.warmup} exceeds the decay's start, step "
                        f"{self.decay_start_step} (decay_start {self.decay_start} x steps "
                        f"{self.steps}): the learning rate would fall from its peak to the "
                        "decay's value in one step")
        if errs:
            raise ValueError("invalid TrainConfig: " + "; ".join(errs))

    @property
    def warmup_steps(self) -> int:
        """``warmup``, or by default 5 % of the steps, at most up to the decay's start."""
        if self.warmup is not None:
            return int(self.warmup)
        return min(max(1, round(0.05 * self.steps)), max(1, self.decay_start_step))

    @property
    def decay_start_step(self) -> int:
        return int(self.decay_start * self.steps)

    def anticipatory_on(self, step: int) -> bool:
        """Whether anticipatory routing is on at ``step``."""
        if self.anticipatory is None:
            return False
        if self.anticipatory == "all":
            return True
        return any(a <= step < b for a, b in self.anticipatory)


def step_ranges(value) -> list[list[int]]:
    """``value`` (a sequence of ``[start, end)`` pairs) as a list of ``[start, end]`` int lists
    with ``0 <= start < end``; ValueError naming what is accepted otherwise. The rule of
    ``TrainConfig.anticipatory`` and of ``dsv4 train --anticipatory``."""
    want = ("anticipatory must be None, 'all' or a list of [start, end) step ranges of "
            "integers with 0 <= start < end")
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{want}, got {value!r}")
    out = []
    for r in value:
        try:
            a, b = (as_int(x, "anticipatory", want) for x in r)
        except (TypeError, ValueError):
            raise ValueError(f"{want}, got {value!r}") from None
        if not 0 <= a < b:
            raise ValueError(f"{want}, got the range {[a, b]}")
        out.append([a, b])
    return out


@contextlib.contextmanager
def deferred_sigint():
    """Inside, Ctrl-C (SIGINT) does not interrupt: in the main thread the signal is recorded and
    delivered to the previous handler right after the block (``KeyboardInterrupt`` with Python's
    default handler), so that the block (an optimizer step, a save) is applied whole or not at
    all. The previous handler is restored on exit, also on error. Elsewhere than in the main
    thread (where Python runs signal handlers) and where SIGINT has a handler not installed from
    Python, the block runs as is."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is None:
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            signal.raise_signal(signal.SIGINT)      # the previous handler, now


def weights_digest(model: nn.Module) -> str:
    """SHA-256 (hex) of ``model``'s parameters (names, dtypes, shapes and bytes): recorded in
    ``trainer_state.pt`` and checked on resume against the weights loaded beside it."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        t = p.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(p.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


#: The TrainConfig fields that the saved optimizer / routing state carries (Trainer.load_state
#: would replace the trainer's with them): a state of other values is refused.
_STATE_SETTINGS = ("optimizer", "weight_decay", "bias_update_speed", "balance_alpha",
                   "anticipatory_delta")


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up, constant, cosine decay.

    Raises ValueError for a step that is not an integer >= 0."""
    step = check_count(step, "step", 0)
    w = cfg.warmup_steps
    if step < w:
        return cfg.lr * (step + 1) / w
    d0 = cfg.decay_start_step
    if step < d0:
        return cfg.lr
    t = (step - d0) / max(1, cfg.steps - 1 - d0)
    r = cfg.final_lr_ratio
    return cfg.lr * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def mtp_weight_at(cfg: TrainConfig, step: int) -> float:
    """λ of the MTP loss: ``mtp_weight`` until the decay starts, then ``mtp_weight_decay``."""
    return cfg.mtp_weight if step < cfg.decay_start_step else cfg.mtp_weight_decay


class Trainer:
    """Trains ``model`` on ``corpus`` with ``cfg`` (see the module docstring).

    Args:
        model: a :class:`dsv4.Model` in fp32 or bf16 on any device (weights held as float
            parameters).
        corpus: a :class:`~dsv4.train.data.Corpus`.
        cfg: a :class:`TrainConfig`.

    Attributes: ``step`` (steps done), ``optimizer`` (:class:`dsv4.optim.Muon`), ``routing``
    (:class:`~dsv4.train.routing.RoutingController`), ``history`` (list of per-step metric
    dicts, validation entries included).

    Raises ValueError for a ``cfg.seq_len`` beyond the model's ``max_position_embeddings`` or
    a corpus too small or with ids outside the vocabulary (``Corpus.check``).
    """

    def __init__(self, model: nn.Module, corpus: Corpus, cfg: TrainConfig):
        max_pos = model.config.max_position_embeddings
        if cfg.seq_len > max_pos:      # (dsv4 generate refuses such positions likewise)
            raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's max_position_embeddings "
                             f"{max_pos}")
        self.model, self.corpus, self.cfg = model, corpus, cfg
        corpus.check(cfg.seq_len + 2, model.config.vocab_size)
        self.optimizer = Muon(param_groups(model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           optimizer=cfg.optimizer))
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.routing = RoutingController(model, cfg.bias_update_speed, cfg.balance_alpha,
                                         cfg.anticipatory_delta)
        self.step = 0
        self.history: list[dict] = []
        self._val = None

    # ------------------------------------------------------------------ forward pieces
    def _features(self, tokens: torch.Tensor, mtp: bool):
        """Head inputs of the main model and the MTP block for a [B, seq+2] block: the forward
        of :func:`~dsv4.train.loss.model_losses` without the losses (anticipatory routing
        records the routing of a future batch with it)."""
        S = tokens.shape[1] - 2
        model = self.model
        cache = model.make_cache(tokens.shape[0])
        inp, nxt = tokens[:, :S], tokens[:, 1:S + 1]
        y, hidden = model(inp, cache=cache, return_hidden=True)
        y2 = model.forward_mtp(hidden, nxt, cache) if mtp else None
        return y, y2

    @property
    def _use_mtp(self) -> bool:
        return self.cfg.mtp and len(getattr(self.model, "mtp", ())) > 0

    def batch(self, step: int) -> torch.Tensor:
        """The token block of ``step`` on the model's device."""
        c = self.cfg
        return self.corpus.batch(step, c.batch, c.seq_len + 2, c.seed).to(self.model.device)

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        """Run step ``self.step``; returns its metrics (also appended to ``history``).

        Raises FloatingPointError when the step's gradients are not finite (NaN / inf, e.g. a
        bf16 overflow), and re-raises any error of the forward / backward: the step is not
        taken then, and the weights, optimizer state, routing load and biases, the recorded
        routing of step ``self.step`` and ``self.step`` are as they were before the call. A
        Ctrl-C (SIGINT) in the main thread during the update (optimizer step, bias update, step
        counter, metrics) is deferred to its end (:func:`deferred_sigint`): the step is taken
        whole, then KeyboardInterrupt is raised."""
        c, s = self.cfg, self.step
        t0 = time.perf_counter()
        lr = lr_at(c, s)
        lam = mtp_weight_at(c, s)
        self.model.train()
        routing = self.routing
        routing.set_anticipatory(c.anticipatory_on(s))
        replay = target = None
        try:
            with reference_backend():
                if routing.anticipatory:          # record the routing of step s + Δt with θ_s
                    with torch.no_grad(), head_features(self.model), \
                            routing.recording(c.batch, c.seq_len) as rec:
                        self._features(self.batch(s + routing.anticipatory_delta),
                                       self._use_mtp)
                    target = s + routing.anticipatory_delta
                    routing.store(target, rec)
                replay = routing.take(s)          # (Δt = 0: the routing just recorded)
                tokens = self.batch(s)
                with routing.step(c.batch, c.seq_len, replay=replay):
                    main, extra = model_losses(self.model, tokens, self._use_mtp)
                    bal = routing.balance_loss().to(main.device)
                    replayed = routing.replayed_layers
                    loss = main + bal + (lam * extra if extra is not None else 0.0)
                    loss.backward()
                    with_grad = [p for p in self.params if p.grad is not None]
                    total = torch.nn.utils.get_total_norm([p.grad for p in with_grad])
                    gnorm = float(total)
                    if not math.isfinite(gnorm):     # (inside: the step's load is dropped too)
                        raise FloatingPointError(
                            f"step {s}: the gradient norm is {gnorm} (NaN / inf gradients, e.g. "
                            "a bf16 overflow or a NaN in the data path); the step was not taken")
        except BaseException:
            self.optimizer.zero_grad(set_to_none=True)
            if target is not None:
                routing.unstore(target)
            if replay is not None and target != s:
                routing.store(s, replay)
            raise
        with deferred_sigint():     # the update is applied whole: Ctrl-C waits for its end
            if c.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(with_grad, c.grad_clip, total)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            imbalance = routing.update_biases()
            learned = [v for k, v in imbalance.items() if not routing.gates[k].hash]
            self.step += 1
            dt = time.perf_counter() - t0
            m = {"step": self.step, "loss": float(main.detach()), "mtp_loss": None
                 if extra is None else float(extra.detach()), "balance_loss": float(bal.detach()),
                 "lr": lr, "mtp_weight": lam,
                 "grad_norm": gnorm, "load_max_over_mean": sum(learned) / max(1, len(learned)),
                 "anticipatory": routing.anticipatory, "replayed_gates": replayed,
                 "seconds": dt, "tokens_per_s": c.batch * c.seq_len / dt}
            self.history.append(m)
        return m

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean main (and MTP) cross-entropy over the fixed validation windows (nats)."""
        c = self.cfg
        if self._val is None:
            self._val = self.corpus.val_batches(c.eval_windows, c.batch, c.seq_len + 2)
        self.model.eval()
        tot = tot2 = 0.0
        n = 0
        with reference_backend():
            for b in self._val:
                main, extra = model_losses(self.model, b.to(self.model.device), self._use_mtp)
                tot += float(main) * b.shape[0]
                tot2 += float(extra) * b.shape[0] if extra is not None else 0.0
                n += b.shape[0]
        m = {"step": self.step, "val_loss": tot / n,
             "val_mtp_loss": tot2 / n if self._use_mtp else None}
        self.history.append(m)
        return m

    # ------------------------------------------------------------------ state
    def save(self, out: str | os.PathLike) -> None:
        """Write the model (official format: ``config.json`` + ``model.safetensors``, loadable
        by ``dsv4 generate --model OUT`` and ``Model.from_pretrained``), the optimizer / routing
        / step state (``trainer_state.pt``, written after the weights, through a temporary file,
        with the :func:`weights_digest` of the weights it belongs to) and the metrics
        (``metrics.jsonl``) into ``out``. Ctrl-C during the save is deferred to its end; a
        process killed between the two files leaves a state whose digest :meth:`load_state`
        refuses."""
        out = Path(out)
        with deferred_sigint():
            out.mkdir(parents=True, exist_ok=True)
            self.model.save_pretrained(out)
            state = {"step": self.step, "optimizer": self.optimizer.state_dict(),
                     "routing": self.routing.state_dict(), "config": dataclasses.asdict(self.cfg),
                     "weights_sha256": weights_digest(self.model)}
            tmp = out / (STATE_FILE + ".tmp")
            torch.save(state, tmp)
            os.replace(tmp, out / STATE_FILE)
            with open(out / METRICS_FILE, "w", encoding="utf-8") as f:
                for m in self.history:
                    f.write(json.dumps(m) + "\n")

    @staticmethod
    def read_state(out: str | os.PathLike) -> dict:
        """The ``trainer_state.pt`` that :meth:`save` wrote into ``out``, checked.

        Read with ``torch.load(weights_only=True)``: tensors, numbers, strings and containers
        only, so a crafted file cannot run code. Raises ValueError naming the file when it is
        missing, unreadable or lacks the keys a resume needs.
        """
        path = Path(out) / STATE_FILE
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            missing = [k for k in ("step", "optimizer", "routing", "config")
                       if not isinstance(state, dict) or k not in state]
            if missing:
                raise KeyError(f"no {', '.join(missing)}")
            int(state["step"])
        except Exception as e:      # unpickling, zip, KeyError, ...: all mean "not our file"
            raise ValueError(f"{path} is not a trainer state written by dsv4 train "
                             f"({type(e).__name__}: {str(e)[:200]})") from None
        return state

    def load_state(self, out: str | os.PathLike, state: Optional[dict] = None) -> None:
        """Restore what :meth:`save` wrote (the model weights are loaded by the caller).

        ``state``: what :meth:`read_state` already returned for ``out`` (then the file is not
        read again; it holds the optimizer state, several times the model's size).

        Raises ValueError naming the file (``trainer_state.pt`` or ``metrics.jsonl``) when it
        is unreadable or does not fit this trainer's model, when its run's optimizer / routing
        settings (optimizer, weight_decay, bias_update_speed, balance_alpha,
        anticipatory_delta) differ from ``self.cfg``'s, when its step is outside
        [0, ``cfg.steps``], or when the model's weights are not
        those the state was saved with (its ``weights_sha256``: e.g. a save killed between
        ``model.safetensors`` and ``trainer_state.pt``); the trainer is unchanged then.
        """
        out = Path(out)
        if state is None:
            state = self.read_state(out)
        saved_cfg = state["config"] if isinstance(state["config"], dict) else {}
        differ = [f"{k} {saved_cfg[k]!r} saved, {getattr(self.cfg, k)!r} given"
                  for k in _STATE_SETTINGS
                  if k in saved_cfg and saved_cfg[k] != getattr(self.cfg, k)]
        if differ:
            raise ValueError(f"{out / STATE_FILE} was saved by a run of other optimizer / "
                             f"routing settings ({'; '.join(differ)}); give this trainer the "
                             "run's TrainConfig (only steps may change on resume)")
        try:
            step = check_count(state["step"], "its step", 0)
            if step > self.cfg.steps:
                raise ValueError(f"its step must be an integer in [0, {self.cfg.steps}] (the "
                                 f"steps of this trainer's run), got {step}")
        except ValueError as e:
            raise ValueError(f"{out / STATE_FILE}: {e}") from None
        metrics = out / METRICS_FILE
        try:
            history = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()] \
                if metrics.is_file() else []
        except (ValueError, OSError) as e:
            raise ValueError(f"{metrics}: unreadable metrics ({e})") from None
        saved_opt, saved_routing = self.optimizer.state_dict(), self.routing.state_dict()
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.routing.load_state_dict(state["routing"])
            tokens = self.routing.recorded_tokens() - {self.cfg.batch * self.cfg.seq_len}
            if tokens:
                raise ValueError(f"its recorded routing covers {sorted(tokens)} tokens per step, "
                                 f"this trainer's steps {self.cfg.batch * self.cfg.seq_len} "
                                 f"(batch {self.cfg.batch} x seq_len {self.cfg.seq_len})")
        except Exception as e:
            self.optimizer.load_state_dict(saved_opt)
            self.routing.load_state_dict(saved_routing)
            raise ValueError(f"{out / STATE_FILE} does not fit this model's optimizer / routing "
                             f"({type(e).__name__}: {str(e)[:200]})") from None
        digest = state.get("weights_sha256")
        if digest is not None and digest != weights_digest(self.model):
            self.optimizer.load_state_dict(saved_opt)
            self.routing.load_state_dict(saved_routing)
            raise ValueError(f"{out / STATE_FILE} was saved with other weights than this "
                             f"model's (those of {out}/model.safetensors?): a save interrupted "
                             "between the two files, or files of two runs; resume from a "
                             "complete checkpoint")
        self.step = step
        self.history = history
