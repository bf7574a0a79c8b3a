"""The run lifecycle (moe_apps.training.run) and the shared CLI conventions (moe_apps.training.cli):
the folder lock (a second job refused, a kill -9'd holder does not leave it stuck), refusals that
write nothing, stale temp files, open_run, apply_overrides, checkpoint digests and loader errors,
one-line OS errors (a file-size limit), the exit codes and the shared train options."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import typer
from run_faults import alter_tensor_bytes
from typer.testing import CliRunner

from moe_apps.training.checkpoint import read_checkpoint, save_checkpoint
from moe_apps.training.cli import (
    EXIT_FAILURE,
    EXIT_USAGE,
    DeviceOpt,
    EpochsOpt,
    SeedOpt,
    guard,
    train_overrides,
)
from moe_apps.training.run import RunError, apply_overrides, check_run_folder, open_run, start_run

ROOT = Path(__file__).resolve().parents[2]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----- start_run / open_run ---------------------------------------------------------------------
def test_fresh_run_writes_config_and_refuses_a_second_fresh_run(tmp_path):
    out = tmp_path / "run"
    with start_run(out, app="demo", config={"lr": 0.1}, data_root="/data") as info:
        assert info.run_dir == out and info.config == {"lr": 0.1} and info.data_root == Path("/data")
    saved = json.loads((out / "config.json").read_text())
    assert saved == {"app": "demo", "config": {"lr": 0.1}, "data_root": "/data", "format": 1}
    save_checkpoint(out / "checkpoints" / "best.pt", {"model": {}})
    before = snapshot(out)
    with pytest.raises(RunError, match="already holds a run; pass --resume .* or choose another --out"):
        with start_run(out, app="demo", config={"lr": 0.2}, data_root=None):
            pass
    assert snapshot(out) == before


def test_a_run_killed_before_its_first_checkpoint_starts_over(tmp_path):
    """kill -9 in the first epoch leaves config.json and no checkpoint: the same train starts
    again there (nothing is lost), where --resume says so; another app's such folder stays refused."""
    out = tmp_path / "run"
    with start_run(out, app="demo", config={"lr": 0.1}, data_root="/data"):
        (out / "metrics.jsonl").write_text("")
    with pytest.raises(RunError, match="no checkpoints/last.pt .*train it again without --resume"):
        check_run_folder(out, app="demo", resume=True)
    with start_run(out, app="demo", config={"lr": 0.2}, data_root=None) as info:
        assert info.config == {"lr": 0.2}
    assert json.loads((out / "config.json").read_text())["config"] == {"lr": 0.2}
    with pytest.raises(RunError, match="already holds a run"):
        check_run_folder(out, app="vision")
    save_checkpoint(out / "checkpoints" / "best.pt", {"model": {}})  # as when a full disk stops last.pt
    with pytest.raises(RunError, match="no checkpoints/last.pt .*; delete it or choose another --out"):
        check_run_folder(out, app="demo", resume=True)
    with pytest.raises(RunError, match="already holds a run"):
        check_run_folder(out, app="demo")


def test_resume_keeps_or_replaces_the_config_and_needs_last_pt(tmp_path):
    out = tmp_path / "run"
    with start_run(out, app="demo", config={"epochs": 1}, data_root="/d"):
        pass
    before = snapshot(out)
    with pytest.raises(RunError, match="no checkpoints/last.pt to resume from .*without --resume"):
        with start_run(out, app="demo", config=None, data_root=None, resume=True):
            pass
    assert snapshot(out) == before
    save_checkpoint(out / "checkpoints" / "last.pt", {"model": {}})
    with start_run(out, app="demo", config=None, data_root=None, resume=True) as info:
        assert info.config == {"epochs": 1} and info.data_root == Path("/d")
    with start_run(out, app="demo", config={"epochs": 3}, data_root=None, resume=True) as info:
        assert info.data_root == Path("/d")  # the run's data folder is remembered
    assert json.loads((out / "config.json").read_text())["config"] == {"epochs": 3}
    with pytest.raises(RunError, match="is a demo run .*expected a run folder made by `moe-apps vision train`"):
        with start_run(out, app="vision", config=None, data_root=None, resume=True):
            pass


