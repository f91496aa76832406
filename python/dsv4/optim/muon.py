"""DeepSeek-V4's Muon: hybrid Newton-Schulz orthogonalisation with AdamW for the rest.

Algorithm (training.md §2.3, the report's Algorithm 1), for each logically independent matrix
``W`` [n, m] of a Muon group, with gradient ``G``::

    M   = μ·M + G                                   # plain (non-EMA) momentum, μ = 0.95
    U   = μ·M + G  (Nesterov)  or  M
    O   = NS(U / (‖U‖_F + eps)) · sqrt(max(n, m)) · γ     # update RMS γ = 0.18
    W   = W·(1 − η·λ) − η·O                          # decoupled weight decay λ = 0.1

``NS`` runs the hybrid schedule: 8 iterations of ``X ← aX + b(XXᵀ)X + c(XXᵀ)²X`` with
(3.4445, −4.7750, 2.0315), then 2 with (2, −1.5, 0.5), in bfloat16 matmuls (§2.3, §3.4.1). The
other groups (embedding, head, RMSNorm weights, mHC static biases and gating factors, attention
sinks, compressor position biases) take AdamW (β 0.9/0.95, ε 1e-20, λ 0.1; §2.3), with the same
learning rate η.

Parameters held in bf16/fp16 keep an fp32 master copy in the optimizer state (the report trains
with fp32 master weights, training.md §5.3); the low-precision parameter is rewritten from it
after every step.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch import nn

from ..argtypes import check_number

__all__ = [
    "KELLER_COEFFS", "FINAL_COEFFS", "HYBRID_SCHEDULE", "KELLER_SCHEDULE",
    "newton_schulz", "orthogonalize", "Muon", "param_groups",
]

KELLER_COEFFS = (3.4445, -4.7750, 2.0315)
"""Keller Jordan's quintic (a, b, c): steep at 0, does not converge to 1 (training.md §2.1)."""
FINAL_COEFFS = (2.0, -1.5, 0.5)
"""``2x − 1.5x³ + 0.5x⁵``: f(1) = 1, f'(1) = 0, pins the singular values at 1 (§2.3)."""
HYBRID_SCHEDULE = (KELLER_COEFFS,) * 8 + (FINAL_COEFFS,) * 2
"""DeepSeek-V4's 8 + 2 schedule (training.md §2.3, report eq. 28)."""
KELLER_SCHEDULE = (KELLER_COEFFS,) * 5
"""The 5-step schedule of Keller's Muon and ``torch.optim.Muon``."""


def _check_schedule(schedule) -> tuple[tuple[float, float, float], ...]:
    try:
        out = tuple((float(a), float(b), float(c)) for a, b, c in schedule)
    except (TypeError, ValueError):
        raise ValueError("ns_schedule must be a sequence of (a, b, c) coefficient triples, got "
                         f"{schedule!r}") from None
    if not out:
        raise ValueError("ns_schedule must hold at least one (a, b, c) triple")
    if not all(math.isfinite(v) for t in out for v in t):
        raise ValueError(f"ns_schedule must be finite (a, b, c) triples, got {schedule!r}")
    return out


