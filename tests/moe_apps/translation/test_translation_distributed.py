"""`moe-apps translation train --nproc 2`: two processes (torch's launcher, gloo) with each MoE
layer's experts split over them; the run folder evaluates in one process and resumes in one; a
world size that does not divide the expert count is one line before any work."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from moe_apps.cli import app
from moe_apps.training.checkpoint import read_checkpoint


def test_two_processes_train_a_run_that_one_process_evaluates_and_resumes(multi30k_root: Path, tmp_path: Path,
                                                                           monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    runner, out, data = CliRunner(), tmp_path / "two", ["--data-dir", str(multi30k_root)]
    trained = runner.invoke(app, ["translation", "train", "--preset", "smoke", "--nproc", "2", "--out", str(out),
                                  "--no-progress", *data])
    assert trained.exit_code == 0, trained.output
    last = read_checkpoint(out / "checkpoints" / "last.pt")
    assert len(last["rng_by_rank"]) == 2  # written by a 2-process job
    experts = [v for k, v in last["model"].items() if k.endswith("experts.w_in")]
    assert experts and all(v.shape[0] == 4 for v in experts)  # every expert, by global index
    assert len(last["history"]) == 2 and last["global_step"] == 2 * 2  # 4 updates a pass / 2 ranks
    assert {"routing.json", "spm.model", "train_summary.json", "metrics.jsonl"} <= {p.name for p in out.iterdir()}
    summary = json.loads((out / "train_summary.json").read_text())
    assert (summary["batches"], summary["optimizer_steps"]) == (2 * 4, 2 * 2)  # 2 epochs of 4 batches
    scored = runner.invoke(app, ["translation", "eval", str(out), "--split", "val", "--json", *data])
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.output)["sentences"] > 0
    resumed = runner.invoke(app, ["translation", "train", "--resume", "--out", str(out), "--epochs", "3",
                                  "--no-progress"])
    assert resumed.exit_code == 0, resumed.output
    state = read_checkpoint(out / "checkpoints" / "last.pt")
    assert len(state["history"]) == 3 and state["global_step"] == 2 * 2 + 4 and "rng_by_rank" not in state


def test_a_world_size_that_does_not_divide_the_experts_is_refused(multi30k_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "three"
    result = CliRunner().invoke(app, ["translation", "train", "--preset", "smoke", "--nproc", "3", "--out", str(out),
                                      "--data-dir", str(multi30k_root)])
    assert result.exit_code == 1
    line = " ".join(result.output.split())
    assert "3 processes cannot split 4 experts per layer evenly; use --nproc in [1, 2, 4]" in line
    assert not out.exists()
