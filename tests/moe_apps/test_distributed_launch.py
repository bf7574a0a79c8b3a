"""`--nproc N` and torch's launcher (moe_apps.training.cli): a rank killed mid-step stops the job
with one line naming it, and ``--resume`` continues from the last complete checkpoint to the same
weights as an uninterrupted run; the relaunch passes the given options on (minus --nproc, with the
resolved --out) and turns a failed rank into one line and exit code 1."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import distributed_problem
import pytest
import torch
import typer
from distributed_problem import STEPS_PER_EPOCH, Task, train
from typer.testing import CliRunner

from moe_apps.training import cli as training_cli
from moe_apps.training.checkpoint import read_checkpoint
from moe_apps.training.cli import (
    NprocOpt,
    OutOpt,
    ProgressOpt,
    guard,
    relaunch_with_torchrun,
    run_torchrun,
)

TOTAL, KILL_AT = 3 * STEPS_PER_EPOCH, 5  # rank 1 dies when step 5 starts: last.pt holds step 4


def test_a_killed_rank_stops_the_job_and_resume_continues(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    script, run = str(Path(distributed_problem.__file__)), tmp_path / "run"
    failure = run_torchrun(2, [script, str(run), "--kill-rank", "1", "--kill-at", str(KILL_AT)])
    assert failure is not None and (failure.rank, failure.exit_code, failure.signal) == (1, -9, "SIGKILL")
    message = failure.message(run)
    assert "\n" not in message and message.startswith("rank 1 (local rank 1) was killed by SIGKILL")
    assert f"Rerun with --resume --out {run} to continue from the last complete checkpoint" in message
    last = run / "checkpoints" / "last.pt"
    assert read_checkpoint(last)["global_step"] == KILL_AT - 1
    assert not list(run.rglob("*.tmp"))  # nothing half-written
    assert run_torchrun(2, [script, str(run), "--resume"]) is None
    resumed = read_checkpoint(last)
    assert resumed["global_step"] == TOTAL
    whole = tmp_path / "whole"  # the uninterrupted run, in one process with the same global batch
    train(whole, 1, Task(), merge=2)
    expected = read_checkpoint(whole / "checkpoints" / "last.pt")["model"]
    assert max((expected[k] - resumed["model"][k]).abs().max().item() for k in expected) <= 1e-5


def test_the_reported_rank_is_the_killed_one_not_the_ones_stopped_after_it():
    def failure(exitcode: int, timestamp: int = 5, local_rank: int = 0):
        name = {-9: "SIGKILL", -15: "SIGTERM"}.get(exitcode, "<N/A>")
        return SimpleNamespace(exitcode=exitcode, timestamp=timestamp, local_rank=local_rank, signal_name=lambda: name)

    killed = {0: failure(-15), 1: failure(-9, local_rank=1), 2: failure(1, timestamp=4)}
    assert training_cli.first_failure(killed) == training_cli.LaunchFailure(1, 1, -9, "SIGKILL")
    assert training_cli.first_failure({0: failure(-15, 3), 1: failure(1, 6)}).rank == 1
    assert training_cli.first_failure({0: failure(1, 6), 1: failure(1, 5)}).rank == 1
    assert training_cli.first_failure({3: failure(-15)}) == training_cli.LaunchFailure(3, 0, -15, "SIGTERM")


def _toy_app(calls: list) -> typer.Typer:
    app = typer.Typer()

    @app.command("train")
    def train_command(epochs: int = typer.Option(2, "--epochs"), out: OutOpt = None, progress: ProgressOpt = True,
                      nproc: NprocOpt = 1) -> None:
        guard(lambda: relaunch_with_torchrun(nproc, "toy", out=out or Path("runs/toy/default")))
        calls.append(("here", epochs))

    @app.callback()
    def _root() -> None:
        """toy"""

    return app


def test_relaunch_passes_the_options_on_and_a_failed_rank_is_one_line(monkeypatch, tmp_path):
    launched: list = []
    outcome: list = [None]
    monkeypatch.setattr(training_cli, "run_torchrun", lambda n, argv: launched.append((n, argv)) or outcome[0])
    calls: list = []
    app, runner = _toy_app(calls), CliRunner()
    out = tmp_path / "run"
    ok = runner.invoke(app, ["train", "--epochs", "3", "--no-progress", "--nproc", "2", "--out", str(out)])
    assert ok.exit_code == 0 and not calls, ok.output
    assert launched == [(2, ["-m", "moe_apps.cli", "toy", "train", "--epochs", "3", "--no-progress",
                             "--out", str(out)])]
    outcome[0] = training_cli.LaunchFailure(rank=1, local_rank=1, exit_code=-9, signal="SIGKILL")
    failed = runner.invoke(app, ["train", "--nproc", "2", "--out", str(out)])
    assert failed.exit_code == 1 and "Traceback" not in failed.output
    line = " ".join(failed.output.split())
    assert "rank 1 (local rank 1) was killed by SIGKILL (exit code -9); the launcher stopped the other ranks" in line
    assert "No checkpoint was saved yet: run the same command again to start afresh" in line  # no last.pt
    assert not out.exists()
    outcome[0] = training_cli.LaunchFailure(rank=0, local_rank=0, exit_code=1, signal=None)
    assert "rank 0 (local rank 0) exited with code 1 (its error is above)" in " ".join(
        runner.invoke(app, ["train", "--nproc", "2", "--out", str(out)]).output.split())
    outcome[0] = None
    default = runner.invoke(app, ["train", "--nproc", "2"])  # the resolved default --out goes to every rank
    assert default.exit_code == 0 and launched[-1][1][-2:] == ["--out", str(Path("runs/toy/default"))]
    assert runner.invoke(app, ["train", "--epochs", "4"]).exit_code == 0 and calls == [("here", 4)]
    monkeypatch.setenv("WORLD_SIZE", "2")  # already one of a torchrun job: train here, no relaunch
    monkeypatch.setenv("RANK", "1")
    count = len(launched)
    assert runner.invoke(app, ["train", "--nproc", "2", "--out", str(out)]).exit_code == 0
    assert len(launched) == count and calls[-1] == ("here", 2)


def test_a_bad_run_folder_is_refused_before_launching(monkeypatch, tmp_path):
    launched: list = []
    monkeypatch.setattr(training_cli, "run_torchrun", lambda n, argv: launched.append(argv))
    (tmp_path / "file").write_text("x")
    result = CliRunner().invoke(_toy_app([]), ["train", "--nproc", "2", "--out", str(tmp_path / "file" / "run")])
    assert result.exit_code == 1 and "is a file" in result.output and not launched


@pytest.fixture(autouse=True)
def _threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
