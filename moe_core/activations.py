"""The expert FFN's activations and their hand-written gradients.

``gelu`` (Hendrycks & Gimpel 2016), ``relu`` and ``swiglu`` (Shazeer 2020, "GLU Variants Improve
Transformer": ``silu(u) * v`` on the two halves of a ``2H``-wide pre-activation). The fused expert
kernels (`moe_core.dispatch`, `moe_core.expert_loop`) keep the pre-activation, not the activation,
for their backward, and call `activation_backward` on it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = ("gelu", "relu", "swiglu")


def apply_activation(h: Tensor, activation: str, out: Tensor | None = None) -> Tensor:
    """``gelu`` / ``relu`` of ``h``, or ``swiglu``: ``silu(u) * v`` with ``h = [u, v]`` on the last
    dim; written into ``out`` (the activation's shape) when given."""
    if activation == "gelu":
        return F.gelu(h) if out is None else torch._C._nn.gelu(h, out=out)
    if activation == "relu":
        return F.relu(h) if out is None else torch.clamp(h, min=0, out=out)
    u, v = h.chunk(2, dim=-1)
    if out is None:
        return F.silu(u) * v
    return torch.ops.aten.silu.out(u, out=out).mul_(v)


def activation_backward(grad_a: Tensor, h: Tensor, activation: str, out: Tensor | None = None) -> Tensor:
    """Gradient wrt the pre-activation ``h`` of `apply_activation`, written into ``out`` (``h``'s
    shape) when given; for gelu/relu ``out`` may alias ``grad_a`` or another spent buffer."""
    if activation == "gelu":
        if out is None:
            return torch.ops.aten.gelu_backward(grad_a, h)
        return torch.ops.aten.gelu_backward.grad_input(grad_a, h, approximate="none", grad_input=out)
    if activation == "relu":
        if out is None:
            return torch.ops.aten.threshold_backward(grad_a, h, 0)
        return torch.ops.aten.threshold_backward.grad_input(grad_a, h, 0, grad_input=out)
    u, v = h.chunk(2, dim=-1)
    if out is None:
        return torch.cat([torch.ops.aten.silu_backward(grad_a * v, u), grad_a * F.silu(u)], dim=-1)
    grad_u, grad_v = out.chunk(2, dim=-1)
    torch.ops.aten.silu_backward.grad_input(grad_a * v, u, grad_input=grad_u)
    torch.mul(grad_a, F.silu(u), out=grad_v)
    return out
