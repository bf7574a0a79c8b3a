"""Soft-MoE on a sequence task (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts").

Every expert processes 2 slots; each slot is a softmax-weighted average of all the tokens of a
sequence, and every token's output is a softmax-weighted average of all slot outputs -- fully
differentiable, no token dropping, no balance loss. The task needs the whole sequence: classify a
sequence of random vectors by which of 4 fixed directions its mean is most aligned with.

    python examples/soft_moe_sequence.py --steps 300
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moe_core.experts import ExpertBank
from moe_core.soft_moe import SoftMoE

from _common import run_cli, seeded, train

D_IN, SEQ_LEN, NUM_CLASSES = 8, 16, 4


def make_data(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Sequences ``(n, SEQ_LEN, D_IN)``; label = the fixed direction closest to their mean."""
    directions = torch.randn(NUM_CLASSES, D_IN, generator=torch.Generator().manual_seed(5))
    x = torch.randn(n, SEQ_LEN, D_IN, generator=generator)
    return x, (x.mean(1) @ directions.t()).argmax(-1)


class SoftMoEClassifier(nn.Module):
    def __init__(self, d_model: int = 32, d_hidden: int = 64, num_experts: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(D_IN, d_model)
        self.norm = nn.LayerNorm(d_model)
        experts = ExpertBank(num_experts, d_model, d_hidden)
        self.moe = SoftMoE(d_model, experts, slots_per_expert=2, normalize=True)
        self.head = nn.Linear(d_model, NUM_CLASSES)

    def forward(self, x_BND: Tensor) -> Tensor:
        h_BND = self.embed(x_BND)
        h_BND = h_BND + self.moe(self.norm(h_BND)).output
        return self.head(h_BND.mean(1))


def main(steps: int, seed: int = 0) -> tuple[float, float]:
    """Train for ``steps`` Adam steps on batches of 64 sequences; returns the held-out
    cross-entropy before and after."""
    generator = seeded(seed)
    return train(
        SoftMoEClassifier(),
        nn.functional.cross_entropy,
        make_data(4096, generator),
        make_data(512, generator),
        steps,
        batch_size=64,
        generator=generator,
        lr=3e-3,
        accuracy=True,
    )


if __name__ == "__main__":
    run_cli(main, __doc__)
