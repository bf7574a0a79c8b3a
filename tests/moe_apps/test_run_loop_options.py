"""The options of the shared loop, each against a hand computation: the new schedules, SGD with
(Nesterov) momentum, AdamW betas, per-parameter-group lr scales and weight decay, EMA and lookahead
weight averaging, epoch snapshots and their average; and exact resume after SIGKILL with all of
them on (tests/moe_apps/training_problem.py VARIANTS)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import training_problem as P
from torch import Tensor, nn
from training_problem import one_thread  # noqa: F401 (autouse: one torch thread per test)

from moe_apps.training import TrainConfig, average_snapshots, fit, lr_factor, read_checkpoint


# ----- schedules ------------------------------------------------------------------------------
def test_inverse_sqrt_by_hand():
    # warmup 2: (s+1)/2, then sqrt(2 / (s + 1)) (Vaswani et al.: min(step/W, sqrt(W/step)), step = s+1)
    expected = [0.5, 1.0, math.sqrt(2 / 3), math.sqrt(2 / 4), math.sqrt(2 / 5), math.sqrt(2 / 6)]
    got = [lr_factor(s, schedule="inverse_sqrt", warmup_steps=2, total_steps=6) for s in range(6)]
    assert got == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("name", ["triangular", "onecycle"])
def test_triangular_by_hand(name):
    # 8 steps, no warmup, peak at progress 0.25 (step 2), from 0.2 up to 1, then down to 0 at the end
    expected = [0.2, 0.6, 1.0, 1 - 0.125 / 0.75, 1 - 0.25 / 0.75, 1 - 0.375 / 0.75, 1 - 0.5 / 0.75,
                1 - 0.625 / 0.75]
    got = [lr_factor(s, schedule=name, warmup_steps=0, total_steps=8, peak_fraction=0.25,
                     start_factor=0.2, final_factor=0.0) for s in range(8)]
    assert got == pytest.approx(expected, abs=1e-12)


# ----- a quadratic whose SGD / Adam trajectory is easy to follow by hand ------------------------
A, CENTER = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([1.0, -1.0, 2.0])


@dataclass
class Empty:
    def to(self, device: torch.device) -> Empty:
        return self


class Quadratic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([3.0, 0.5, -1.0]))
        self.v = nn.Parameter(torch.tensor([2.0, -2.0]))


def grad_w(w: Tensor) -> Tensor:
    return A * (w - CENTER)


def grad_v(v: Tensor) -> Tensor:
    return v - 0.5


class QuadraticTask:
    """loss = 0.5 sum a (w - c)^2 + 0.5 sum (v - 0.5)^2; evaluate records the weights it sees."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Tensor]] = []

    def training_loss(self, model, batch):
        loss = 0.5 * (A * (model.w - CENTER) ** 2).sum() + 0.5 * ((model.v - 0.5) ** 2).sum()
        return loss, {}

    def evaluate(self, model, batches):
        self.seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return {"loss": float(0.5 * (A * (model.w - CENTER) ** 2).sum())}


def run_quadratic(tmp_path, steps: int, epochs: int = 1, param_groups=None, **options):
    config = TrainConfig(**{"epochs": epochs, "lr": 0.1, "schedule": "constant", "grad_clip": None,
                            "device": "cpu", "progress": False, "patience": None,
                            "aux_loss_coefficients": (), **options})
    model, task = Quadratic(), QuadraticTask()
    result = fit(model, task, lambda epoch: [Empty()] * steps, lambda: [Empty()], config, tmp_path,
                 app="quadratic", model_config={}, param_groups=param_groups)
    return model, task, result


def test_nesterov_sgd_by_hand(tmp_path):
    lr, mu, wd = 0.1, 0.9, 0.01
    w, v = torch.tensor([3.0, 0.5, -1.0]), torch.tensor([2.0, -2.0])
    buf_w = buf_v = None
    for _ in range(5):
        g_w, g_v = grad_w(w) + wd * w, grad_v(v) + wd * v
        buf_w = g_w if buf_w is None else mu * buf_w + g_w
        buf_v = g_v if buf_v is None else mu * buf_v + g_v
        w, v = w - lr * (g_w + mu * buf_w), v - lr * (g_v + mu * buf_v)
    model, _, _ = run_quadratic(tmp_path, 5, optimizer="sgd", momentum=mu, nesterov=True, weight_decay=wd)
    assert torch.allclose(model.w.detach(), w, atol=1e-6) and torch.allclose(model.v.detach(), v, atol=1e-6)


def test_adamw_betas_and_eps_by_hand(tmp_path):
    lr, (b1, b2), eps, wd = 0.1, (0.8, 0.9), 1e-3, 0.1
    w = torch.tensor([3.0, 0.5, -1.0])
    m = s = torch.zeros(3)
    for t in range(1, 4):
        g = grad_w(w)
        w = w * (1 - lr * wd)
        m, s = b1 * m + (1 - b1) * g, b2 * s + (1 - b2) * g * g
        w = w - lr * (m / (1 - b1**t)) / ((s / (1 - b2**t)).sqrt() + eps)
    model, _, _ = run_quadratic(tmp_path, 3, optimizer="adamw", betas=(b1, b2), eps=eps, weight_decay=wd)
    assert torch.allclose(model.w.detach(), w, atol=1e-6)


