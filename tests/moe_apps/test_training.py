"""Tests of the shared training loop (moe_apps.training) on a tiny synthetic regression problem
(tests/moe_apps/training_problem.py): learning, aux losses, schedules, early stopping, checkpoints,
refusals, exact resume after SIGKILL and after in-process crashes, bf16 on CPU."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
import training_problem as P
from torch import Tensor, nn
from training_problem import one_thread  # noqa: F401 (autouse: one torch thread per test)

from moe_apps.training import (
    TrainConfig,
    build_optimizer,
    build_scheduler,
    fit,
    load_checkpoint,
    lr_factor,
)


def quiet(**overrides) -> TrainConfig:
    return P.resume_config(**{"checkpoint_every": None, **overrides})


def rows_without_time(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


# ----- learning, files, best weights ------------------------------------------------------------
def test_loss_decreases_and_run_folder_is_complete(tmp_path):
    task = P.RegressionTask()
    model, result = P.run(tmp_path, task, config=quiet(epochs=6, lr=2e-2))
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < 0.5 * losses[0], losses
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in lines] == [1, 2, 3, 4, 5, 6]
    assert rows_without_time(lines) == rows_without_time(result.history)
    for name in ("checkpoints/last.pt", "checkpoints/best.pt", "curves.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert not list((tmp_path / "checkpoints").glob(".*tmp")), "temp files left behind"
    # The model ends holding the best epoch's weights: re-evaluating gives the best val loss.
    _, val_batches = P.batch_fns()
    model.eval()
    with torch.no_grad():
        again = task.evaluate(model, val_batches())
    assert again["loss"] == pytest.approx(result.best_metrics["loss"], rel=1e-6)
    best = min(row["val_loss"] for row in result.history)
    assert result.best_metrics["loss"] == best
    assert result.history[result.best_epoch - 1]["val_loss"] == best
    # Routing stats of the layer are logged per epoch.
    assert 0.0 <= result.history[0]["routing_model_load_cv"] <= 1.0


def test_train_loss_is_task_plus_weighted_aux(tmp_path):
    coefficients = (("load_balance", 0.3), ("z_loss", 0.05))
    _, result = P.run(tmp_path, P.RegressionTask(), config=quiet(epochs=1, aux_loss_coefficients=coefficients))
    row = result.history[0]
    expected = row["train_mse"] + 0.3 * row["aux_load_balance"] + 0.05 * row["aux_z_loss"]
    assert row["train_loss"] == pytest.approx(expected, rel=1e-6)
    assert row["aux_load_balance"] >= 1.0 - 1e-6  # E * sum_e mean_prob_e^2 >= 1


class _AuxOnly(nn.Module):
    """The aux loss sum(p^2) is the only thing that depends on p; the task loss ignores p."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0]))
        self.p = nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))

    def forward(self, x: Tensor) -> Tensor:
        self.last_aux_losses = {"load_balance": self.p.pow(2).sum()}
        return self.w * x


class _LinearTask:
    def training_loss(self, model, batch):
        return (model(batch.x_BD) - batch.y_B).pow(2).mean(), {}

    def evaluate(self, model, batches):
        return {"loss": float(sum((model(b.x_BD) - b.y_B).pow(2).mean() for b in batches))}


class _TensorMetricTask(_LinearTask):
    """Logs its metric as a scalar tensor (kept on the device, no per-step host sync)."""

    def training_loss(self, model, batch):
        loss = (model(batch.x_BD) - batch.y_B).pow(2).mean()
        return loss, {"x_sum": batch.x_BD.sum(), "one": 1}


def test_task_metrics_may_be_tensors_or_numbers_and_are_epoch_means(tmp_path):
    batches = [P.Batch(torch.tensor([1.0, 2.0]), torch.zeros(2)), P.Batch(torch.tensor([6.0]), torch.zeros(1))]
    config = TrainConfig(epochs=1, lr=1e-9, optimizer="sgd", grad_clip=None, device="cpu", progress=False)
    result = fit(_AuxOnly(), _TensorMetricTask(), lambda epoch: batches, lambda: batches, config,
                 tmp_path, app="t", model_config={})
    row = result.history[0]
    assert row["train_x_sum"] == pytest.approx((3.0 + 6.0) / 2) and row["train_one"] == 1.0
    assert isinstance(row["train_x_sum"], float)


