"""kill -9 + `--resume` of a vision run at a point the timing-based test of test_vision_cli.py
cannot choose: after the lookahead average (airbench94's, Keller Jordan 2024) has started and been
updated, in the middle of an epoch. The child process SIGKILLs itself right after writing the
checkpoint of step 9 of the smoke preset (2 epochs of 6 steps, a checkpoint every 3 steps, the
average from step 7, updated every 2 steps); the resumed run must end with bit-identical weights,
optimizer state and weight average to the uninterrupted one. Also with the experts' shared core
(its tensors are parametrizations') and with the Gumbel router (its noise is drawn from the global
random state mid-epoch, so the checkpoint's RNG state must carry it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

KILL_AT_STEP = 9
CHILD = """
import os, signal, sys
from dataclasses import replace
import moe_apps.training.loop as loop
import moe_apps.vision.config as vision_config
from moe_apps.cli import main

smoke = vision_config.smoke_preset()  # with the test's model options (expert_core has no CLI flag)
vision_config.PRESETS["smoke"] = lambda: replace(smoke, model=replace(smoke.model, **{changes}))

save = loop.save_checkpoint

def save_then_die(path, state, *args, **kwargs):
    save(path, state, *args, **kwargs)
    if path.name == "last.pt" and state.get("global_step") == {step}:
        os.kill(os.getpid(), signal.SIGKILL)

loop.save_checkpoint = save_then_die
sys.argv = ["moe-apps", *sys.argv[1:]]
main()
"""


def _train_args(out: Path, data: Path, *extra: str) -> list[str]:
    return ["vision", "train", "--preset", "smoke", "--out", str(out), "--data-dir", str(data),
            "--no-progress", *extra]


@pytest.mark.parametrize("changes", [{}, {"expert_core": True}, {"router": "gumbel"}], ids=["plain", "core", "gumbel"])
def test_kill_after_the_average_started_then_resume_is_exact(cifar_data: Path, tmp_path: Path, changes: dict) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "moe_apps.cli"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    script = CHILD.replace("{changes}", repr(changes))
    never = [sys.executable, "-c", script.replace("{step}", "-1")]
    subprocess.run(never + _train_args(whole, cifar_data), env=env, check=True, capture_output=True, timeout=300)
    child = [sys.executable, "-c", script.replace("{step}", str(KILL_AT_STEP))]
    died = subprocess.run(child + _train_args(killed, cifar_data), env=env, capture_output=True, text=True,
                          timeout=300)
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    state = torch.load(killed / "checkpoints" / "last.pt", weights_only=True)
    assert state["global_step"] == KILL_AT_STEP and state["step_in_epoch"] == 3
    assert state["averaging"]["state"] is not None and state["averaging"]["steps"] == 2  # updated once
    resumed = subprocess.run(cli + _train_args(killed, cifar_data, "--resume"), env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(whole / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(killed / "checkpoints" / "last.pt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 12
    assert any(".core.cores." in name for name in a["model"]) is bool(changes.get("expert_core"))
    assert any(".router.gate." in name for name in a["model"]) is (changes.get("router") == "gumbel")  # not .inner.gate
    for part in ("model", "averaging"):
        flat_a, flat_b = _tensors(a[part]), _tensors(b[part])
        assert flat_a.keys() == flat_b.keys() and flat_a
        for name in flat_a:
            assert torch.equal(flat_a[name], flat_b[name]), (part, name)
    for index, entry in a["optimizer"]["state"].items():
        for name, value in entry.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name]), (index, name)
    best_a = torch.load(whole / "checkpoints" / "best.pt", weights_only=True)["model"]
    best_b = torch.load(killed / "checkpoints" / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)


def _tensors(tree, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested dict, by its dotted path."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    if isinstance(tree, dict):
        out: dict[str, torch.Tensor] = {}
        for key, value in tree.items():
            out.update(_tensors(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {}
