"""CondConv / dynamic convolution (Yang et al. 2019; Chen et al. 2020): a 3x3 convolution whose
kernel is, per image, the router-weighted sum of E expert kernels, and the two ways to compute it.

Convolution is linear in its kernel, so ``conv(x_b, sum_e p_be W_e) = sum_e p_be conv(x_b, W_e)``:
- ``grouped``: mix each image's kernel, then one grouped convolution over the batch (groups = B).
  CondConv's own count of the work: E x the kernel's size for the mixing plus one convolution.
- ``summed``: all E kernels as one convolution of E x c_out filters, the E outputs weighted by the
  mixing weights and summed. E x the convolution's multiply-adds, but a plain dense convolution.

Which runs is data (`MIXED_CONVS`) chosen by a pure function of E (`mixed_conv_kind`), measured
by `benchmarks/vision_condconv.py` on two CPU cores without AMX (bf16 autocast, channels_last,
batch 256, 256 -> 256 channels at 7 x 7, forward and backward; docs/BENCHMARKS.md): the grouped
form took 3.42 x the summed one's time at E = 2, 1.70 x at E = 4 and 0.84 x at E = 8 (on AMX
cores the crossover may differ: not measured). The model's FLOPs (`flops_per_image`) count
CondConv's arithmetic whichever form runs; the outputs agree to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_core import SoftmaxRouter

SUMMED_MAX_EXPERTS = 4  # up to this E the summed form is faster (see the module docstring)


def grouped_mixed_conv(x_BCHW: Tensor, weight_EOI33: Tensor, probs_BE: Tensor) -> Tensor:
    """Each image's kernel mixed, then one grouped convolution with one group per image."""
    B, c_in, H, W = x_BCHW.shape
    c_out = weight_EOI33.shape[1]
    kernel_BOI33 = torch.einsum("be,eoikl->boikl", probs_BE.to(weight_EOI33.dtype), weight_EOI33)
    y = F.conv2d(x_BCHW.reshape(1, B * c_in, H, W),
                 kernel_BOI33.reshape(B * c_out, c_in, 3, 3).to(x_BCHW.dtype), padding=1, groups=B)
    return y.reshape(B, c_out, H, W)


def summed_mixed_conv(x_BCHW: Tensor, weight_EOI33: Tensor, probs_BE: Tensor) -> Tensor:
    """Every expert kernel on every image in one convolution, then the mixing-weighted sum."""
    E, c_out = weight_EOI33.shape[:2]
    y_BEOHW = F.conv2d(x_BCHW, weight_EOI33.flatten(0, 1).to(x_BCHW.dtype), padding=1).unflatten(1, (E, c_out))
    return (y_BEOHW * probs_BE.to(y_BEOHW.dtype)[:, :, None, None, None]).sum(dim=1)


MIXED_CONVS = {"grouped": grouped_mixed_conv, "summed": summed_mixed_conv}


def mixed_conv_kind(num_experts: int) -> str:
    """The faster form for E expert kernels (a key of `MIXED_CONVS`)."""
    return "summed" if num_experts <= SUMMED_MAX_EXPERTS else "grouped"


class CondConv2d(nn.Module):
    """3x3 conv whose kernel is, per image, the router-weighted sum of E expert kernels. Weights:
    `moe_core.SoftmaxRouter` over the spatial mean of the input (dense, every expert kernel
    contributes). ``kind``: which form computes it (`MIXED_CONVS`; default `mixed_conv_kind`)."""

    def __init__(self, c_in: int, c_out: int, num_experts: int, kind: str | None = None) -> None:
        super().__init__()
        self.c_in, self.c_out, self.num_experts = c_in, c_out, num_experts
        self.kind = mixed_conv_kind(num_experts) if kind is None else kind
        if self.kind not in MIXED_CONVS:
            raise ValueError(f"CondConv2d: kind must be one of {', '.join(MIXED_CONVS)}, got {kind!r}")
        self.router = SoftmaxRouter(c_in, num_experts)
        weight = torch.empty(num_experts, c_out, c_in, 3, 3)
        for e in range(num_experts):
            nn.init.kaiming_uniform_(weight[e], a=5 ** 0.5)
        with torch.no_grad():  # expert 0 dirac like the dense conv; the others stay random
            nn.init.dirac_(weight[0, : min(c_in, c_out)])
        self.weight_EOI33 = nn.Parameter(weight)

    def extra_repr(self) -> str:
        return f"{self.c_in}, {self.c_out}, num_experts={self.num_experts}, kind={self.kind}"

    def forward(self, x_BCHW: Tensor) -> Tensor:
        return self.forward_with_weights(x_BCHW)[0]

    def forward_with_weights(self, x_BCHW: Tensor) -> tuple[Tensor, Tensor]:
        """``(y_BOHW, probs_BE)``: the output and each image's mixing weights."""
        probs_BE = self.router(x_BCHW.float().mean(dim=(-2, -1))).probs_TE
        return MIXED_CONVS[self.kind](x_BCHW, self.weight_EOI33, probs_BE), probs_BE
