"""`moe_apps.training.run_state`: the epoch row's means against sums written out by hand, and the
checkpoint form round trip (every field, the routing accumulator included)."""

from __future__ import annotations

import math

import pytest
import torch

from moe_apps.training.run_state import RunState, is_better
from moe_core.diagnostics import RoutingStats

CPU = torch.device("cpu")


def _stats(counts: list[int]) -> RoutingStats:
    counts_E = torch.tensor(counts)
    return RoutingStats(tokens_per_expert_E=counts_E, fraction_per_expert_E=counts_E / counts_E.sum(),
                        dropped_fraction=0.0, entropy=0.5, load_cv=0.25, dead_experts=0)


def _three_steps() -> RunState:
    run = RunState(epoch=2, global_step=20, best_metric=0.5, best_epoch=2, best_metrics={"loss": 0.5})
    for step, (loss, acc) in enumerate([(3.0, 0.1), (2.0, 0.2), (1.0, 0.6)]):
        run.add("train_loss", torch.tensor(loss), CPU)
        run.add("train_acc", acc, CPU, metric=True)
        run.add_routing("moe", _stats([3 + step, 5 - step]))
        run.step_in_epoch += 1
        run.global_step += 1
    return run


def test_epoch_row_means_over_the_steps() -> None:
    row = _three_steps().epoch_row({"loss": 0.4}, lr=0.01, seconds=7.0)
    assert row["epoch"] == 3
    assert row["train_loss"] == pytest.approx(2.0)  # (3 + 2 + 1) / 3
    assert row["train_acc"] == pytest.approx(0.3)  # (0.1 + 0.2 + 0.6) / 3
    assert row["val_loss"] == 0.4 and row["lr"] == 0.01 and row["seconds"] == 7.0
    assert row["routing_moe_entropy"] == pytest.approx(0.5)
    assert {"routing_moe_load_cv", "routing_moe_dead_experts", "routing_moe_dropped_fraction"} <= set(row)


def test_next_epoch_keeps_the_row_and_clears_the_sums() -> None:
    run = _three_steps()
    row = run.epoch_row({"loss": 0.4}, lr=0.01, seconds=7.0)
    run.next_epoch(row)
    assert (run.epoch, run.step_in_epoch, run.global_step) == (3, 0, 23)
    assert run.history == [row] and not run.sums and not run.metric_sums and not run.routing


def test_state_dict_round_trip() -> None:
    run = _three_steps()
    run.history, run.bad_epochs, run.seconds = [{"epoch": 1, "train_loss": 4.0}], 1, 12.5
    state = run.state_dict()
    assert all(v.device == CPU for v in state["sums"].values())
    back = RunState.from_state_dict(state, CPU)
    assert back.metadata() == run.metadata() and back.seconds == 12.5
    for name in ("sums", "metric_sums"):
        ours, theirs = getattr(run, name), getattr(back, name)
        assert ours.keys() == theirs.keys()
        assert all(theirs[k].dtype == torch.float64 and theirs[k] == ours[k] for k in ours)
    assert back.routing["moe"].summary() == run.routing["moe"].summary()


def test_non_finite_names_the_bad_sums() -> None:
    run = RunState()
    run.add("train_loss", 1.0, CPU)
    run.add("aux_z_loss", math.inf, CPU)
    assert run.non_finite() == ["aux_z_loss"]


@pytest.mark.parametrize(("value", "best", "mode", "expected"), [
    (1.0, None, "min", True), (1.0, 2.0, "min", True), (3.0, 2.0, "min", False),
    (3.0, 2.0, "max", True), (2.0, 2.0, "max", False), (math.nan, None, "min", False),
    (math.inf, 2.0, "max", False),
])
def test_is_better(value: float, best: float | None, mode: str, expected: bool) -> None:
    assert is_better(value, best, mode) is expected
