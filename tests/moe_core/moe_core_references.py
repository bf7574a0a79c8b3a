"""Independent reference formulas the moe_core tests compare the library against."""

from __future__ import annotations

import torch


def reference_activation(h: torch.Tensor, activation: str) -> torch.Tensor:
    """The activations by their formulas (exact gelu; swiglu = silu(u) * v on the two halves)."""
    if activation == "relu":
        return torch.clamp(h, min=0)
    if activation == "gelu":
        return 0.5 * h * (1 + torch.erf(h / 2**0.5))
    u, v = h.chunk(2, dim=-1)
    return u * torch.sigmoid(u) * v