_NS_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def _check_group(group: dict, where: str) -> dict:
    """Check (and normalise in place) the hyper-parameters of a Muon / AdamW group; ValueError
    naming ``where`` and the key otherwise. Returns ``group``."""
    def number(key, ok, accepted):
        check_number(group[key], f"{where}: {key}", ok, accepted)

    number("lr", lambda v: v >= 0, "a finite number >= 0")
    number("weight_decay", lambda v: v >= 0, "a finite number >= 0")
    number("momentum", lambda v: 0 <= v < 1, "in [0, 1)")
    number("update_rms", lambda v: v > 0, "a finite number > 0")
    # eps is added in fp32 (the moments), ns_eps in ns_dtype: a value that rounds to 0 there is
    # 0, which turns a zero gradient into 0 / 0 = NaN
    number("eps", lambda v: v > 0 and _nonzero_in(v, torch.float32),
           "a finite number > 0 that float32 holds as nonzero (0 turns a zero gradient into NaN)")
    if not isinstance(group["ns_dtype"], torch.dtype) or group["ns_dtype"] not in _NS_DTYPES:
        raise ValueError(f"{where}: ns_dtype must be one of torch.bfloat16, float16, float32, "
                         f"float64, got {group['ns_dtype']!r}")
    number("ns_eps", lambda v: v > 0 and _nonzero_in(v, group["ns_dtype"]),
           f"a finite number > 0 that {group['ns_dtype']} holds as nonzero (0 turns a zero "
           "gradient into NaN)")
    b = group["betas"]
    try:
        b = tuple(float(x) for x in b)
    except (TypeError, ValueError):
        b = ()
    if len(b) != 2 or not all(0 <= x < 1 for x in b):
        raise ValueError(f"{where}: betas must be two numbers in [0, 1), got {group['betas']!r}")
    group["betas"] = b
    try:
        group["ns_schedule"] = _check_schedule(group["ns_schedule"])
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    rb = group["row_blocks"]
    if isinstance(rb, bool) or not isinstance(rb, int) or rb < 1:
        raise ValueError(f"{where}: row_blocks must be an integer >= 1, got {rb!r}")
    for key in ("use_muon", "nesterov"):
        if not isinstance(group[key], bool):
            raise ValueError(f"{where}: {key} must be a bool, got {group[key]!r}")
    bad = next((p for p in group.get("params", ()) if isinstance(p, torch.Tensor)
                and not p.is_floating_point()), None)
    if bad is not None:
        raise ValueError(f"{where}: parameters must be real floating tensors, got a "
                         f"{bad.dtype} parameter of shape {tuple(bad.shape)}")
    return group


def _nonzero_in(v: float, dtype: torch.dtype) -> bool:
    return bool(torch.tensor(v, dtype=torch.float64).to(dtype) != 0)


def newton_schulz(x: torch.Tensor, schedule: Sequence[tuple[float, float, float]]
                  ) -> torch.Tensor:
    """Apply the quintic iterations ``X ← aX + b(XXᵀ)X + c(XXᵀ)²X`` of ``schedule`` to x.

    x: [..., n, m] (a batch of matrices), any float dtype; the arithmetic runs in x.dtype and
    the result has x's shape and dtype. No normalisation is done here (see
    :func:`orthogonalize`): each singular value s of x is mapped through the composed scalar
    polynomial (training.md §7.3 tabulates it). Tall matrices are transposed so that the Gram
    matrix is the small one (the iteration is transpose-equivariant).
    """
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    batch = x.shape[:-2]
    x = x.reshape(math.prod(batch), *x.shape[-2:])     # (not -1: a [0, m] matrix has no size)
    for a, b, c in _check_schedule(schedule):
        gram = torch.bmm(x, x.mT)
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    x = x.reshape(*batch, *x.shape[-2:])
    return x.mT if tall else x