@pytest.mark.parametrize("coefficient", [0.0, 0.25])
def test_aux_coefficient_changes_the_gradient(tmp_path, coefficient):
    batch = P.Batch(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]))
    model = _AuxOnly()
    p0 = model.p.detach().clone()
    config = TrainConfig(epochs=1, lr=0.1, optimizer="sgd", schedule="constant", grad_clip=None,
                         device="cpu", progress=False, aux_loss_coefficients=(("load_balance", coefficient),))
    result = fit(model, _LinearTask(), lambda epoch: [batch], lambda: [batch], config, tmp_path,
                 app="t", model_config={})
    # One SGD step (first momentum step = the gradient): p1 = p0 - lr * coefficient * 2 * p0.
    assert torch.allclose(model.p.detach(), p0 - 0.1 * coefficient * 2 * p0, atol=1e-7)
    assert result.history[0]["aux_load_balance"] == pytest.approx(14.0)


class _SometimesExtra(_AuxOnly):
    """A second aux-loss layer that only the first forward uses (like an MoE layer a step skips)."""

    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Linear(1, 1)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        if self.calls == 1:
            self.extra.last_aux_losses = {"load_balance": torch.tensor(10.0) + 0 * self.extra.weight.sum()}
        return super().forward(x)


def test_aux_losses_of_layers_a_step_skipped_are_not_reused(tmp_path):
    batch = P.Batch(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]))
    config = TrainConfig(epochs=1, lr=1e-9, optimizer="sgd", schedule="constant", grad_clip=None,
                         device="cpu", progress=False, aux_loss_coefficients=(("load_balance", 1.0),))
    result = fit(_SometimesExtra(), _LinearTask(), lambda epoch: [batch, batch], lambda: [batch],
                 config, tmp_path, app="t", model_config={})
    # step 1: 14 + 10, step 2: 14 only (a stale 10 would also fail backward: its graph is freed)
    assert result.history[0]["aux_load_balance"] == pytest.approx((24.0 + 14.0) / 2)


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
    class NanTask(_LinearTask):
        def training_loss(self, model, batch):
            return model(batch.x_BD).sum() * float("nan"), {}

    batch = P.Batch(torch.tensor([1.0]), torch.tensor([0.0]))
    with pytest.raises(FloatingPointError, match="non-finite .*train_loss in epoch 1 by step 1"):
        fit(_AuxOnly(), NanTask(), lambda epoch: [batch], lambda: [batch], quiet(epochs=1), tmp_path,
            app="t", model_config={})
    assert not (tmp_path / "checkpoints" / "last.pt").exists()


# ----- schedule ---------------------------------------------------------------------------------
C1, C3 = 0.5 * (1 + math.cos(math.pi / 4)), 0.5 * (1 + math.cos(3 * math.pi / 4))
SCHEDULES = {  # warmup 2 ((s+1)/2), then 4 decay steps with progress 0, 1/4, 1/2, 3/4
    "cosine": [0.5, 1.0, 1.0, C1, 0.5, C3],
    "linear": [0.5, 1.0, 1.0, 0.75, 0.5, 0.25],
    "constant": [0.5, 1.0, 1.0, 1.0, 1.0, 1.0],
}


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_schedule_values_match_hand_computed(schedule):
    config = TrainConfig(lr=2.0, schedule=schedule, warmup_steps=2, optimizer="sgd")
    model = nn.Linear(1, 1)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, total_steps=6)
    seen = []
    for _ in range(6):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([2.0 * f for f in SCHEDULES[schedule]], abs=1e-12)
    assert [lr_factor(s, schedule=schedule, warmup_steps=2, total_steps=6) for s in range(6)] == (
        pytest.approx(SCHEDULES[schedule], abs=1e-12))


def test_history_lr_is_that_of_each_epochs_last_step(tmp_path):
    config = quiet(epochs=2, lr=1.0, schedule="linear", warmup_steps=0)  # 6 steps per epoch
    _, result = P.run(tmp_path, P.RegressionTask(), config=config)
    assert [row["lr"] for row in result.history] == pytest.approx([1 - 5 / 12, 1 - 11 / 12])


# ----- early stopping ---------------------------------------------------------------------------
class ScriptedTask(P.RegressionTask):
    """evaluate() returns predefined values and keeps a copy of the weights it was shown."""

    def __init__(self, values, key="loss"):
        super().__init__()
        self.values, self.key, self.seen = list(values), key, []

    def evaluate(self, model, batches):
        self.seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return {self.key: self.values[len(self.seen) - 1], "other": 1.0}


