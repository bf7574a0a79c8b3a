"""The app platform: one run lifecycle and one training loop every app shares (docs/ARCHITECTURE.md).

The app owns data, model, loss and metrics (a `Task`); `fit` owns device, precision, seeding,
optimizer/schedule, parameter groups, weight averaging, gradient clipping, MoE aux losses, early
stopping, checkpoint/resume and progress; `run` owns the run folder (start / resume / open, the
lock, config.json, overrides). Modules: `run` (start_run, open_run, apply_overrides, RunError;
no torch), `cli` (guard, exit codes, the shared Typer train options; no torch), `config`
(TrainConfig, Task, FitResult), `runtime` (seed, device, autocast, optimizer, schedule),
`averaging` (EMA / lookahead), `checkpoint` (digest-checked save / load, snapshot averaging),
`plots` (curves.png), `loop` (fit), `distributed` (fit under torchrun: DistContext,
DistributedModel, data_parallel_model).

Names are imported lazily, so ``from moe_apps.training.run import ...`` (and the CLIs) never load
torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_WHERE = {
    "RunError": "run", "RunInfo": "run", "start_run": "run", "open_run": "run",
    "check_run_folder": "run", "apply_overrides": "run",
    "FORMAT_VERSION": "checkpoint", "load_checkpoint": "checkpoint", "read_checkpoint": "checkpoint",
    "average_checkpoints": "checkpoint", "average_snapshots": "checkpoint", "list_snapshots": "checkpoint",
    "FitResult": "config", "Task": "config", "TrainConfig": "config",
    "fit": "loop",
    "DistContext": "distributed", "DistributedModel": "distributed", "current_context": "distributed",
    "data_parallel_model": "distributed",
    "WeightAverage": "averaging",
    "build_optimizer": "runtime", "build_scheduler": "runtime", "lr_factor": "runtime",
    "resolve_device": "runtime", "set_seed": "runtime",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'moe_apps.training' has no attribute {name!r}")
    value = getattr(import_module(f"moe_apps.training.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