def test_stale_temp_files_are_removed_on_start_and_resume(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".config.json.ab12.tmp").write_bytes(b"")  # killed before config.json was renamed
    with start_run(out, app="demo", config={}, data_root=None):
        assert not list(out.rglob(".*.tmp"))
    save_checkpoint(out / "checkpoints" / "last.pt", {"model": {}})
    last = (out / "checkpoints" / "last.pt").read_bytes()
    stale = [out / "checkpoints" / ".last.pt.0f0f.tmp", out / ".metrics.jsonl.1234.tmp"]
    for path in stale:
        path.write_bytes(b"")
    with start_run(out, app="demo", config=None, data_root=None, resume=True):
        assert not any(p.exists() for p in stale)
    assert (out / "checkpoints" / "last.pt").read_bytes() == last


def test_resume_refuses_a_corrupted_last_pt_before_touching_config_json(tmp_path):
    out = tmp_path / "run"
    with start_run(out, app="demo", config={"epochs": 1}, data_root=None):
        save_checkpoint(out / "checkpoints" / "last.pt", {"model": {"w": torch.arange(64.0)}})
    alter_tensor_bytes(out / "checkpoints" / "last.pt")
    before = snapshot(out)
    with pytest.raises(RunError, match="last.pt fails its integrity check"):
        with start_run(out, app="demo", config={"epochs": 5}, data_root=None, resume=True):
            pass
    assert snapshot(out) == before


def test_open_run_says_what_the_folder_is(tmp_path):
    with pytest.raises(RunError, match="does not exist; expected a run folder made by `moe-apps recsys train`"):
        open_run(tmp_path / "nope", app="recsys")
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunError, match="is a file, not a run folder"):
        open_run(tmp_path / "file", app="recsys")
    with pytest.raises(RunError, match="is not a recsys run folder \\(it has no config.json\\)"):
        open_run(tmp_path, app="recsys")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(RunError, match="cannot be read as JSON"):
        open_run(tmp_path, app="recsys")
    (tmp_path / "config.json").write_text(json.dumps({"app": "vision", "config": {}}))
    with pytest.raises(RunError, match="is a vision run \\(config.json has app='vision'\\); expected"):
        open_run(tmp_path, app="recsys")
    # a run folder written before "format" existed still opens
    (tmp_path / "config.json").write_text(json.dumps({"app": "recsys", "config": {"a": 1}, "data_root": "/x"}))
    info = open_run(tmp_path, app="recsys")
    assert info.config == {"a": 1} and info.data_root == Path("/x")
    with pytest.raises(RunError, match="has no checkpoints/best.pt"):
        info.checkpoint("best")


# ----- the lock -------------------------------------------------------------------------------
HOLDER = """
import sys, time
from pathlib import Path
from moe_apps.training.checkpoint import save_checkpoint
from moe_apps.training.run import start_run
out = Path(sys.argv[1])
with start_run(out, app="demo", config={"seed": 1}, data_root=None, resume=(out / "config.json").exists()):
    save_checkpoint(out / "checkpoints" / "last.pt", {"model": {}})
    print("holding", flush=True)
    time.sleep(120)
"""


