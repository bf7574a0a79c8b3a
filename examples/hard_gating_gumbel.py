"""Hard gating with a straight-through Gumbel-softmax router (Jang et al. 2017).

Each input goes to exactly one expert (K = 1, forward weight 1.0); the gate learns through the
straight-through gradient of the Gumbel-softmax sample, with the temperature annealed from 2 to
0.5, and a Switch load-balance loss keeps all experts in use. In eval mode the router takes the
noiseless argmax. The data come from four Gaussian clusters, each with its own linear target, so
one expert per cluster is the natural solution.

    python examples/hard_gating_gumbel.py --steps 300
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moe_core.experts import ExpertBank
from moe_core.layer import MoE
from moe_core.routers import GumbelRouter

from _common import EmbedMoEHead, run_cli, seeded, train

NUM_CLUSTERS, D_IN = 4, 4
AUX_COEFFICIENTS = {"load_balance": 0.05}


def make_data(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``x`` from one of 4 clusters; ``y = A_k x`` with a cluster-specific map ``A_k (2, D_IN)``."""
    task = torch.Generator().manual_seed(1234)  # the same clusters and maps for train and test
    centers = 3 * torch.randn(NUM_CLUSTERS, D_IN, generator=task)
    maps = torch.randn(NUM_CLUSTERS, 2, D_IN, generator=task)
    cluster = torch.randint(NUM_CLUSTERS, (n,), generator=generator)
    x = centers[cluster] + torch.randn(n, D_IN, generator=generator)
    y = torch.einsum("nod,nd->no", maps[cluster], x - centers[cluster])
    return x, y


def build_model(d_model: int = 32, d_hidden: int = 32) -> EmbedMoEHead:
    """``x (n, D_IN) -> y (n, 2)`` through one MoE layer that sends each input to one expert."""
    router = GumbelRouter(d_model, NUM_CLUSTERS, temperature=2.0)
    moe = MoE(router, ExpertBank(NUM_CLUSTERS, d_model, d_hidden))
    return EmbedMoEHead(nn.Linear(D_IN, d_model), moe, nn.Linear(d_model, 2))


def main(steps: int, seed: int = 0) -> tuple[float, float]:
    """Train ``steps`` Adam steps on batches of 256; returns the held-out MSE before and after."""
    generator = seeded(seed)
    model = build_model()

    def anneal(step: int) -> None:
        """Set the temperature of step ``step + 1``: 2 at the first step -> 0.5 at the last."""
        model.moe.router.temperature = 2.0 * 0.25 ** ((step + 1) / max(steps - 1, 1))

    return train(
        model,
        nn.functional.mse_loss,
        make_data(4096, generator),
        make_data(1024, generator),
        steps,
        batch_size=256,
        generator=generator,
        after_step=anneal,
        aux_coefficients=AUX_COEFFICIENTS,
        label="test mse",
        summary=lambda: (
            f"test inputs per expert {model.moe.last_stats.tokens_per_expert_E.tolist()}"
        ),
    )


if __name__ == "__main__":
    run_cli(main, __doc__)
