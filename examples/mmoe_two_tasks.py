"""MMoE on the synthetic two-task regression of Ma et al. 2018 ("Modeling Task Relationships in
Multi-task Learning with Multi-gate Mixture-of-Experts").

Two regression targets built from unit directions ``w1, w2`` with cosine ``rho`` (the task
correlation): ``y_i = w_i . x + sum_j sin(a_j w_i . x + b_j)``. Four shared experts, one softmax
gate per task, one small tower per task; the loss is the sum of the two MSEs. Lower ``--rho`` makes
the tasks less related, which is where per-task gates help.

    python examples/mmoe_two_tasks.py --steps 300 --rho 0.5
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moe_core.multigate import MMoE

from _common import cli_parser, seeded, train

D_IN, NUM_SINES = 16, 10


def make_data(n: int, rho: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``x (n, D_IN)`` standard normal, the two targets ``(n, 2)`` with task correlation ``rho``."""
    task = torch.Generator().manual_seed(2018)
    u1, u2 = torch.linalg.qr(torch.randn(D_IN, 2, generator=task)).Q.t()
    w1, w2 = u1, rho * u1 + (1 - rho**2) ** 0.5 * u2
    a, b = torch.randn(2, NUM_SINES, generator=task)
    x = torch.randn(n, D_IN, generator=generator)
    ys = [x @ w + torch.sin((x @ w)[:, None] * a + b).sum(-1) for w in (w1, w2)]
    return x, torch.stack(ys, dim=-1)


class MMoEModel(nn.Module):
    def __init__(self, d_expert: int = 16, num_experts: int = 4, d_tower: int = 8) -> None:
        super().__init__()
        self.mmoe = MMoE.from_sizes(D_IN, d_expert, num_experts, num_tasks=2)
        self.towers = nn.ModuleList(
            nn.Sequential(nn.Linear(d_expert, d_tower), nn.ReLU(), nn.Linear(d_tower, 1))
            for _ in range(2)
        )

    def forward(self, x: Tensor) -> Tensor:
        outputs = self.mmoe(x).task_outputs
        return torch.cat([tower(h) for tower, h in zip(self.towers, outputs, strict=True)], dim=-1)


def summed_mse(pred: Tensor, target: Tensor) -> Tensor:
    """The sum over the tasks of each task's MSE."""
    return (pred - target).square().mean(0).sum()


def main(steps: int, seed: int = 0, rho: float = 0.5) -> tuple[float, float]:
    """Train for ``steps`` Adam steps on batches of 256; returns the held-out summed MSE before
    and after."""
    generator = seeded(seed)
    model = MMoEModel()

    def gate_usage() -> str:
        usage = [
            "[" + ", ".join(f"{w:.2f}" for w in g.mean(0).tolist()) + "]"
            for g in model.mmoe.last_gate_weights
        ]
        return f"mean gate weights per task {' '.join(usage)}"

    return train(
        model,
        summed_mse,
        make_data(8192, rho, generator),
        make_data(2048, rho, generator),
        steps,
        batch_size=256,
        generator=generator,
        label="test loss (sum of the two MSEs)",
        summary=gate_usage,
    )


if __name__ == "__main__":
    parser = cli_parser(__doc__)
    parser.add_argument("--rho", type=float, default=0.5, help="task correlation in [-1, 1]")
    args = parser.parse_args()
    if not -1.0 <= args.rho <= 1.0:
        parser.error(f"--rho must be in [-1, 1], got {args.rho}")
    main(args.steps, args.seed, args.rho)
