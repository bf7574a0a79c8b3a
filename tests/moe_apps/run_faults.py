"""Faults every app's run folder must survive, as test helpers: a checkpoint with a few bytes
altered inside a tensor, and a training process killed with SIGKILL then resumed."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch


def alter_tensor_bytes(path: Path) -> None:
    """Overwrite 4 bytes in the middle of the largest tensor record of a torch zip checkpoint
    (the zip stays valid: torch does not check the records' CRC)."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        f.seek(info.header_offset + 30 + name_len + extra_len + info.file_size // 2)
        f.write(b"\x13\x37\xbe\xef")


def last_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]


def assert_kill_then_resume_is_exact(train_cmd: Callable[..., list[str]], tmp_path: Path,
                                     max_killed_step: int = 12) -> tuple[Path, Path]:
    """Train ``train_cmd(out)`` whole; train it again, SIGKILL it as soon as its first
    ``checkpoints/last.pt`` exists, resume it with ``train_cmd(out, "--resume")``; assert both
    runs end with bit-identical weights. Returns the (whole, killed) run folders."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(train_cmd(whole), env=env, check=True, capture_output=True, timeout=300)
    proc = subprocess.Popen(train_cmd(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 240
    while not last.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = torch.load(last, weights_only=True)
    assert state["global_step"] < max_killed_step, "the run ended before it was killed"
    resumed = subprocess.run(train_cmd(killed, "--resume"), env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = last_weights(whole), last_weights(killed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    return whole, killed