@pytest.mark.parametrize(("mode", "values", "patience", "best_epoch", "epochs_run"), [
    ("min", [5.0, 4.0, 4.5, 4.2, 4.1, 3.0, 2.0], 3, 2, 5),
    ("max", [0.1, 0.3, 0.2, 0.3, 0.25, 0.9], 2, 2, 4),  # an equal value is no improvement
    ("min", [3.0, 2.0, 1.0], 1, 3, 3),
])
def test_early_stopping_on_scripted_metric(tmp_path, mode, values, patience, best_epoch, epochs_run):
    task = ScriptedTask(values, key="acc")
    config = quiet(epochs=len(values), monitor="acc", monitor_mode=mode, patience=patience)
    model, result = P.run(tmp_path, task, config=config)
    assert len(result.history) == epochs_run == len(task.seen)
    assert result.best_epoch == best_epoch
    assert result.best_metrics == {"acc": values[best_epoch - 1], "other": 1.0}
    for name, tensor in model.state_dict().items():  # left holding the best epoch's weights
        assert torch.equal(tensor, task.seen[best_epoch - 1][name]), name
    meta = load_checkpoint(result.best_checkpoint, P.TinyMoE(), app=P.APP, model_config=P.MODEL_CONFIG)
    assert meta["best_epoch"] == best_epoch


def test_unknown_monitor_key_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="monitor='acc'.*'loss'"):
        P.run(tmp_path, P.RegressionTask(), config=quiet(epochs=1, monitor="acc"))


# ----- checkpoints ------------------------------------------------------------------------------
def test_checkpoint_roundtrip(tmp_path):
    model, result = P.run(tmp_path, P.RegressionTask(), config=quiet(epochs=2, patience=None))
    fresh = P.TinyMoE()
    meta = load_checkpoint(tmp_path / "checkpoints" / "last.pt", fresh, app=P.APP, model_config=P.MODEL_CONFIG)
    assert meta["epoch"] == 2 and meta["global_step"] == 12 and meta["app"] == P.APP
    assert meta["model_config"] == P.MODEL_CONFIG
    assert rows_without_time(meta["history"]) == rows_without_time(result.history)
    best = P.TinyMoE()
    load_checkpoint(result.best_checkpoint, best, app=P.APP)
    for (name, a), b in zip(model.state_dict().items(), best.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_config_mismatch_names_the_key(tmp_path):
    P.run(tmp_path, P.RegressionTask(), config=quiet(epochs=1))
    path = tmp_path / "checkpoints" / "best.pt"
    other = {**P.MODEL_CONFIG, "num_experts": 4}
    with pytest.raises(ValueError, match="trained with num_experts=2, this model has num_experts=4"):
        load_checkpoint(path, P.TinyMoE(), app=P.APP, model_config=other)
    with pytest.raises(ValueError, match="this model has no hidden"):
        load_checkpoint(path, P.TinyMoE(), app=P.APP, model_config={"d_in": 4, "num_experts": 2})
    with pytest.raises(ValueError, match="app 'synthetic', not 'vision'"):
        load_checkpoint(path, P.TinyMoE(), app="vision")
    with pytest.raises(ValueError, match="num_experts"):
        fit(P.TinyMoE(), P.RegressionTask(), *P.batch_fns(), quiet(epochs=1), tmp_path,
            app=P.APP, model_config=other, resume=True)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupted_checkpoint_error_names_the_file(tmp_path, damage):
    P.run(tmp_path, P.RegressionTask(), config=quiet(epochs=1))
    path = tmp_path / "checkpoints" / "last.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a checkpoint" * 10)
    with pytest.raises(ValueError, match=f"checkpoint {path} cannot be read"):
        load_checkpoint(path, P.TinyMoE(), app=P.APP)
    with pytest.raises(ValueError, match="last.pt cannot be read"):
        P.run(tmp_path, P.RegressionTask(), resume=True, config=quiet(epochs=1))


def _fit_only(run_dir, *, resume=False):
    """fit without the run lifecycle around it (its own refusals)."""
    torch.manual_seed(0)
    return fit(P.TinyMoE(), P.RegressionTask(), *P.batch_fns(), quiet(epochs=1), run_dir, app=P.APP,
               model_config=P.MODEL_CONFIG, resume=resume)


def test_fit_refuses_to_overwrite_and_to_resume_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="resume=True but .*last.pt does not exist"):
        _fit_only(tmp_path / "new", resume=True)
    _fit_only(tmp_path)
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()}
    metrics = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(FileExistsError, match="already has checkpoints .*resume=True"):
        _fit_only(tmp_path)
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()} == before
    assert (tmp_path / "metrics.jsonl").read_text() == metrics


# ----- exact resume -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (no mid-epoch checkpoints): final weights and history."""
    torch.set_num_threads(1)
    model, result = P.run(tmp_path_factory.mktemp("ref"), P.RegressionTask(),
                          config=P.resume_config(checkpoint_every=None))
    return model.state_dict(), result


