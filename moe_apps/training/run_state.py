"""`RunState`: where one `fit` run stands (epoch and step, best epoch and early stopping, the
history, the epoch's running sums and routing statistics), with the two forms it takes outside
the loop: the fields of checkpoints/last.pt and the epoch's row of metrics.jsonl.

The sums are float64 tensors on the device, added without a host sync; they become numbers only
in `epoch_row`, once per epoch. Routing statistics are moe_core's `StatsAccumulator` per MoE
layer, summarised by `ROUTING_KEYS` (load CV, dead experts, dropped fraction, router entropy).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor

from moe_core.diagnostics import RoutingStats, StatsAccumulator

ROUTING_KEYS = ("load_cv", "dead_experts", "dropped_fraction", "entropy")
_BOOKKEEPING = ("epoch", "step_in_epoch", "global_step", "best_metric", "best_epoch", "bad_epochs",
                "stopped_early")


def is_better(value: float, best: float | None, mode: str) -> bool:
    """Whether ``value`` beats ``best`` for monitor mode "min" / "max"; never for NaN / inf."""
    if not math.isfinite(value):
        return False
    return best is None or (value < best if mode == "min" else value > best)


@dataclass
class RunState:
    """Where a run stands; all of it goes into checkpoints/last.pt."""

    epoch: int = 0  # 0-based index of the epoch being trained (== epochs done)
    step_in_epoch: int = 0  # steps of that epoch already done
    global_step: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None  # from 1
    best_metrics: dict[str, float] = field(default_factory=dict)
    bad_epochs: int = 0
    stopped_early: bool = False
    history: list[dict[str, float]] = field(default_factory=list)
    sums: dict[str, Tensor] = field(default_factory=dict)  # running float64 sums of this epoch
    metric_sums: dict[str, Tensor] = field(default_factory=dict)  # same, of the task's metrics
    routing: dict[str, StatsAccumulator] = field(default_factory=dict)  # per MoE layer name
    seconds: float = 0.0  # time spent in this epoch before a resume

    # ----- during an epoch ---------------------------------------------------------------------
    def add(self, name: str, value: Tensor | float, device: torch.device, *, metric: bool = False) -> None:
        """Add ``value`` to a float64 running sum on ``device`` (the task's metrics with
        ``metric=True``)."""
        sums = self.metric_sums if metric else self.sums
        value = torch.as_tensor(value).detach().to(device, torch.float64)
        total = sums.get(name)
        sums[name] = value if total is None else total + value

    def add_routing(self, name: str, stats: RoutingStats) -> None:
        self.routing.setdefault(name, StatsAccumulator()).update(stats)

    def non_finite(self) -> list[str]:
        """Names of the running sums that went NaN / inf."""
        return [k for k, v in self.sums.items() if not torch.isfinite(v)]

    # ----- the epoch's end ---------------------------------------------------------------------
    def epoch_row(self, metrics: Mapping[str, float], lr: float, seconds: float) -> dict[str, float]:
        """The metrics.jsonl row of the epoch being trained: means of the sums over its steps,
        routing summaries, ``val_``-prefixed validation metrics, the lr of its last step."""
        steps = self.step_in_epoch
        row: dict[str, float] = {"epoch": self.epoch + 1}
        row.update({k: (v / steps).item() for k, v in sorted(self.sums.items())})
        row.update({k: (v / steps).item() for k, v in sorted(self.metric_sums.items())})
        for layer, accumulator in sorted(self.routing.items()):
            summary = accumulator.summary()
            row.update({f"routing_{layer}_{k}": float(summary[k]) for k in ROUTING_KEYS})
        row.update({f"val_{k}": v for k, v in metrics.items()})
        row["lr"], row["seconds"] = lr, seconds
        return row

    def next_epoch(self, row: dict[str, float]) -> None:
        """Append the finished epoch's row and clear the sums for the next epoch."""
        self.history.append(row)
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.sums, self.metric_sums, self.routing, self.seconds = {}, {}, {}, 0.0

    # ----- checkpoint form ---------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        """The plain (tensor-free) fields, stored in every checkpoint."""
        return {**{k: getattr(self, k) for k in _BOOKKEEPING}, "best_metrics": dict(self.best_metrics),
                "history": [dict(row) for row in self.history]}

    def state_dict(self) -> dict[str, Any]:
        """`metadata` plus the epoch's sums (on the CPU), routing statistics and seconds."""
        return {
            **self.metadata(),
            "sums": {k: v.detach().cpu() for k, v in self.sums.items()},
            "metric_sums": {k: v.detach().cpu() for k, v in self.metric_sums.items()},
            "routing": {name: acc.state_dict() for name, acc in self.routing.items()},
            "seconds": self.seconds,
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], device: torch.device) -> RunState:
        as_sum = partial(torch.as_tensor, dtype=torch.float64, device=device)
        run = cls(**{k: state[k] for k in _BOOKKEEPING}, best_metrics=dict(state["best_metrics"]),
                  history=[dict(row) for row in state["history"]],
                  sums={k: as_sum(v) for k, v in state["sums"].items()},
                  metric_sums={k: as_sum(v) for k, v in state["metric_sums"].items()},
                  seconds=state["seconds"])
        for name, fields in state["routing"].items():
            run.routing[name] = StatsAccumulator()
            run.routing[name].load_state_dict(fields)
        return run
