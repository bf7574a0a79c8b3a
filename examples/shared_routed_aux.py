"""Shared + routed experts trained with the balance and z losses (DeepSeekMoE, Dai et al. 2024;
ST-MoE router z-loss, Zoph et al. 2022).

A shared FFN sees every token and 8 small routed experts take the top 2 per token. The auxiliary
losses every MoE layer records (``last_aux_losses``) are summed over the model by
``collect_aux_losses`` and weighted in the one place coefficients are applied,
``weighted_aux_loss``: the Switch load-balance loss keeps the experts evenly loaded, the z-loss
keeps the router logits small. The task is a regression whose target mixes a global part (for the
shared expert) and a cluster-specific part (for the routed experts).

    python examples/shared_routed_aux.py --steps 300
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moe_core.experts import FFN, ExpertBank
from moe_core.layer import MoE
from moe_core.losses import collect_aux_losses
from moe_core.routers import TopKRouter

from _common import EmbedMoEHead, run_cli, seeded, train

NUM_CLUSTERS, D_IN = 8, 8
AUX_COEFFICIENTS = {"load_balance": 0.01, "z_loss": 0.001}


def make_data(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``y = tanh(u . x) + w_k . (x - c_k)``: a shared term and a cluster-specific term."""
    task = torch.Generator().manual_seed(2024)
    centers = 3 * torch.randn(NUM_CLUSTERS, D_IN, generator=task)
    u = torch.randn(D_IN, generator=task) / D_IN**0.5
    weights = torch.randn(NUM_CLUSTERS, D_IN, generator=task) / D_IN**0.5
    cluster = torch.randint(NUM_CLUSTERS, (n,), generator=generator)
    x = centers[cluster] + torch.randn(n, D_IN, generator=generator)
    y = torch.tanh(x @ u) + (weights[cluster] * (x - centers[cluster])).sum(-1)
    return x, y[:, None]


def build_model(d_model: int = 32, d_hidden: int = 16, num_experts: int = 8) -> EmbedMoEHead:
    """``x (n, D_IN) -> y (n, 1)`` through one MoE layer: a shared FFN plus the top 2 of 8."""
    moe = MoE(
        TopKRouter(d_model, num_experts, top_k=2),
        ExpertBank(num_experts, d_model, d_hidden),
        shared_experts=FFN(d_model, 2 * d_hidden),
    )
    return EmbedMoEHead(nn.Linear(D_IN, d_model), moe, nn.Linear(d_model, 1))


def main(steps: int, seed: int = 0) -> tuple[float, float]:
    """Train ``steps`` Adam steps on batches of 256; returns the held-out MSE before and after."""
    generator = seeded(seed)
    model = build_model()

    def summary() -> str:
        aux = {name: round(value.item(), 4) for name, value in collect_aux_losses(model).items()}
        return f"aux losses {aux}; load CV {model.moe.last_stats.load_cv:.3f}"

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
        summary=summary,
    )


if __name__ == "__main__":
    run_cli(main, __doc__)
