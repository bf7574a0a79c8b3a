"""What the shared training loop is told and what it gives back: `TrainConfig`, `Task`, `FitResult`.

The split of work (see docs/ARCHITECTURE.md): the app owns its data, model, loss and metrics and
speaks to the loop through the two methods of `Task`; the loop owns everything else (device,
precision, seeding, optimizer and schedule, gradient clipping, the MoE auxiliary losses, early
stopping, checkpoint/resume, progress and the run folder).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor, nn

from moe_core.routing import check_positive_int

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "cosine", "linear")
PRECISIONS = ("fp32", "bf16")
MONITOR_MODES = ("min", "max")


def _check_choice(value: object, name: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"TrainConfig.{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _check_optional_positive_int(value: int | None, name: str) -> None:
    if value is not None:
        check_positive_int(value, f"TrainConfig.{name}")


@dataclass(frozen=True)
class TrainConfig:
    """How to train: every knob of the shared loop, validated on construction.

    Attributes:
        epochs: passes over ``train_batches(epoch)``.
        lr: peak learning rate (reached after the warmup).
        weight_decay: decoupled for AdamW, L2 for Adam and SGD (SGD uses momentum 0.9).
        optimizer: "adamw" | "adam" | "sgd".
        schedule: "constant" | "cosine" | "linear" decay to 0 over the run, after a linear warmup of
            ``warmup_steps`` optimizer steps (step s < warmup uses lr * (s + 1) / warmup).
        grad_clip: max global gradient norm; None = no clipping.
        precision: "fp32" | "bf16" (torch.autocast around forward + loss; weights stay fp32).
        device: "auto" (cuda if available, else cpu) | "cpu" | "cuda" | "cuda:N".
        seed: seeds python, numpy and torch at the start of a fresh run.
        aux_loss_coefficients: (name, coefficient) pairs handed to
            `moe_core.losses.weighted_aux_loss`, the one place the MoE aux losses are weighted.
        monitor: key of the dict `Task.evaluate` returns that picks the best epoch.
        monitor_mode: "min" | "max", whether a lower or a higher ``monitor`` is better.
        patience: stop after this many epochs without improvement; None = never stop early.
        checkpoint_every: also write checkpoints/last.pt every this many optimizer steps.
        log_every: refresh the shown running loss every this many steps (a console line when
            progress bars are off).
        progress: show rich progress bars.
    """

    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    schedule: str = "cosine"
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    precision: str = "fp32"
    device: str = "auto"
    seed: int = 0
    aux_loss_coefficients: tuple[tuple[str, float], ...] = (("load_balance", 0.01), ("z_loss", 0.001))
    monitor: str = "loss"
    monitor_mode: str = "min"
    patience: int | None = 3
    checkpoint_every: int | None = None
    log_every: int = 50
    progress: bool = True

    def __post_init__(self) -> None:
        check_positive_int(self.epochs, "TrainConfig.epochs")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TrainConfig.lr must be a finite number > 0, got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        _check_choice(self.optimizer, "optimizer", OPTIMIZERS)
        _check_choice(self.schedule, "schedule", SCHEDULES)
        check_positive_int(self.warmup_steps, "TrainConfig.warmup_steps", minimum=0)
        if self.grad_clip is not None and not (
            isinstance(self.grad_clip, (int, float)) and self.grad_clip > 0
        ):
            raise ValueError(f"TrainConfig.grad_clip must be > 0 or None (no clipping), got {self.grad_clip!r}")
        _check_choice(self.precision, "precision", PRECISIONS)
        device_ok = self.device in ("auto", "cpu", "cuda") or (
            isinstance(self.device, str) and self.device.startswith("cuda:") and self.device[5:].isdigit()
        )
        if not device_ok:
            raise ValueError(f"TrainConfig.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        check_positive_int(self.seed, "TrainConfig.seed", minimum=0)
        for pair in self.aux_loss_coefficients:
            ok = (
                isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)
                and isinstance(pair[1], (int, float)) and not isinstance(pair[1], bool) and pair[1] >= 0
            )
            if not ok:
                raise ValueError(
                    "TrainConfig.aux_loss_coefficients must be a tuple of (name, coefficient >= 0) "
                    f"pairs such as (('load_balance', 0.01),), got {self.aux_loss_coefficients!r}"
                )
        if not isinstance(self.monitor, str) or not self.monitor:
            raise ValueError(f"TrainConfig.monitor must be a metric name such as 'loss', got {self.monitor!r}")
        _check_choice(self.monitor_mode, "monitor_mode", MONITOR_MODES)
        _check_optional_positive_int(self.patience, "patience")
        _check_optional_positive_int(self.checkpoint_every, "checkpoint_every")
        check_positive_int(self.log_every, "TrainConfig.log_every")


class Task(Protocol):
    """What an app gives the loop: a loss on one batch and metrics over a stream of batches."""

    def training_loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, float | Tensor]]:
        """The scalar task loss of ``batch`` (MoE aux losses excluded) and metrics to log (numbers
        or scalar tensors; tensors are averaged on the device, with no per-step host sync)."""
        ...

    def evaluate(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
        """Validation metrics over ``batches`` (the loop has set eval mode and no_grad)."""
        ...


@dataclass(frozen=True)
class FitResult:
    """What `fit` returns.

    Attributes:
        best_metrics: the validation metrics of the best epoch (as `Task.evaluate` returned them).
        best_epoch: that epoch, counted from 1.
        history: one row per epoch: epoch (from 1), train_loss (task + weighted aux), aux_<name>
            (unweighted means), train_<metric> (means of the task's training metrics),
            val_<metric>, lr (of the epoch's last step), seconds.
        run_dir: the run folder.
        best_checkpoint: run_dir/checkpoints/best.pt.
    """

    best_metrics: dict[str, float]
    best_epoch: int
    history: list[dict[str, float]]
    run_dir: Path
    best_checkpoint: Path
