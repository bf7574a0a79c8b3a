"""Sparse top-k gating with learned noise (Shazeer et al. 2017, "Outrageously Large Neural
Networks").

Each input goes to its 2 best of 8 experts; in training the gate adds Gaussian noise whose scale is
learned (``softplus(x W_noise)``), and the importance (CV^2) and load-balance losses keep the
experts evenly used. The task is classification of inputs from 8 clusters, each labelled by its own
random linear classifier.

    python examples/sparse_topk_noisy.py --steps 300
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moe_core.experts import ExpertBank
from moe_core.layer import MoE
from moe_core.routers import TopKRouter

from _common import EmbedMoEHead, run_cli, seeded, train

NUM_CLUSTERS, D_IN, NUM_CLASSES = 8, 8, 4
AUX_COEFFICIENTS = {"importance": 0.1, "load_balance": 0.01}


def make_data(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``x`` from one of 8 clusters; label = argmax of a cluster-specific linear classifier."""
    task = torch.Generator().manual_seed(4321)
    centers = 4 * torch.randn(NUM_CLUSTERS, D_IN, generator=task)
    classifiers = torch.randn(NUM_CLUSTERS, NUM_CLASSES, D_IN, generator=task)
    cluster = torch.randint(NUM_CLUSTERS, (n,), generator=generator)
    x = centers[cluster] + torch.randn(n, D_IN, generator=generator)
    label = torch.einsum("ncd,nd->nc", classifiers[cluster], x - centers[cluster]).argmax(-1)
    return x, label


def build_model(d_model: int = 32, d_hidden: int = 32, num_experts: int = 8) -> EmbedMoEHead:
    """``x (n, D_IN) -> logits (n, NUM_CLASSES)`` through one noisy top-2 MoE layer."""
    router = TopKRouter(d_model, num_experts, top_k=2, noisy=True)
    moe = MoE(router, ExpertBank(num_experts, d_model, d_hidden))
    return EmbedMoEHead(nn.Linear(D_IN, d_model), moe, nn.Linear(d_model, NUM_CLASSES))


def main(steps: int, seed: int = 0) -> tuple[float, float]:
    """Train ``steps`` Adam steps on batches of 256; returns the held-out cross-entropy before
    and after."""
    generator = seeded(seed)
    model = build_model()
    return train(
        model,
        nn.functional.cross_entropy,
        make_data(4096, generator),
        make_data(1024, generator),
        steps,
        batch_size=256,
        generator=generator,
        aux_coefficients=AUX_COEFFICIENTS,
        accuracy=True,
        summary=lambda: f"load CV {model.moe.last_stats.load_cv:.3f}",
    )


if __name__ == "__main__":
    run_cli(main, __doc__)
