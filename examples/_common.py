"""What the examples share: seeding, the embed -> MoE -> head model, the training loop with its
held-out evaluation, and the command line.

Not an example itself (tests/test_examples.py skips files starting with ``_``). An example builds
its data and its MoE layer, then calls `train` with its loss; its ``__main__`` block calls
`run_cli`. Run as ``python examples/NAME.py`` the examples folder is on ``sys.path``, so
``from _common import ...`` works; the tests put it there too.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from moe_core.layer import MoE
from moe_core.losses import collect_aux_losses, weighted_aux_loss

LossFn = Callable[[Tensor, Tensor], Tensor]  # (model outputs, targets) -> scalar loss
Batch = tuple[Tensor, Tensor]  # (inputs, targets)


def seeded(seed: int) -> torch.Generator:
    """Seed torch's global RNG (model init, router noise) and return a generator for the data."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


class EmbedMoEHead(nn.Module):
    """``head(moe(embed(x)).output)``: one MoE layer between an input embedding and an output head.

    `MoE` returns a `MoEOutput`; ``.output`` is the mixed expert output (same shape as its input),
    and the layer keeps ``last_stats`` / ``last_aux_losses`` of its last forward.
    """

    def __init__(self, embed: nn.Module, moe: MoE, head: nn.Module) -> None:
        super().__init__()
        self.embed, self.moe, self.head = embed, moe, head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.moe(self.embed(x)).output)


def evaluate(
    model: nn.Module, loss_fn: LossFn, test_data: Batch, label: str, accuracy: bool
) -> tuple[float, str]:
    """The held-out loss of ``model`` (eval mode, no gradients) and a line reporting it."""
    inputs, targets = test_data
    model.eval()
    with torch.no_grad():
        outputs = model(inputs)
    model.train()
    loss = loss_fn(outputs, targets).item()
    report = f"{label} {loss:.4f}"
    if accuracy:
        report += f", accuracy {(outputs.argmax(-1) == targets).float().mean().item():.3f}"
    return loss, report


def train(
    model: nn.Module,
    loss_fn: LossFn,
    train_data: Batch,
    test_data: Batch,
    steps: int,
    *,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    lr: float = 1e-2,
    aux_coefficients: Mapping[str, float] | None = None,
    label: str = "test loss",
    accuracy: bool = False,
    after_step: Callable[[int], None] | None = None,
    summary: Callable[[], str] | None = None,
) -> tuple[float, float]:
    """Train ``model`` for ``steps`` Adam steps; returns the held-out loss before and after.

    Prints ``step 0: <held-out loss>`` before training and ``step <steps>: ...`` after it.

    Args:
        loss_fn: the task loss, used for training and for the held-out evaluation.
        train_data, test_data: ``(inputs, targets)`` to train on / to evaluate on.
        batch_size: each step trains on ``batch_size`` examples of ``train_data`` drawn with
            replacement using ``generator``; None trains on all of it every step.
        aux_coefficients: when given, the auxiliary losses the MoE layers recorded in the forward
            pass are added with these weights (`weighted_aux_loss`).
        label: what the held-out loss is called in the printed lines.
        accuracy: also print the held-out argmax accuracy (classification).
        after_step: called with the step index after each optimizer step (e.g. to record stats of
            that step's forward pass, or to set a schedule for the next step).
        summary: extra text for the last printed line (read after the final evaluation).
    """
    inputs, targets = train_data
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    first, report = evaluate(model, loss_fn, test_data, label, accuracy)
    print(f"step 0: {report}")
    for step in range(steps):
        if batch_size is None:
            x, y = inputs, targets
        else:
            batch = torch.randint(len(inputs), (batch_size,), generator=generator)
            x, y = inputs[batch], targets[batch]
        loss = loss_fn(model(x), y)
        if aux_coefficients is not None:
            loss = loss + weighted_aux_loss(collect_aux_losses(model), aux_coefficients)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step(step)
    last, report = evaluate(model, loss_fn, test_data, label, accuracy)
    extra = summary() if summary is not None else ""
    print(f"step {steps}: {report}" + (f"; {extra}" if extra else ""))
    return first, last


def cli_parser(doc: str) -> argparse.ArgumentParser:
    """The examples' command line: ``--steps`` and ``--seed``, described by the docstring's first
    line."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def run_cli(main: Callable[[int, int], object], doc: str) -> None:
    """Parse ``--steps`` and ``--seed`` and run ``main(steps, seed)``."""
    args = cli_parser(doc).parse_args()
    main(args.steps, args.seed)