def _hold(out: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert holder.stdout.readline().strip() == "holding"
    return holder


def test_a_held_folder_is_refused_and_a_killed_holder_releases_it(tmp_path):
    out = tmp_path / "run"
    holder = _hold(out)
    try:
        before = snapshot(out)
        for resume in (False, True):
            with pytest.raises(RunError, match=f"held by another training job \\(pid {holder.pid}\\)"):
                check_run_folder(out, app="demo", resume=resume)
            with pytest.raises(RunError, match=f"held by another training job \\(pid {holder.pid}\\)"):
                with start_run(out, app="demo", config=None, data_root=None, resume=resume):
                    pass
        assert snapshot(out) == before
        assert open_run(out, app="demo").config == {"seed": 1}  # readers are never blocked
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with start_run(out, app="demo", config=None, data_root=None, resume=True) as info:
        assert info.config == {"seed": 1}
        assert (out / ".lock").read_text().strip() == str(os.getpid())


# ----- refusals before anything is written -----------------------------------------------------
def test_an_out_folder_that_cannot_be_created_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "run"
    with pytest.raises(RunError, match="cannot create the run folder .*file/run: .*file is a file"):
        check_run_folder(out, app="demo")
    with pytest.raises(RunError, match="file is a file"):
        with start_run(out, app="demo", config={}, data_root=None):
            pass


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_parent_is_one_line(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        with pytest.raises(RunError, match="is not writable; choose another --out"):
            check_run_folder(parent / "run", app="demo")
    finally:
        parent.chmod(0o700)


def test_a_read_only_parent_is_one_line_also_for_root(tmp_path, monkeypatch):
    """As the test above, where root writes anyway: the permission answers are simulated."""
    import errno

    from moe_apps.training import run as run_module

    parent = tmp_path / "ro"
    parent.mkdir()
    monkeypatch.setattr(run_module.os, "access", lambda path, mode: Path(path) != parent)
    with pytest.raises(RunError, match=f"cannot write the run folder {parent}/run: {parent} is not writable"):
        check_run_folder(parent / "run", app="demo")
    monkeypatch.undo()

    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(RunError, match=f"^cannot create the run folder {parent}/run: Permission denied; "):
        with start_run(parent / "run", app="demo", config={}, data_root=None):
            pass
    assert list(parent.iterdir()) == []


# ----- apply_overrides ------------------------------------------------------------------------
@dataclass(frozen=True)
class Inner:
    width: int = 4

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ValueError(f"width must be >= 1, got {self.width}")


@dataclass(frozen=True)
class Outer:
    epochs: int = 3
    seed: int = 0
    inner: Inner = field(default_factory=Inner)


def test_apply_overrides_nested_skips_none_and_validates():
    config = apply_overrides(Outer(), {"epochs": 5, "seed": None, "inner.width": 8})
    assert config == Outer(epochs=5, seed=0, inner=Inner(8))
    assert apply_overrides(Outer(), {"seed": None}) == Outer()
    with pytest.raises(ValueError, match="unknown option 'lr' for Outer; known fields: epochs, inner, seed"):
        apply_overrides(Outer(), {"lr": 1.0})
    with pytest.raises(ValueError, match="unknown option 'depth' for Inner"):
        apply_overrides(Outer(), {"inner.depth": 2})
    with pytest.raises(ValueError, match="'epochs' of Outer is not a nested config"):
        apply_overrides(Outer(), {"epochs.x": 2})
    with pytest.raises(ValueError, match="width must be >= 1"):
        apply_overrides(Outer(), {"inner.width": 0})
    assert train_overrides(epochs=2, seed=None, device="cpu", prefix="train.") == {
        "train.epochs": 2, "train.device": "cpu"}


# ----- checkpoints: digest and loader errors -----------------------------------------------------


def test_a_checkpoint_with_altered_bytes_fails_its_integrity_check(tmp_path):
    path = tmp_path / "best.pt"
    weights = {"w": torch.arange(64, dtype=torch.float32)}
    save_checkpoint(path, {"model": weights, "epoch": 1})
    assert torch.equal(read_checkpoint(path)["model"]["w"], weights["w"])
    alter_tensor_bytes(path)
    loaded = torch.load(path, weights_only=True)  # torch alone loads the altered tensor silently
    assert not torch.equal(loaded["model"]["w"], weights["w"])
    with pytest.raises(RunError, match=f"checkpoint {path} fails its integrity check"):
        read_checkpoint(path)


def test_torch_loader_errors_are_one_line_naming_the_file(tmp_path):
    import numpy as np

    path = tmp_path / "last.pt"
    torch.save({"format_version": 1, "model": np.zeros(3)}, path)  # refused by weights_only=True
    with pytest.raises(RunError) as caught:
        read_checkpoint(path)
    message = str(caught.value)
    assert f"checkpoint {path} cannot be read" in message and "\n" not in message
    assert "weights_only=False" not in message and "delete it" in message
    with pytest.raises(RunError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pt")


# ----- the CLI conventions ---------------------------------------------------------------------
demo = typer.Typer()


@demo.command()
def train(epochs: EpochsOpt = None, seed: SeedOpt = None, device: DeviceOpt = None,
          raise_: str = typer.Option("", "--raise")) -> None:
    def body() -> None:
        if raise_ == "value":
            raise ValueError("bad thing\nsecond line")
        if raise_ == "os":
            raise NotADirectoryError(20, "Not a directory", "/x/file/run")
        if raise_ == "bug":
            raise KeyError("a bug keeps its traceback")
        typer.echo(json.dumps(train_overrides(epochs=epochs, seed=seed, device=device)))

    guard(body)


@demo.command()
def other() -> None:
    """(a second command, so that `train` stays a sub-command)"""


runner = CliRunner()


def test_guard_gives_one_line_and_exit_1():
    result = runner.invoke(demo, ["train", "--raise", "value"])
    assert result.exit_code == EXIT_FAILURE == 1
    assert result.output.strip() == "error: bad thing second line"
    result = runner.invoke(demo, ["train", "--raise", "os"])
    assert result.exit_code == EXIT_FAILURE
    assert result.output.count("\n") == 1 and "Not a directory: /x/file/run" in result.output
    result = runner.invoke(demo, ["train", "--raise", "bug"])
    assert isinstance(result.exception, KeyError)


@pytest.mark.parametrize(("args", "names"), [
    (["--epochs", "0"], "--epochs"), (["--seed", "-1"], "--seed"), (["--device", "tpu"], "--device"),
])
def test_invalid_train_options_are_usage_errors_naming_the_option(args, names):
    result = runner.invoke(demo, ["train", *args])
    assert result.exit_code == EXIT_USAGE == 2
    assert f"Invalid value for '{names}'" in result.output


def test_device_cuda_without_cuda_is_a_usage_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = runner.invoke(demo, ["train", "--device", "cuda"])
    assert result.exit_code == EXIT_USAGE and "CUDA is not available on this machine" in result.output
    good = runner.invoke(demo, ["train", "--device", "cpu", "--epochs", "2", "--seed", "0"])
    assert good.exit_code == 0 and json.loads(good.output) == {"epochs": 2, "seed": 0, "device": "cpu"}


FSIZE_CLI = """
import resource, sys
import torch, typer
from moe_apps.training.cli import guard
from moe_apps.training.checkpoint import save_checkpoint
app = typer.Typer()
@app.command()
def main(out: str) -> None:
    guard(lambda: save_checkpoint(__import__("pathlib").Path(out), {"model": {"w": torch.zeros(100_000)}}))
@app.command()
def other() -> None: ...
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
app()
"""


def test_a_file_size_limit_is_one_line_naming_the_file(tmp_path):
    out = tmp_path / "checkpoints" / "last.pt"
    done = subprocess.run([sys.executable, "-c", FSIZE_CLI, "main", str(out)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "300"}, timeout=120)
    assert done.returncode == EXIT_FAILURE, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "File too large" in lines[0] and str(out) in lines[0], done.stderr
    assert not out.exists() and not list(out.parent.glob(".*.tmp"))


def test_stale_temp_cleanup_leaves_runs_below_the_folder_alone(tmp_path):
    out = tmp_path / "runs"
    with start_run(out / "other", app="demo", config={}, data_root=None):
        pass
    live = out / "other" / "checkpoints" / ".last.pt.0f0f1234.tmp"  # another job's write in progress
    live.parent.mkdir()
    live.write_bytes(b"")
    mine = out / ".config.json.ab12cd34.tmp"
    mine.write_bytes(b"")
    kept = out / "notes.tmp"  # not a temp name of moe_apps.atomic
    kept.write_bytes(b"")
    with start_run(out, app="demo", config={}, data_root=None):
        assert live.exists() and kept.exists() and not mine.exists()


def test_a_foreign_pickle_is_one_line_without_torch_warnings(tmp_path):
    import pickle
    import warnings

    path = tmp_path / "best.pt"
    path.write_bytes(pickle.dumps({"format_version": 1, "model": object}, protocol=4))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(RunError, match=f"checkpoint {path} cannot be read"):
            read_checkpoint(path)
    assert [str(w.message) for w in seen] == []
