"""Routing during training: loss-free balancing, sequence-wise balance loss, anticipatory routing.

Three mechanisms of the V4 recipe, all driven through :attr:`dsv4.layers.moe.Gate.route_hook`:

* **Auxiliary-loss-free balancing** (training.md §3.3): after every optimizer step each
  learned-routing gate moves its bias by ``γ·sign(mean_load − load_i)`` (γ = 0.001), where
  ``load_i`` counts the (token, slot) assignments of expert i over the whole step's batch with
  the indices actually applied. Not a gradient update: the bias is left out of the optimizer.
* **Sequence-wise balance loss** (§3.4): ``α·Σ_i f_i·P_i`` per sequence, averaged over the
  batch, with ``f_i = E/(K·T)·#{t: i ∈ TopK(s_t)}`` from the *unbiased* top-K of the scores
  (no gradient) and ``P_i = mean_t s_{i,t}/Σ_j s_{j,t}`` (α = 1e-4). Learned-routing layers
  only (hash layers have no selection to balance).
* **Anticipatory routing** (§3.7): at step ``t − Δt`` a gradient-free forward of the batch of
  step ``t`` records every learned gate's indices; at step ``t`` the gates apply them instead of
  their own top-K, while the routing weights come from the current scores. It can be switched
  on and off during a run; right after switching on, the first Δt steps have no recorded
  indices and route normally. With Δt = 0 the recorded indices are those the step would have
  computed itself, so training is bit-identical to normal routing.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator, Optional

import torch
from torch import nn

from ..argtypes import check_number
from ..cache import check_count
from ..layers.moe import Gate

__all__ = ["sequence_balance_loss", "bias_update", "load_imbalance", "RoutingController"]


def sequence_balance_loss(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """V3/V4 sequence-wise balance loss with α = 1: mean over sequences of ``Σ_i f_i·P_i``.

    Args:
        scores: [batch, tokens, n_experts] router scores s (sqrt-softplus, ≥ 0), with grad.
        topk: K, experts per token.

    Returns:
        0-d tensor (scores' dtype). ``f_i = E/(K·T) · #{t : i ∈ TopK(s_{:,t})}`` (unbiased
        top-K, no gradient), ``P_i = (1/T) Σ_t s_{i,t} / Σ_j s_{j,t}`` (training.md §3.4,
        DeepSeek-V3 eq. 17-20; §7.4 has a test vector). A uniform router gives 1. A token
        whose scores are all 0 (every softplus underflowed, logits below about -103 in fp32)
        counts as uniform, ``1/E`` each, with no gradient, instead of 0/0.
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 3 or not scores.is_floating_point() \
            or 0 in scores.shape:
        raise ValueError(f"sequence_balance_loss: scores must be a float tensor [batch, tokens, "
                         f"n_experts] with every size >= 1, got "
                         f"{getattr(scores, 'dtype', type(scores).__name__)} "
                         f"{tuple(getattr(scores, 'shape', ()))}")
    B, T, E = scores.shape
    topk = check_count(topk, "sequence_balance_loss: topk", 1)
    if topk > E:
        raise ValueError(f"sequence_balance_loss: topk must be in [1, {E}] (n_experts), got {topk}")
    idx = scores.detach().topk(topk, dim=-1).indices.reshape(B, -1)
    counts = torch.zeros(B, E, dtype=scores.dtype, device=scores.device)
    counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=scores.dtype))
    f = counts * (E / (topk * T))
    total = scores.sum(-1, keepdim=True)
    live = total != 0                          # (a NaN total stays NaN: NaN scores show)
    # an all-zero row becomes 1 / E: both operands replaced, so no 0/0 forward or backward
    p = (torch.where(live, scores, 1.0) / torch.where(live, total, float(E))).mean(1)
    return (f * p).sum(-1).mean()


@torch.no_grad()
def bias_update(bias: torch.Tensor, load: torch.Tensor, speed: float) -> None:
    """In place: ``bias += speed · sign(mean(load) − load)`` (training.md §3.3; §7.4 vector).

    bias, load: [n_experts]; load counts the (token, slot) assignments of the step (any dtype).
    An expert at exactly the mean load keeps its bias. Raises ValueError for a ``speed`` that
    is not a finite number >= 0 (a NaN one made every bias NaN) or a ``load`` of another shape
    than ``bias``, before changing anything.
    """
    check_number(speed, "bias_update: speed", lambda v: v >= 0, "a finite number >= 0")
    if tuple(load.shape) != tuple(bias.shape):
        raise ValueError(f"bias_update: load must have the bias's shape {tuple(bias.shape)}, got "
                         f"{tuple(load.shape)}")
    load = load.to(torch.float64)
    bias.add_(torch.sign(load.mean() - load).to(bias.dtype), alpha=speed)