def orthogonalize(g: torch.Tensor, schedule: Sequence[tuple[float, float, float]] = HYBRID_SCHEDULE,
                  eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``NS(g / (‖g‖_F + eps))`` per matrix: ≈ U Vᵀ of ``g = U S Vᵀ`` (training.md §2.3).

    Args:
        g: [..., n, m] float tensor; every trailing [n, m] matrix is cast to ``dtype``,
            normalised by its own Frobenius norm (in ``dtype``, as Keller's Muon and
            ``torch.optim.Muon`` do) and orthogonalised independently.
        schedule: (a, b, c) per iteration (:data:`HYBRID_SCHEDULE` by default).
        eps: added to the Frobenius norm (Keller's 1e-7; the report gives none).
        dtype: the precision of the iterations (bfloat16 as in V4; float32/float64 for tests).

    Returns:
        fp32 (fp64 for fp64 input) tensor of g's shape.

    Raises:
        ValueError: g has fewer than 2 dims or the schedule is malformed.
    """
    if g.dim() < 2:
        raise ValueError(f"orthogonalize: need a matrix [..., n, m], got shape {tuple(g.shape)}")
    acc = torch.float64 if g.dtype == torch.float64 else torch.float32
    x = g.to(dtype)
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)
    return newton_schulz(x, schedule).to(acc)


class Muon(torch.optim.Optimizer):
    """V4's optimizer: Muon (hybrid Newton-Schulz) groups plus AdamW groups (training.md §2.3).

    Build it from :func:`param_groups`, which partitions a :class:`dsv4.Model` the way the
    report does; any group dict may also be given by hand. Group keys (defaults in brackets):

    * ``use_muon`` [True]: Muon update (matrices) or AdamW update (anything).
    * common: ``lr`` [1e-3], ``weight_decay`` [0.1] (decoupled: ``W ← W·(1 − lr·wd)``).
    * Muon: ``momentum`` [0.95], ``nesterov`` [True], ``update_rms`` [0.18] (γ),
      ``ns_schedule`` [:data:`HYBRID_SCHEDULE`], ``ns_eps`` [1e-7], ``ns_dtype``
      [torch.bfloat16], ``row_blocks`` [1]: a 2-D weight [r·k, c] is ``k = row_blocks``
      independent matrices [r, c] stacked along rows (the grouped output projection ``wo_a``);
      a 3-D weight [E, r, c] is E independent matrices (stacked experts).
    * AdamW: ``betas`` [(0.9, 0.95)], ``eps`` [1e-20].

    Matrices of equal shape are orthogonalised together in one batched iteration (the report
    merges same-shape matrices, §2.4). Parameters without a gradient are skipped (their state
    is left as it is). Non-fp32 parameters get an fp32 master copy (state ``"master"``).

    Raises:
        ValueError: a bad hyper-parameter, in the constructor's defaults or in any group
            (lr, weight_decay finite >= 0; momentum, betas in [0, 1); update_rms, eps, ns_eps
            finite > 0, eps nonzero in float32 and ns_eps in ns_dtype; ns_dtype bfloat16,
            float16, float32 or float64; finite ns_schedule coefficients; row_blocks an int
            >= 1), a parameter that is not a real floating tensor, or (at ``step``, before
            anything is updated) a Muon parameter that is not a [rows, cols] / [E, rows, cols]
            matrix, or whose rows do not split into ``row_blocks``. Empty matrices are fine.
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1,
                 momentum: float = 0.95, nesterov: bool = True, update_rms: float = 0.18,
                 ns_schedule: Sequence[tuple[float, float, float]] = HYBRID_SCHEDULE,
                 ns_eps: float = 1e-7, ns_dtype: torch.dtype = torch.bfloat16,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-20):
        defaults = _check_group(dict(
            lr=lr, weight_decay=weight_decay, use_muon=True, momentum=momentum,
            nesterov=nesterov, update_rms=update_rms, ns_schedule=ns_schedule, ns_eps=ns_eps,
            ns_dtype=ns_dtype, row_blocks=1, betas=betas, eps=eps), "Muon")
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """``Optimizer.add_param_group`` with this optimizer's checks on the group's values
        (its own or the defaults): a bad value raises ValueError naming the group key, and the
        group is not added."""
        super().add_param_group(param_group)
        try:
            _check_group(self.param_groups[-1], f"param group {len(self.param_groups) - 1}")
        except ValueError:
            self.param_groups.pop()
            raise

    # ------------------------------------------------------------------ helpers
    def _master(self, p: torch.Tensor) -> torch.Tensor:
        """The fp32 tensor the update is applied to: p itself, or its fp32 master copy."""
        if p.dtype == torch.float32 or p.dtype == torch.float64:
            return p
        state = self.state[p]
        if "master" not in state:
            state["master"] = p.detach().float().clone()
        return state["master"]

    @staticmethod
    def _matrices(p: torch.Tensor, row_blocks: int) -> tuple[int, int, int]:
        """(count, rows, cols) of the independent matrices a Muon parameter holds."""
        if p.dim() == 3:
            if row_blocks != 1:
                raise ValueError("row_blocks applies to 2-D weights only, got a 3-D parameter")
            return p.shape[0], p.shape[1], p.shape[2]
        if p.dim() != 2:
            raise ValueError(f"Muon parameters must be [rows, cols] or [E, rows, cols], got "
                             f"shape {tuple(p.shape)}; give 1-D parameters to an AdamW group "
                             "(use_muon=False)")
        if row_blocks < 1 or p.shape[0] % row_blocks:
            raise ValueError(f"row_blocks={row_blocks} does not divide the {p.shape[0]} rows of "
                             f"a {tuple(p.shape)} parameter")
        return row_blocks, p.shape[0] // row_blocks, p.shape[1]

    def load_state_dict(self, state_dict: dict) -> None:
        """Like ``Optimizer.load_state_dict``, but state tensors keep their saved dtype: the
        base class casts them to the parameter's dtype, which would round the fp32 master
        weights and moments of bf16 parameters (and break exact resumption).

        Raises ValueError, with nothing loaded, when a saved state tensor (momentum, moments,
        master copy) does not have the shape of its parameter (the state of another model), or
        a saved group's hyper-parameter is one the constructor refuses (a NaN momentum, ...)."""
        state_dict = dict(state_dict, param_groups=[       # checked and normalised copies
            _check_group(dict(g), f"saved param group {n}")
            for n, g in enumerate(state_dict["param_groups"])])
        saved = state_dict["state"]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        if len(ids) == len(params):     # (other counts: the base class refuses them)
            for n, (i, p) in enumerate(zip(ids, params)):
                for k, v in saved.get(i, {}).items():
                    if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != p.shape:
                        raise ValueError(f"saved state {k!r} of parameter {n} has shape "
                                         f"{tuple(v.shape)}, the parameter {tuple(p.shape)}: "
                                         "not this optimizer's state")
        super().load_state_dict(state_dict)
        for i, p in zip(ids, params):
            for k, v in saved.get(i, {}).items():
                if isinstance(v, torch.Tensor) and v.is_floating_point():
                    self.state[p][k] = v.to(p.device, copy=True)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient; returns ``closure()`` if given.

        Raises ValueError, with no parameter or state changed, for a gradient that is sparse,
        not floating-point or not of its parameter's shape, or a Muon parameter whose shape
        the group cannot orthogonalise."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for n, group in enumerate(self.param_groups):   # checks first: a bad one changes nothing
            for i, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                if g.layout != torch.strided or not g.dtype.is_floating_point \
                        or g.shape != p.shape:
                    raise ValueError(
                        f"param group {n} parameter {i}: expected a dense floating-point "
                        f"gradient of the parameter's shape {tuple(p.shape)}, got a "
                        f"{'sparse ' if g.layout != torch.strided else ''}{g.dtype} gradient "
                        f"of shape {tuple(g.shape)}; nothing was updated")
                if group["use_muon"]:
                    self._matrices(p, int(group["row_blocks"]))
        # Muon: momentum per parameter, then one batched Newton-Schulz per (shape, settings).
        buckets: dict[tuple, list[tuple[torch.Tensor, torch.Tensor, dict]]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not group["use_muon"]:
                    self._adamw(p, group)
                    continue
                k, r, c = self._matrices(p, int(group["row_blocks"]))
                g = p.grad.float() if p.grad.dtype != torch.float64 else p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(g)
                u = g.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                key = (r, c, group["ns_schedule"], group["ns_eps"], group["ns_dtype"])
                buckets.setdefault(key, []).append((p, u.reshape(k, r, c), group))
        for (r, c, schedule, ns_eps, ns_dtype), items in buckets.items():
            stacked = torch.cat([u for _, u, _ in items], dim=0)
            ortho = orthogonalize(stacked, schedule, ns_eps, ns_dtype)
            scale = math.sqrt(max(r, c))
            i = 0
            for p, u, group in items:
                o = ortho[i:i + u.shape[0]].reshape(p.shape)
                i += u.shape[0]
                w = self._master(p)
                lr = group["lr"]
                w.mul_(1 - lr * group["weight_decay"])
                w.add_(o.to(w.dtype), alpha=-lr * scale * group["update_rms"])
                if w is not p:
                    p.copy_(w)
        return loss

    def _adamw(self, p: torch.Tensor, group: dict) -> None:
        """Decoupled-weight-decay Adam (the update of ``torch.optim.AdamW``, same op order)."""
        g = p.grad.float() if p.grad.dtype != torch.float64 else p.grad
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(g)
            state["exp_avg_sq"] = torch.zeros_like(g)
        state["step"] += 1
        t = state["step"]
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        w = self._master(p)
        w.mul_(1 - lr * group["weight_decay"])
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bc1 = 1 - beta1 ** t
        bc2 = 1 - beta2 ** t
        denom = (v.sqrt() / math.sqrt(bc2)).add_(group["eps"])
        w.addcdiv_(m, denom, value=-lr / bc1)
        if w is not p:
            p.copy_(w)


# ---------------------------------------------------------------------------------------------
# The report's parameter partition
# ---------------------------------------------------------------------------------------------
_ADAMW_SUFFIXES = ("_base", "_scale", "attn_sink", ".ape")


def _is_norm_weight(model: nn.Module, name: str) -> bool:
    from ..layers.norm import RMSNorm
    mod_name, _, leaf = name.rpartition(".")
    return leaf == "weight" and isinstance(model.get_submodule(mod_name), RMSNorm)


def param_groups(model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.1,
                 optimizer: str = "muon", **muon_options) -> list[dict]:
    """The parameter groups of DeepSeek-V4's optimizer for a :class:`dsv4.Model`.

    Partition (training.md §2.3):

    * ``"adamw"`` group: ``embed.weight``, ``head.weight``, every RMSNorm weight, the mHC
      static biases and gating factors (``hc_*_base``, ``hc_*_scale``), attention sinks and
      compressor position biases ``ape`` (the last two are not named by the report; AdamW is
      training.md's recommendation).
    * ``"muon"`` group: every other matrix (attention / compressor / indexer projections, router
      ``gate.weight``, expert and shared-expert ``w1/w2/w3`` — each expert is its own parameter,
      so each is orthogonalised separately —, MTP ``e_proj``/``h_proj``, mHC ``hc_*_fn``).
    * ``"muon_wo_a"`` group: the grouped output projections ``attn.wo_a`` [o_groups·o_lora_rank,
      ·], orthogonalised as ``o_groups`` independent blocks (``row_blocks``).
    * Left out: the router ``gate.bias`` (updated by the auxiliary-loss-free rule, not by
      gradients, §3.3; see :mod:`dsv4.train.routing`) and the hash table ``tid2eid`` (a buffer).

    Args:
        model: a :class:`dsv4.Model` (or any module built from dsv4 layers).
        lr, weight_decay: learning rate and decoupled weight decay of every group (the report
            uses the same η for Muon and AdamW; λ = 0.1 for both).
        optimizer: ``"muon"`` (the partition above) or ``"adamw"`` (the same groups, all
            updated by AdamW: the baseline).
        muon_options: further group keys for the Muon groups (``momentum``, ``update_rms``,
            ``ns_schedule``, ...), see :class:`Muon`.

    Returns:
        A list of group dicts (each with a ``"name"``) for :class:`Muon`.

    Raises:
        ValueError: an unknown ``optimizer``, or a model holding FP8/FP4 weights in their stored
            form (``weights="native"``), which cannot be trained.
    """
    if optimizer not in ("muon", "adamw"):
        raise ValueError(f"optimizer must be 'muon' or 'adamw', got {optimizer!r}")
    for name, mod in model.named_modules():
        if getattr(mod, "weight_format", None) is not None:
            raise ValueError(f"{name} holds its weight in stored {mod.weight_format} form "
                             "(weights='native'); load with weights='dequant' to train")
    use_muon = optimizer == "muon"
    o_groups = getattr(getattr(model, "config", None), "o_groups", 1)
    adamw, muon, wo_a = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or name.endswith("gate.bias"):
            continue
        if (p.dim() < 2 or name in ("embed.weight", "head.weight")
                or name.endswith(_ADAMW_SUFFIXES) or _is_norm_weight(model, name)):
            adamw.append(p)
        elif name.endswith("attn.wo_a.weight"):
            wo_a.append(p)
        else:
            muon.append(p)
    common = dict(lr=lr, weight_decay=weight_decay)
    groups = [dict(params=adamw, name="adamw", use_muon=False, **common),
              dict(params=muon, name="muon", use_muon=use_muon, **common, **muon_options),
              dict(params=wo_a, name="muon_wo_a", use_muon=use_muon,
                   row_blocks=o_groups if use_muon else 1, **common, **muon_options)]
    return [g for g in groups if g["params"]]
