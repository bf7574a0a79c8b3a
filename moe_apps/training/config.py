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

from moe_core.checks import check_positive_int

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "cosine", "linear", "inverse_sqrt", "triangular", "onecycle")
AVERAGING = ("none", "ema", "lookahead")
PRECISIONS = ("fp32", "bf16")
MONITOR_MODES = ("min", "max")


def _check_choice(value: object, name: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"TrainConfig.{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _check_fraction(value: object, name: str, *, closed: bool) -> None:
    """``value`` in [0, 1] (closed) or [0, 1)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value and (
        value <= 1 if closed else value < 1)
    if not ok:
        raise ValueError(f"TrainConfig.{name} must be in [0, 1{']' if closed else ')'}, got {value!r}")


def _check_optional_positive_int(value: int | None, name: str) -> None:
    if value is not None:
        check_positive_int(value, f"TrainConfig.{name}")


@dataclass(frozen=True)
class TrainConfig:
    """How to train: every knob of the shared loop, validated on construction.

    Attributes:
        epochs: passes over ``train_batches(epoch)``.
        lr: peak learning rate (reached after the warmup).
        weight_decay: decoupled for AdamW, L2 for Adam and SGD; a param group may set its own
            (``fit(..., param_groups=fn)``).
        optimizer: "adamw" | "adam" | "sgd".
        momentum, nesterov: SGD's momentum (0 = plain SGD) and Nesterov momentum (Sutskever et al.
            2013; needs momentum > 0).
        betas, eps: Adam / AdamW's moment decays and epsilon (e.g. (0.9, 0.98), 1e-9 for
            Transformers, Vaswani et al. 2017).
        schedule: after a linear warmup of ``warmup_steps`` optimizer steps (step s < warmup uses
            lr * (s + 1) / warmup), with p the progress over the remaining steps in [0, 1):
            "constant" 1; "cosine" (1 + cos(pi p)) / 2; "linear" 1 - p; "inverse_sqrt"
            sqrt(max(warmup, 1) / (s + 1)) (Vaswani et al. 2017; 1 at the end of the warmup);
            "triangular" (alias "onecycle", Smith 2018; airbench's schedule) linear from
            ``start_factor`` up to 1 at p = ``peak_fraction``, then linear down to ``final_factor``.
        peak_fraction, start_factor, final_factor: the shape of "triangular" (unused otherwise).
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
        averaging: "none" | "ema" | "lookahead": a running average of the weights (every float
            entry of the state dict, BatchNorm statistics included) updated every
            ``averaging_every`` steps as ``avg = decay * avg + (1 - decay) * w``. "ema" leaves the
            trained weights alone (Polyak averaging); "lookahead" then copies the average back into
            them (Zhang et al. 2019, as airbench does). Validation, best.pt and the weights `fit`
            leaves in the model are the averaged ones; last.pt keeps both for an exact resume.
        averaging_decay: ``decay`` above, in [0, 1).
        averaging_every: steps between two updates.
        averaging_start_epoch: epoch (from 1) whose first step starts the average (a copy of the
            weights then).
        snapshots: keep the weights of the last this many epochs as checkpoints/epoch-NNNN.pt (for
            `average_snapshots`, checkpoint averaging as in Vaswani et al. 2017); 0 = none.

    Label smoothing is the task's: it is a property of a classification loss, so a task passes
    ``label_smoothing=`` to ``F.cross_entropy`` from its own config; the loop never sees it.
    """

    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "cosine"
    warmup_steps: int = 0
    peak_fraction: float = 0.25
    start_factor: float = 0.0
    final_factor: float = 0.0
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
    averaging: str = "none"
    averaging_decay: float = 0.999
    averaging_every: int = 1
    averaging_start_epoch: int = 1
    snapshots: int = 0

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
        _check_fraction(self.momentum, "momentum", closed=True)
        if not isinstance(self.nesterov, bool) or (self.nesterov and self.momentum == 0):
            raise ValueError(f"TrainConfig.nesterov must be a bool and needs momentum > 0, got "
                             f"nesterov={self.nesterov!r}, momentum={self.momentum!r}")
        ok = (isinstance(self.betas, tuple) and len(self.betas) == 2
              and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas))
        if not ok:
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        if not (isinstance(self.eps, (int, float)) and self.eps > 0):
            raise ValueError(f"TrainConfig.eps must be > 0, got {self.eps!r}")
        if not (isinstance(self.peak_fraction, (int, float)) and 0 < self.peak_fraction < 1):
            raise ValueError(f"TrainConfig.peak_fraction must be in (0, 1), got {self.peak_fraction!r}")
        _check_fraction(self.start_factor, "start_factor", closed=True)
        _check_fraction(self.final_factor, "final_factor", closed=True)
        _check_choice(self.averaging, "averaging", AVERAGING)
        _check_fraction(self.averaging_decay, "averaging_decay", closed=False)
        check_positive_int(self.averaging_every, "TrainConfig.averaging_every")
        check_positive_int(self.averaging_start_epoch, "TrainConfig.averaging_start_epoch")
        check_positive_int(self.snapshots, "TrainConfig.snapshots", minimum=0)


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
            val_<metric> (of the averaged weights when averaging is on), lr (of the first param
            group, at the epoch's last step), seconds.
        run_dir: the run folder.
        best_checkpoint: run_dir/checkpoints/best.pt.
    """

    best_metrics: dict[str, float]
    best_epoch: int
    history: list[dict[str, float]]
    run_dir: Path
    best_checkpoint: Path