def assert_same_run(model, result, reference):
    ref_state, ref_result = reference
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ref_state[name]), name
    assert rows_without_time(result.history) == rows_without_time(ref_result.history)
    assert result.best_epoch == ref_result.best_epoch
    assert result.best_metrics == ref_result.best_metrics


def test_resume_after_sigkill_mid_epoch_is_exact(tmp_path, reference):
    env = {**os.environ, "PYTHONPATH": str(P.ROOT)}
    done = subprocess.run([sys.executable, str(P.SCRIPT), str(tmp_path), "8"],
                          cwd=P.ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr  # killed at the start of step 9 (epoch 2, step 3)
    meta = load_checkpoint(tmp_path / "checkpoints" / "last.pt", P.TinyMoE(), app=P.APP)
    assert (meta["epoch"], meta["step_in_epoch"], meta["global_step"]) == (1, 2, 8)
    model, result = P.run(tmp_path, P.RegressionTask(), resume=True, model_seed=123)
    assert_same_run(model, result, reference)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


@pytest.mark.parametrize("crash", [{"crash_at_step": 6}, {"crash_at_eval": 2}, {"crash_at_step": 13}])
def test_resume_after_crash_at_epoch_edges_is_exact(tmp_path, reference, crash):
    """Crash at an epoch boundary (step 7 starts epoch 2), after all steps of epoch 2 but before
    its validation, and at the first step of epoch 3."""
    with pytest.raises(RuntimeError, match="simulated crash"):
        P.run(tmp_path, P.RegressionTask(**crash))
    model, result = P.run(tmp_path, P.RegressionTask(), resume=True, model_seed=7)
    assert_same_run(model, result, reference)


def test_resume_of_a_finished_run_trains_nothing(tmp_path, reference):
    P.run(tmp_path, P.RegressionTask())
    task = P.RegressionTask()
    model, result = P.run(tmp_path, task, resume=True, model_seed=5)
    assert task.steps == 0 and task.evals == 0
    assert_same_run(model, result, reference)


@pytest.mark.parametrize("progress", [True, False])
def test_console_gets_epoch_lines_and_step_lines(tmp_path, progress):
    from rich.console import Console

    console = Console(file=io.StringIO(), width=300)
    torch.manual_seed(0)
    fit(P.TinyMoE(), P.RegressionTask(), *P.batch_fns(), quiet(epochs=2, progress=progress, log_every=3),
        tmp_path, app=P.APP, model_config=P.MODEL_CONFIG, console=console)
    text = console.file.getvalue()
    assert "epoch 1/2  aux_load_balance" in text and "epoch 2/2  aux_load_balance" in text
    assert ("epoch 2 step 6: loss" in text) is (not progress)


# ----- precision, config checks -----------------------------------------------------------------
def test_bf16_autocast_on_cpu_trains_with_fp32_weights(tmp_path):
    task = P.RegressionTask()
    model, result = P.run(tmp_path, task, config=quiet(epochs=4, precision="bf16", lr=2e-2))
    assert set(task.output_dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert all(math.isfinite(v) for row in result.history for v in row.values())


@dataclass
class _NotABatch:
    x: Tensor


@pytest.mark.parametrize(("field", "value", "message"), [
    ("epochs", 0, "epochs must be >= 1"),
    ("lr", -1.0, "lr must be a finite number > 0"),
    ("optimizer", "lion", "optimizer must be one of"),
    ("schedule", "step", "schedule must be one of"),
    ("precision", "fp16", "precision must be one of"),
    ("device", "tpu", "device must be"),
    ("grad_clip", 0.0, "grad_clip must be > 0 or None"),
    ("monitor_mode", "up", "monitor_mode must be one of"),
    ("patience", 0, "patience must be >= 1"),
    ("aux_loss_coefficients", (("load_balance", -1.0),), "aux_loss_coefficients must be"),
])
def test_bad_config_is_a_clear_value_error(field, value, message):
    with pytest.raises(ValueError, match=f"TrainConfig.{message}"):
        TrainConfig(**{field: value})


def test_bad_inputs_to_fit_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown coefficient name 'zloss'"):
        P.run(tmp_path / "a", P.RegressionTask(), config=quiet(aux_loss_coefficients=(("zloss", 0.1),)))
    with pytest.raises(ValueError, match=r"\.to\(device\) method"):
        fit(P.TinyMoE(), P.RegressionTask(), lambda e: [_NotABatch(torch.zeros(1))], lambda: [],
            quiet(), tmp_path / "b", app="t", model_config={})
    with pytest.raises(ValueError, match="gave no batches"):
        fit(P.TinyMoE(), P.RegressionTask(), lambda e: [], lambda: [], quiet(), tmp_path / "c",
            app="t", model_config={})
