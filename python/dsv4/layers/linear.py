"""Bias-free linear layer holding the official ``.weight`` name (architecture.md §12).

A Linear holds its weight either as an ordinary parameter (random init, bf16/fp32 checkpoints,
or FP8/FP4 checkpoints loaded with ``weights="dequant"``) or, after
``Model.from_pretrained(..., weights="native")``, in its stored FP8/FP4 form (``qweight`` +
``scale`` buffers), dequantised at every use. ``.weight`` returns the float weight either way.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.backend import use_kernels
from ..ops.gemm import fp8_linear
from ..ops.quant import fp8_e4m3_sim
from ..quant import FP8_BLOCK, fp4_unpack, fp8_block_dequantize

__all__ = ["Linear"]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


class Linear(nn.Module):
    """``y = x @ weight.T`` with ``weight`` [out_features, in_features].

    ``keep_fp32=True`` pins the weight to fp32 whatever the model dtype (compressor ``wkv`` /
    ``wgate`` and the head, §12.3); the input is then promoted to fp32 and so is the output.
    Otherwise the weight follows the model dtype and the input is cast to the weight's dtype.

    Attributes set by the checkpoint loader (:func:`dsv4.checkpoint.load_checkpoint`):

    * ``stored_format``: None (stored as bf16/fp32 or randomly initialised), ``"fp8"`` or
      ``"fp4"``: how the checkpoint stored this weight, whichever ``weights=`` mode was used.
    * ``act_quant``: True for FP8/FP4-stored weights except ``wo_a``. With ``config.quant_sim``
      on, the input then gets the official FP8 activation quantisation before the GEMM: an e4m3
      round trip in 1x128 blocks along in_features with ue8m0 scales (architecture.md §12.3,
      :func:`dsv4.ops.quant.fp8_e4m3_sim`). The official code dequantises ``wo_a`` to bf16 at
      load and multiplies it without activation quantisation, hence the exception.
    * ``config``: the model's :class:`~dsv4.config.ModelConfig`, read at every call for
      ``quant_sim``.
    * ``weight_format``: None (a ``weight`` parameter) or ``"fp8"``/``"fp4"`` after
      :meth:`set_quantized` (``weights="native"``).
    """

    def __init__(self, in_features: int, out_features: int, keep_fp32: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.keep_fp32 = keep_fp32
        self.stored_format: Optional[str] = None
        self.act_quant = False
        self.config = None
        self.weight_format: Optional[str] = None
        self.dequant_dtype: Optional[torch.dtype] = None
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.float32))
        if keep_fp32:
            self.weight._dsv4_keep_fp32 = True
        # A meta tensor (the checkpoint loader builds on "meta", then loads every weight) holds
        # no values: drawing them would only cost time (~0.7 ms a call, a minute for Flash).
        if not self.weight.is_meta:
            nn.init.normal_(self.weight, std=in_features ** -0.5)

    # ------------------------------------------------------------------ weight storage
    @property
    def weight(self) -> torch.Tensor:
        """The float weight [out_features, in_features]: the parameter, or (native FP8/FP4
        storage) a freshly dequantised tensor in ``dequant_dtype`` (exact: every stored value
        times a power of two is representable in bf16/fp32)."""
        p = self._parameters.get("weight")
        if p is not None:
            return p
        if self.weight_format is not None:
            return self.dequantized_weight(self.dequant_dtype)
        raise AttributeError("weight")

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [out_features, in_features] in ``dtype`` (dequantised if stored FP8/FP4)."""
        if self.weight_format == "fp8":
            return fp8_block_dequantize(self.qweight, self.scale, dtype)
        if self.weight_format == "fp4":
            return fp4_unpack(self.qweight, self.scale, dtype)
        return self._parameters["weight"].to(dtype)

    def set_quantized(self, qweight: torch.Tensor, scale: torch.Tensor, fmt: str,
                      dtype: torch.dtype) -> None:
        """Hold the weight in its stored form instead of a float parameter.

        fmt ``"fp8"``: qweight float8_e4m3fn [out, in], scale [ceil(out/128), ceil(in/128)];
        fmt ``"fp4"``: qweight int8 [out, in/2] (two e2m1 codes per byte, low nibble first),
        scale [out, in/32]; scales float8_e8m0fnu (or float32). ``dtype`` is the float dtype
        ``.weight`` returns. The ``state_dict`` keys stay the official ``weight`` / ``scale``.
        Raises ValueError for a format or shape that does not fit this layer.
        """
        n, k = self.out_features, self.in_features
        if fmt == "fp8":
            ok = (qweight.dtype == torch.float8_e4m3fn and tuple(qweight.shape) == (n, k)
                  and tuple(scale.shape) == (-(-n // FP8_BLOCK), -(-k // FP8_BLOCK)))
        elif fmt == "fp4":
            ok = (qweight.dtype == torch.int8 and tuple(qweight.shape) == (n, k // 2)
                  and k % 32 == 0 and tuple(scale.shape) == (n, k // 32))
        else:
            raise ValueError(f"fmt must be 'fp8' or 'fp4', got {fmt!r}")
        if not ok:
            raise ValueError(f"set_quantized: {fmt} weight {qweight.dtype} "
                             f"{tuple(qweight.shape)} / scale {tuple(scale.shape)} do not fit a "
                             f"[{n}, {k}] Linear")
        self._parameters.pop("weight", None)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.weight_format = fmt
        self.dequant_dtype = dtype

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight_format is not None:        # official name of the stored weight
            destination[prefix + "weight"] = destination.pop(prefix + "qweight")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.weight_format is not None and prefix + "weight" in state_dict:
            state_dict[prefix + "qweight"] = state_dict.pop(prefix + "weight")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features].

        Native FP8 storage with CUDA bf16 activations (and the ``cuda`` backend) runs
        ``torch.ops.dsv4.fp8_linear``, which streams the FP8 bytes (the weight is never
        dequantised in memory); otherwise the weight is dequantised and ``F.linear`` runs.
        Both compute the same values (the kernel within the bf16 tolerance of the reference).

        Raises ValueError (from the simulation) when the FP8 activation quantisation applies
        and in_features is not a multiple of 128.
        """
        act_quant = bool(self.act_quant and self.config is not None and self.config.quant_sim)
        if self.weight_format == "fp8" and not self.keep_fp32 and self._fp8_kernel(x):
            return fp8_linear(x, self.qweight, self.scale, act_quant)
        if act_quant:
            x = fp8_e4m3_sim(x, FP8_BLOCK)
        if self.weight_format is None:
            w = self._parameters["weight"]
            if x.dtype != w.dtype:
                x = x.to(w.dtype)
            return F.linear(x, w)
        # Native storage: dequantise to the activation dtype (exact in bf16/fp32), so that the
        # layer follows Model.to(dtype) like a parameter would; keep_fp32 layers compute in fp32.
        if self.keep_fp32:
            dtype = torch.float32
        else:
            dtype = x.dtype if x.dtype in _FLOATS else self.dequant_dtype
        return F.linear(x.to(dtype), self.dequantized_weight(dtype))

    def _fp8_kernel(self, x: torch.Tensor) -> bool:
        """Whether this FP8-stored layer runs the CUDA fp8_linear kernel on ``x``."""
        if not x.is_cuda:
            return False
        unsupported = None
        if self.in_features % 16 or self.out_features % 8:
            unsupported = (f"fp8_linear takes in_features % 16 == 0 and out_features % 8 == 0, "
                           f"not {self.in_features} -> {self.out_features}")
        return use_kernels(x, ("fp8_linear",), unsupported)

    def extra_repr(self) -> str:
        s = f"{self.in_features} -> {self.out_features}"
        if self.weight_format is not None:
            s += f", {self.weight_format} storage"
        elif self.stored_format is not None:
            s += f", stored {self.stored_format}"
        return s