def test_param_groups_scale_lr_and_set_weight_decay_under_the_schedule(tmp_path):
    factors = [1.0, 0.75, 0.5, 0.25]  # linear decay over 4 steps
    lr, wd, scale, group_wd = 0.1, 0.05, 4.0, 0.2
    w, v = torch.tensor([3.0, 0.5, -1.0]), torch.tensor([2.0, -2.0])
    for f in factors:  # plain SGD (momentum 0), L2 weight decay
        w = w - lr * scale * f * (grad_w(w) + group_wd * w)
        v = v - lr * f * (grad_v(v) + wd * v)
    groups = lambda model: [{"params": [model.w], "lr_scale": scale, "weight_decay": group_wd}]  # noqa: E731
    model, _, result = run_quadratic(tmp_path, 4, optimizer="sgd", momentum=0.0, weight_decay=wd,
                                     schedule="linear", param_groups=groups)
    assert torch.allclose(model.w.detach(), w, atol=1e-6) and torch.allclose(model.v.detach(), v, atol=1e-6)
    last = read_checkpoint(tmp_path / "checkpoints" / "last.pt")
    lrs = [g["lr"] for g in last["optimizer"]["param_groups"]]
    assert lrs == pytest.approx([lr * scale * 0.0, lr * 0.0], abs=1e-12)  # after the 4th step: factor 0
    assert result.history[0]["lr"] == pytest.approx(lr * scale * 0.25)  # first group, last step


@pytest.mark.parametrize("bad", [
    lambda m: [{"params": [m.w], "lr": 3.0}],
    lambda m: [{"params": [m.w]}, {"params": [m.w]}],
    lambda m: [{"params": [m.w], "lr_scale": -1.0}],
])
def test_bad_param_groups_are_clear_errors(tmp_path, bad):
    with pytest.raises(ValueError, match="param group"):
        run_quadratic(tmp_path, 1, param_groups=bad)


def sgd_path(steps: int, lr: float = 0.1) -> list[Tensor]:
    """w after each plain-SGD step (momentum 0, no decay)."""
    w, path = torch.tensor([3.0, 0.5, -1.0]), []
    for _ in range(steps):
        w = w - lr * grad_w(w)
        path.append(w)
    return path


def test_ema_by_hand_is_what_validation_and_best_pt_see(tmp_path):
    decay, every, steps = 0.6, 2, 4  # 2 epochs of 4 steps, average from epoch 2
    path = sgd_path(2 * steps)
    avg = path[steps].clone()  # a copy of the weights after the first step of epoch 2
    for count, w in enumerate(path[steps + 1:], start=1):
        if count % every == 0:
            avg = decay * avg + (1 - decay) * w
    model, task, result = run_quadratic(tmp_path, steps, epochs=2, optimizer="sgd", momentum=0.0,
                                        averaging="ema", averaging_decay=decay, averaging_every=every,
                                        averaging_start_epoch=2)
    assert torch.allclose(task.seen[0]["w"], path[steps - 1], atol=1e-6)  # epoch 1: no average yet
    assert torch.allclose(task.seen[1]["w"], avg, atol=1e-6)  # epoch 2 validated on the average
    last = read_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert torch.allclose(last["model"]["w"], path[-1], atol=1e-6)  # trained weights untouched
    best = read_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert result.best_epoch == 2 and torch.allclose(best["model"]["w"], avg, atol=1e-6)
    assert torch.allclose(model.w.detach(), avg, atol=1e-6)  # fit leaves the best (averaged) weights


def test_lookahead_by_hand(tmp_path):
    lr, decay, every, steps = 0.1, 0.5, 3, 8
    w = torch.tensor([3.0, 0.5, -1.0])
    avg = None
    for _ in range(steps):
        w = w - lr * grad_w(w)
        if avg is None:
            avg, count = w.clone(), 0
            continue
        count += 1
        if count % every == 0:
            avg = decay * avg + (1 - decay) * w
            w = avg.clone()  # the fast weights jump back to the slow ones
    _, task, _ = run_quadratic(tmp_path, steps, optimizer="sgd", momentum=0.0, averaging="lookahead",
                               averaging_decay=decay, averaging_every=every)
    last = read_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert torch.allclose(last["model"]["w"], w, atol=1e-6)
    assert torch.allclose(task.seen[0]["w"], avg, atol=1e-6)
    assert not torch.allclose(w, avg)  # synced at counts 3 and 6; the 7th step moved w again


