"""Hierarchical MoE: a gate over groups of experts, then a gate inside the chosen group
(the two-level hierarchical mixture of Shazeer et al. 2017).

8 experts in 2 groups of 4; every input picks its best group and the 2 best experts inside it, with
weights ``p(group) * p(expert | group)``; a Switch load-balance loss on ``p(group) * p(expert |
group)`` keeps both groups and all experts in use. The data have the same two-level structure: 2
far-apart super-clusters, each split into 4 sub-clusters with their own linear target.

    python examples/hierarchical.py --steps 300
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moe_core.experts import ExpertBank
from moe_core.layer import MoE
from moe_core.routers import HierarchicalRouter

from _common import EmbedMoEHead, run_cli, seeded, train

NUM_GROUPS, PER_GROUP, D_IN = 2, 4, 6
AUX_COEFFICIENTS = {"load_balance": 0.05}


def make_data(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``x`` from one of 2 x 4 nested clusters; ``y`` = a sub-cluster-specific linear function."""
    task = torch.Generator().manual_seed(777)
    groups = 4 * torch.randn(NUM_GROUPS, 1, D_IN, generator=task)
    centers = (groups + 2 * torch.randn(NUM_GROUPS, PER_GROUP, D_IN, generator=task)).reshape(
        -1, D_IN
    )
    weights = torch.randn(NUM_GROUPS * PER_GROUP, D_IN, generator=task)
    cluster = torch.randint(NUM_GROUPS * PER_GROUP, (n,), generator=generator)
    x = centers[cluster] + 0.5 * torch.randn(n, D_IN, generator=generator)
    y = (weights[cluster] * (x - centers[cluster])).sum(-1, keepdim=True)
    return x, y


def build_model(d_model: int = 32, d_hidden: int = 32) -> EmbedMoEHead:
    """``x (n, D_IN) -> y (n, 1)`` through one MoE layer: best group, then its 2 best experts."""
    num_experts = NUM_GROUPS * PER_GROUP
    router = HierarchicalRouter(
        d_model, num_experts, num_groups=NUM_GROUPS, top_k_groups=1, top_k_experts=2
    )
    moe = MoE(router, ExpertBank(num_experts, d_model, d_hidden))
    return EmbedMoEHead(nn.Linear(D_IN, d_model), moe, nn.Linear(d_model, 1))


def main(steps: int, seed: int = 0) -> tuple[float, float]:
    """Train ``steps`` Adam steps on batches of 256; returns the held-out MSE before and after."""
    generator = seeded(seed)
    model = build_model()
    return train(
        model,
        nn.functional.mse_loss,
        make_data(4096, generator),
        make_data(1024, generator),
        steps,
        batch_size=256,
        generator=generator,
        aux_coefficients=AUX_COEFFICIENTS,
        label="test mse",
        summary=lambda: (
            f"test assignments per expert {model.moe.last_stats.tokens_per_expert_E.tolist()}"
        ),
    )


if __name__ == "__main__":
    run_cli(main, __doc__)