def load_imbalance(load: torch.Tensor) -> float:
    """``max(load) / mean(load)`` of one layer (1 = perfectly balanced; E = one expert takes all)."""
    mean = load.double().mean()
    return float(load.double().max() / mean) if mean > 0 else 1.0


class RoutingController:
    """Owns the training-time routing of a model's MoE gates (see the module docstring).

    Args:
        model: a :class:`dsv4.Model` (any module containing :class:`Gate` modules).
        bias_update_speed: γ of the loss-free bias rule (0.001 in V4; 0 switches it off).
        balance_alpha: α of the sequence-wise balance loss (1e-4 in V4; 0 switches it off).
        anticipatory_delta: Δt of anticipatory routing (steps, ≥ 0).

    Use::

        ctl = RoutingController(model)
        with ctl.step(batch, seq, replay=ctl.take(step)):   # training forward
            loss = ... + ctl.balance_loss()
        loss.backward(); opt.step(); ctl.update_biases()
        if ctl.anticipatory:                                   # for step + Δt
            with torch.no_grad(), ctl.recording() as rec: forward(batch of step + Δt)
            ctl.store(step + Δt, rec)

    Raises:
        ValueError: a γ or α that is negative or not finite, a Δt that is not an integer >= 0,
            or a model without gates.
    """

    def __init__(self, model: nn.Module, bias_update_speed: float = 1e-3,
                 balance_alpha: float = 1e-4, anticipatory_delta: int = 1):
        speed, alpha, delta = _check_rates(bias_update_speed, balance_alpha, anticipatory_delta)
        self.gates = {name: m for name, m in model.named_modules() if isinstance(m, Gate)}
        if not self.gates:
            raise ValueError("the model has no MoE Gate modules")
        self.bias_update_speed, self.balance_alpha, self.anticipatory_delta = speed, alpha, delta
        self.anticipatory = False
        self._recorded: dict[int, dict[str, torch.Tensor]] = {}
        self._mode: Optional[str] = None        # None | "train" | "record"
        self._shape: tuple[int, int] = (0, 0)
        self._replay: Optional[dict[str, torch.Tensor]] = None
        self._record: Optional[dict[str, torch.Tensor]] = None
        self._balance_terms: list[torch.Tensor] = []
        self.load = {name: torch.zeros(g.n_experts, dtype=torch.float64)
                     for name, g in self.gates.items()}
        self.replayed_layers = 0

    # ------------------------------------------------------------------ the hook
    def _hook(self, name: str, gate: Gate, scores: torch.Tensor, indices: torch.Tensor
              ) -> torch.Tensor:
        if self._mode is None:
            return indices
        if not gate.hash and self._replay is not None and name in self._replay:
            rec = self._replay[name]
            if rec.shape != indices.shape:
                raise RuntimeError(f"anticipatory routing: recorded indices of {name} have shape "
                                   f"{tuple(rec.shape)}, this step routes {tuple(indices.shape)}")
            indices = rec.to(indices.device, indices.dtype)
            self.replayed_layers += 1
        if self._mode == "record":
            if not gate.hash:
                self._record[name] = indices.detach().to("cpu", torch.int32)
            return indices
        self.load[name] += torch.bincount(indices.flatten().cpu(),
                                          minlength=gate.n_experts).double()
        if not gate.hash and self.balance_alpha > 0 and torch.is_grad_enabled():
            B, S = self._shape
            self._balance_terms.append(sequence_balance_loss(scores.view(B, S, -1), gate.topk))
        return indices

    @contextlib.contextmanager
    def _attached(self, mode: str, shape: tuple[int, int]) -> Iterator[None]:
        for name, g in self.gates.items():
            g.route_hook = functools.partial(self._hook, name)
        self._mode, self._shape = mode, shape
        try:
            yield
        finally:
            self._mode = None
            for g in self.gates.values():
                g.route_hook = None

    # ------------------------------------------------------------------ training step
    @contextlib.contextmanager
    def step(self, batch: int, seq: int, replay: Optional[dict[str, torch.Tensor]] = None
             ) -> Iterator[None]:
        """Hooks for the forward(s) of one training step on a [batch, seq] token block.

        Every forward inside (main model and MTP) adds its load and its balance-loss terms;
        ``replay`` (from :meth:`take`) makes the learned gates apply recorded indices.
        """
        self._replay = replay
        self._balance_terms = []
        self.replayed_layers = 0
        load_before = {k: v.clone() for k, v in self.load.items()}
        try:
            with self._attached("train", (batch, seq)):
                yield
        except BaseException:       # a failed step adds no load (the bias rule never sees it)
            self.load = load_before
            self._balance_terms = []
            raise
        finally:
            self._replay = None

    def balance_loss(self) -> torch.Tensor:
        """α × the mean balance loss of the learned-routing layers run in this step (0-d)."""
        if not self._balance_terms or self.balance_alpha == 0:
            return torch.zeros(())
        return self.balance_alpha * torch.stack(self._balance_terms).mean()

    def update_biases(self) -> dict[str, float]:
        """Apply the loss-free bias rule with this step's load, then clear the load.

        Returns ``{gate name: max/mean load}`` of the step for every gate that routed tokens.
        """
        stats = {}
        for name, g in self.gates.items():
            load = self.load[name]
            if load.sum() == 0:
                continue
            stats[name] = load_imbalance(load)
            if g.bias is not None and self.bias_update_speed > 0:
                bias_update(g.bias.data, load.to(g.bias.device), self.bias_update_speed)
            load.zero_()
        return stats

    # ------------------------------------------------------------------ anticipatory routing
    def set_anticipatory(self, on: bool) -> None:
        """Switch anticipatory routing on or off (switching off drops every recorded step)."""
        self.anticipatory = bool(on)
        if not on:
            self._recorded.clear()

    @contextlib.contextmanager
    def recording(self, batch: int, seq: int) -> Iterator[dict[str, torch.Tensor]]:
        """Hooks for a gradient-free forward whose learned-gate indices are recorded (normal
        routing, no load, no loss); yields the dict ``{gate name: int32 [N, topk]}``."""
        rec: dict[str, torch.Tensor] = {}
        self._record = rec
        try:
            with self._attached("record", (batch, seq)):
                yield rec
        finally:
            self._record = None

    def store(self, step: int, recorded: dict[str, torch.Tensor]) -> None:
        """Keep ``recorded`` for training step ``step``."""
        self._recorded[int(step)] = recorded

    def take(self, step: int) -> Optional[dict[str, torch.Tensor]]:
        """The indices recorded for ``step`` (removed from the store), or None."""
        return self._recorded.pop(int(step), None) if self.anticipatory else None

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return {"anticipatory": self.anticipatory,
                "anticipatory_delta": self.anticipatory_delta,
                "recorded": {k: dict(v) for k, v in self._recorded.items()},
                "bias_update_speed": self.bias_update_speed,
                "balance_alpha": self.balance_alpha}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`. Raises ValueError, with nothing changed, for a γ / α / Δt
        outside the constructor's ranges, or recorded indices that are not this model's (a
        gate it does not have, not an integer [tokens, topk] tensor, expert ids out of range,
        different token counts between gates of one step)."""
        speed, alpha, delta = _check_rates(state["bias_update_speed"], state["balance_alpha"],
                                           state["anticipatory_delta"])
        recorded = {}
        for step, rec in state["recorded"].items():
            rec = dict(rec)
            rows = set()
            for name, idx in rec.items():
                g = self.gates.get(name)
                ok = (g is not None and not g.hash and isinstance(idx, torch.Tensor)
                      and not idx.is_floating_point() and not idx.is_complex()
                      and idx.dim() == 2 and idx.shape[1] == g.topk
                      and (idx.numel() == 0
                           or (int(idx.min()) >= 0 and int(idx.max()) < g.n_experts)))
                if not ok:
                    what = (f"a {tuple(idx.shape)} {idx.dtype} tensor"
                            if isinstance(idx, torch.Tensor) else type(idx).__name__)
                    raise ValueError(f"recorded routing of step {step} for {name!r}: expected "
                                     "integer expert ids [tokens, topk] of a learned gate of "
                                     f"this model, got {what}")
                rows.add(idx.shape[0])
            if len(rows) > 1:
                raise ValueError(f"recorded routing of step {step}: gates routed different "
                                 f"token counts {sorted(rows)}")
            recorded[int(step)] = rec
        self.anticipatory = bool(state["anticipatory"])
        self.anticipatory_delta = delta
        self._recorded = recorded
        self.bias_update_speed = speed
        self.balance_alpha = alpha

    def recorded_tokens(self) -> set[int]:
        """The token counts (batch · seq) of the recorded steps' routings."""
        return {idx.shape[0] for rec in self._recorded.values() for idx in rec.values()}

    def unstore(self, step: int) -> None:
        """Drop what :meth:`store` kept for ``step`` (a failed step's recording)."""
        self._recorded.pop(int(step), None)


def _check_rates(speed, alpha, delta) -> tuple[float, float, int]:
    """(γ, α, Δt) as (float, float, int): finite γ, α >= 0 and an integer Δt >= 0; ValueError
    naming the value otherwise."""
    def rate(v, name):
        return check_number(v, name, lambda x: x >= 0, "a finite number >= 0")
    return (rate(speed, "bias_update_speed"), rate(alpha, "balance_alpha"),
            check_count(delta, "anticipatory_delta", 0))
