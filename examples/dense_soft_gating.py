"""Dense soft gating: a mixture of local experts for regression (Jacobs et al. 1991).

Every input goes to every expert and the outputs are mixed with the softmax weights of a learned
gate (`SoftmaxRouter`, K = E) -- the original, fully differentiable mixture of experts. The target
is a different linear function in each quadrant of the plane, so each expert can take a region.

    python examples/dense_soft_gating.py --steps 300
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moe_core.experts import ExpertBank
from moe_core.layer import MoE
from moe_core.routers import SoftmaxRouter

from _common import EmbedMoEHead, run_cli, seeded, train


def make_data(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``x`` uniform in ``[-1, 1]^2``; ``y`` = a quadrant-specific linear function of ``x``."""
    x = torch.rand(n, 2, generator=generator) * 2 - 1
    slopes = torch.tensor([[2.0, -1.0], [-1.5, 0.5], [0.5, 2.0], [-2.0, -2.0]])
    quadrant = (x[:, 0] > 0).long() * 2 + (x[:, 1] > 0).long()
    y = (x * slopes[quadrant]).sum(-1, keepdim=True) + 0.5 * quadrant[:, None]
    return x, y


def build_model(d_model: int = 32, num_experts: int = 4, d_hidden: int = 32) -> EmbedMoEHead:
    """``x (n, 2) -> y (n, 1)`` through one dense MoE layer: every expert sees every input."""
    moe = MoE(SoftmaxRouter(d_model, num_experts), ExpertBank(num_experts, d_model, d_hidden))
    return EmbedMoEHead(nn.Linear(2, d_model), moe, nn.Linear(d_model, 1))


def main(steps: int, seed: int = 0) -> tuple[float, float]:
    """Train for ``steps`` full-batch Adam steps; returns the held-out MSE before and after."""
    generator = seeded(seed)
    model = build_model()
    return train(
        model,
        nn.functional.mse_loss,
        make_data(1024, generator),
        make_data(512, generator),
        steps,
        label="test mse",
        summary=lambda: f"gate entropy {model.moe.last_stats.entropy:.3f} nats",
    )


if __name__ == "__main__":
    run_cli(main, __doc__)
