"""Optimizers of DeepSeek-V4 training: :class:`Muon` (hybrid Newton-Schulz + AdamW groups)."""

from .muon import (FINAL_COEFFS, HYBRID_SCHEDULE, KELLER_COEFFS, KELLER_SCHEDULE, Muon,
                   newton_schulz, orthogonalize, param_groups)

__all__ = ["FINAL_COEFFS", "HYBRID_SCHEDULE", "KELLER_COEFFS", "KELLER_SCHEDULE", "Muon",
           "newton_schulz", "orthogonalize", "param_groups"]
