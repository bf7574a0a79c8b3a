"""The one training loop every app shares (see docs/ARCHITECTURE.md).

The app owns data, model, loss and metrics (a `Task`); `fit` owns device, precision, seeding,
optimizer/schedule, gradient clipping, MoE aux losses, early stopping, checkpoint/resume, progress
and the run folder. Modules: `config` (TrainConfig, Task, FitResult), `runtime` (seed, device,
autocast, optimizer, schedule), `checkpoint` (atomic save, safe load, config check), `plots`
(curves.png), `loop` (fit).
"""

from moe_apps.training.checkpoint import FORMAT_VERSION, load_checkpoint
from moe_apps.training.config import FitResult, Task, TrainConfig
from moe_apps.training.loop import fit
from moe_apps.training.runtime import (
    build_optimizer,
    build_scheduler,
    lr_factor,
    resolve_device,
    set_seed,
)

__all__ = [
    "FORMAT_VERSION", "FitResult", "Task", "TrainConfig", "build_optimizer", "build_scheduler",
    "fit", "load_checkpoint", "lr_factor", "resolve_device", "set_seed",
]