def test_snapshots_keep_the_last_n_and_average_them(tmp_path):
    steps = 2
    path = sgd_path(3 * steps)
    run_quadratic(tmp_path, steps, epochs=3, optimizer="sgd", momentum=0.0, snapshots=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("epoch-*.pt"))
    assert names == ["epoch-0002.pt", "epoch-0003.pt"]
    averaged = average_snapshots(tmp_path, last=2)
    assert torch.allclose(averaged["w"], (path[3] + path[5]) / 2, atol=1e-6)
    assert torch.allclose(average_snapshots(tmp_path, last=1)["w"], path[5], atol=1e-6)
    with pytest.raises(ValueError, match="keeps 2 epoch snapshots, fewer than the 3"):
        average_snapshots(tmp_path, last=3)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("nesterov", True, "nesterov must be a bool and needs momentum > 0"),
    ("betas", (0.9, 1.0), "betas must be two numbers"),
    ("peak_fraction", 1.0, "peak_fraction must be in"),
    ("averaging", "swa", "averaging must be one of"),
    ("averaging_decay", 1.0, "averaging_decay must be in"),
    ("snapshots", -1, "snapshots must be >= 0"),
])
def test_bad_new_options_are_clear_errors(field, value, message):
    extra = {"momentum": 0.0} if field == "nesterov" else {}
    with pytest.raises(ValueError, match=f"TrainConfig.{message}"):
        TrainConfig(**{field: value, **extra})


# ----- exact resume with all the options on -----------------------------------------------------
def _state(path: Path) -> dict:
    return read_checkpoint(path)


@pytest.mark.parametrize("variant", ["sgd-triangular-lookahead", "adamw-inverse-sqrt-ema"])
def test_resume_after_sigkill_is_exact_with_the_loop_options(tmp_path, variant):
    reference = tmp_path / "reference"
    ref_model, ref_result = P.run(reference, P.RegressionTask(), variant=variant)
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(P.ROOT)}
    done = subprocess.run([sys.executable, str(P.SCRIPT), str(killed), "9", variant],
                          cwd=P.ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr  # killed at the start of step 10 (epoch 2, step 4)
    state = _state(killed / "checkpoints" / "last.pt")
    assert state["global_step"] == 9 and state["averaging"]["state"] is not None
    model, result = P.run(killed, P.RegressionTask(), resume=True, model_seed=99, variant=variant)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ref_model.state_dict()[name]), name
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(result.history) == strip(ref_result.history)
    ref_last, last = _state(reference / "checkpoints" / "last.pt"), _state(killed / "checkpoints" / "last.pt")
    for name, tensor in ref_last["averaging"]["state"].items():
        assert torch.equal(last["averaging"]["state"][name], tensor), name
    for name, tensor in ref_last["model"].items():
        assert torch.equal(last["model"][name], tensor), name
    assert [g["lr"] for g in last["optimizer"]["param_groups"]] == [
        g["lr"] for g in ref_last["optimizer"]["param_groups"]]
    assert [g["lr_scale"] for g in last["optimizer"]["param_groups"]] == [4.0, 1.0]
    ref_snaps = sorted(p.name for p in (reference / "checkpoints").glob("epoch-*.pt"))
    assert ref_snaps == sorted(p.name for p in (killed / "checkpoints").glob("epoch-*.pt"))
    for name in ref_snaps:
        a, b = _state(reference / "checkpoints" / name), _state(killed / "checkpoints" / name)
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_averages_cover_batchnorm_statistics_and_copy_integer_buffers():
    from moe_apps.training import WeightAverage

    model = nn.BatchNorm1d(2)
    average = WeightAverage("ema", decay=0.75, every=1, start_epoch=1)
    seen = []
    for k in range(3):
        model.train()
        model(torch.randn(8, 2, generator=torch.Generator().manual_seed(k)) * (k + 1))
        seen.append({n: t.clone() for n, t in model.state_dict().items()})
        average.after_step(model, epoch=0)
    mean = seen[0]["running_mean"]
    for state in seen[1:]:
        mean = 0.75 * mean + 0.25 * state["running_mean"]
    assert torch.allclose(average.state["running_mean"], mean, atol=1e-7)
    assert int(average.state["num_batches_tracked"]) == 3  # copied, not averaged
    with average.applied(model):
        assert torch.equal(model.running_mean, average.state["running_mean"])
    assert torch.equal(model.running_mean, seen[-1]["running_mean"])  # restored after the block


def test_a_full_disk_while_writing_metrics_names_the_file(tmp_path, monkeypatch):
    """metrics.jsonl goes through moe_apps.atomic like every other file: a write error (here a full
    disk, raised for that file only) names it."""
    import errno

    from moe_apps import atomic

    real = atomic._create_temp

    def full_disk(folder, prefix, suffix):
        if prefix.startswith(".metrics.jsonl") and (folder / "checkpoints" / "last.pt").exists():
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(folder, prefix, suffix)

    monkeypatch.setattr(atomic, "_create_temp", full_disk)
    train_batches, val_batches = P.batch_fns()
    with pytest.raises(OSError) as caught:
        fit(P.TinyMoE(), P.RegressionTask(), train_batches, val_batches,
            P.resume_config(epochs=1, checkpoint_every=None), tmp_path,
            app=P.APP, model_config=P.MODEL_CONFIG)
    assert caught.value.filename == str(tmp_path / "metrics.jsonl")
