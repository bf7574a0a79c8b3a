"""A Switch Transformer FFN layer: top-1 routing with a capacity factor (Fedus et al. 2021).

A residual block ``x + MoE(LayerNorm(x))`` on token sequences ``(batch, seq, d_model)``: every
token goes to its single best expert (``SwitchRouter``, multiplicative input jitter in training),
each expert takes at most ``C = ceil(1.25 * T / E)`` tokens per batch, and overflowing tokens are
dropped (they pass through the residual only). The Switch load-balance loss keeps the load even,
which keeps the dropped fraction low. The task: label every token by a fixed random table of its id.

    python examples/switch_ffn.py --steps 300
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moe_core.experts import ExpertBank
from moe_core.layer import MoE
from moe_core.routers import SwitchRouter

from _common import run_cli, seeded, train

VOCAB, NUM_CLASSES, SEQ_LEN = 256, 16, 32
AUX_COEFFICIENTS = {"load_balance": 0.01}


def make_data(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` sequences of token ids ``(n, SEQ_LEN)`` and per-token labels ``table[id]``."""
    table = torch.randint(NUM_CLASSES, (VOCAB,), generator=torch.Generator().manual_seed(99))
    tokens = torch.randint(VOCAB, (n, SEQ_LEN), generator=generator)
    return tokens, table[tokens]


class SwitchTagger(nn.Module):
    def __init__(self, d_model: int = 32, d_hidden: int = 64, num_experts: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        self.norm = nn.LayerNorm(d_model)
        router = SwitchRouter(d_model, num_experts, jitter=0.01)
        self.moe = MoE(router, ExpertBank(num_experts, d_model, d_hidden), capacity_factor=1.25)
        self.head = nn.Linear(d_model, NUM_CLASSES)

    def forward(self, tokens_BN: Tensor) -> Tensor:
        x_BND = self.embed(tokens_BN)
        x_BND = x_BND + self.moe(self.norm(x_BND)).output
        return self.head(x_BND)


def token_cross_entropy(logits_BNC: Tensor, labels_BN: Tensor) -> Tensor:
    """Cross-entropy over every token of every sequence."""
    return nn.functional.cross_entropy(logits_BNC.flatten(0, 1), labels_BN.flatten())


def main(steps: int, seed: int = 0) -> tuple[float, float]:
    """Train for ``steps`` Adam steps on batches of 32 sequences; returns the held-out
    cross-entropy before and after."""
    generator = seeded(seed)
    model = SwitchTagger()
    dropped: list[float] = []  # fraction of the tokens over capacity, per training step

    def summary() -> str:
        if not dropped:
            return ""
        return f"dropped tokens: first step {dropped[0]:.3f}, last step {dropped[-1]:.3f}"

    return train(
        model,
        token_cross_entropy,
        make_data(2048, generator),
        make_data(256, generator),
        steps,
        batch_size=32,
        generator=generator,
        aux_coefficients=AUX_COEFFICIENTS,
        after_step=lambda step: dropped.append(model.moe.last_stats.dropped_fraction),
        summary=summary,
    )


if __name__ == "__main__":
    run_cli(main, __doc__)
