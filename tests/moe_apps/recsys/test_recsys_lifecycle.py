"""The faults of issue 9 through `moe-apps recsys` (synthetic ML-100K, CliRunner): a held run folder,
checkpoints with altered bytes, invalid options, an unwritable --out, stale temp files, torch loader
errors, an eval split overlapping the training part, and folders that are not recsys runs. Each
refusal is one line, a non-zero exit, and leaves the folder as it was."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from run_faults import alter_tensor_bytes
from typer.testing import CliRunner

from moe_apps.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def run_copy(trained: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    return copy


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def resume_args(out: Path, data_root: Path, epochs: int = 3) -> list[str]:
    return ["recsys", "train", "--out", str(out), "--resume", "--epochs", str(epochs),
            "--data-dir", str(data_root), "--no-progress"]


# 1. one training job per run folder --------------------------------------------------------------
HOLDER = """
import sys, time
from moe_apps.training.run import start_run
with start_run(sys.argv[1], app="recsys", config=None, data_root=None, resume=True):
    print("holding", flush=True)
    time.sleep(120)
"""


def test_a_second_train_is_refused_and_a_kill_9_holder_does_not_block(run_copy: Path, data_root: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_copy)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "holding"
        before = snapshot(run_copy)
        one_line_error(runner.invoke(app, resume_args(run_copy, data_root)),
                       f"held by another training job (pid {holder.pid})")
        fresh = ["recsys", "train", "--preset", "tiny", "--out", str(run_copy), "--data-dir", str(data_root)]
        one_line_error(runner.invoke(app, fresh), "held by another training job")
        assert snapshot(run_copy) == before
        # eval of a run that is being trained reads its last complete checkpoint
        evaluated = runner.invoke(app, ["recsys", "eval", str(run_copy), "--json", "--data-dir", str(data_root)])
        assert evaluated.exit_code == 0, evaluated.output
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    resumed = runner.invoke(app, resume_args(run_copy, data_root))
    assert resumed.exit_code == 0, resumed.output
    rows = [json.loads(r) for r in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]


# 2. checkpoints with altered bytes --------------------------------------------------------------


def test_altered_checkpoints_are_refused_by_eval_recommend_and_resume(run_copy: Path, data_root: Path) -> None:
    best, last = run_copy / "checkpoints" / "best.pt", run_copy / "checkpoints" / "last.pt"
    alter_tensor_bytes(best)
    before = snapshot(run_copy)
    one_line_error(runner.invoke(app, ["recsys", "eval", str(run_copy), "--json", "--data-dir", str(data_root)]),
                   f"checkpoint {best} fails its integrity check")
    one_line_error(runner.invoke(app, ["recsys", "recommend", str(run_copy), "--user", "3", "--data-dir",
                                       str(data_root)]), "best.pt fails its integrity check")
    alter_tensor_bytes(last)
    before = snapshot(run_copy)
    one_line_error(runner.invoke(app, resume_args(run_copy, data_root)), "last.pt fails its integrity check")
    assert snapshot(run_copy) == before  # test_metrics.json not rewritten


# 3 and 7. invalid options, validated before anything is written --------------------------------
@pytest.mark.parametrize(("args", "option"), [
    (["--epochs", "0"], "--epochs"), (["--device", "tpu"], "--device"), (["--seed", "-1"], "--seed"),
    (["--device", "cuda"], "--device"),
])
def test_invalid_options_name_the_option_and_write_nothing(args, option, run_copy: Path, data_root: Path,
                                                           tmp_path: Path, monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fresh = tmp_path / "fresh"
    result = runner.invoke(app, ["recsys", "train", "--preset", "tiny", "--out", str(fresh), *args,
                                 "--data-dir", str(data_root), "--no-progress"])
    assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output, result.output
    assert not fresh.exists()
    before = snapshot(run_copy)
    result = runner.invoke(app, ["recsys", "train", "--out", str(run_copy), "--resume", *args, "--no-progress"])
    assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output, result.output
    assert snapshot(run_copy) == before
    # and the folder is still a run that resumes (not "already holds a run" / "stopped before ...")
    assert runner.invoke(app, resume_args(run_copy, data_root)).exit_code == 0


# 4. an --out that cannot be written ------------------------------------------------------------
def test_an_unwritable_out_is_one_line(data_root: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    result = runner.invoke(app, ["recsys", "train", "--preset", "tiny", "--out", str(tmp_path / "file" / "run"),
                                 "--data-dir", str(data_root), "--no-progress"])
    one_line_error(result, "cannot create the run folder", "file is a file")
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_is_one_line(data_root: Path, tmp_path: Path) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        result = runner.invoke(app, ["recsys", "train", "--preset", "tiny", "--out", str(parent / "run"),
                                     "--data-dir", str(data_root), "--no-progress"])
        one_line_error(result, "is not writable")
    finally:
        parent.chmod(0o700)


# 5. stale temp files ---------------------------------------------------------------------------
def test_stale_temp_files_are_removed_on_resume(run_copy: Path, data_root: Path) -> None:
    stale = [run_copy / "checkpoints" / ".last.pt.4b1d.tmp", run_copy / ".test_metrics.json.77aa.tmp"]
    for path in stale:
        path.write_bytes(b"")  # as a kill during a checkpoint write leaves them
    assert runner.invoke(app, resume_args(run_copy, data_root)).exit_code == 0
    assert not any(p.exists() for p in stale) and not list(run_copy.rglob(".*.tmp"))


# 6. torch loader errors ------------------------------------------------------------------------
def test_a_checkpoint_torch_cannot_load_safely_is_one_line(run_copy: Path, data_root: Path) -> None:
    import numpy as np
    import torch

    best = run_copy / "checkpoints" / "best.pt"
    torch.save({"format_version": 1, "model": np.zeros(3)}, best)  # weights_only=True refuses it
    before = snapshot(run_copy)
    result = runner.invoke(app, ["recsys", "eval", str(run_copy), "--data-dir", str(data_root)])
    one_line_error(result, f"checkpoint {best} cannot be read", "delete it")
    assert "weights_only" not in result.output
    assert snapshot(run_copy) == before


# 8. an eval split that overlaps the training part ----------------------------------------------
def test_eval_of_an_overlapping_split_is_refused_unless_allowed(trained: Path, data_root: Path) -> None:
    before = snapshot(trained)
    base = ["recsys", "eval", str(trained), "--json", "--data-dir", str(data_root)]
    one_line_error(runner.invoke(app, [*base, "--split", "u2"]),
                   "the test part of u2 shares", "training part of this run (split u1)", "--allow-overlap")
    allowed = runner.invoke(app, [*base, "--split", "u2", "--allow-overlap"])
    assert allowed.exit_code == 0, allowed.output
    payload = json.loads(allowed.stdout)
    assert payload["split"] == "u2" and payload["overlaps_training"] is True
    own = json.loads(runner.invoke(app, base).stdout)
    assert own["split"] == "u1" and own["overlaps_training"] is False
    assert snapshot(trained) == before


# eval / recommend on folders that are not recsys runs -----------------------------------------
@pytest.mark.parametrize("command", [["eval"], ["recommend", "--user", "1"]])
def test_not_a_run_or_another_apps_run_is_one_line(command, tmp_path: Path) -> None:
    one_line_error(runner.invoke(app, ["recsys", command[0], str(tmp_path), *command[1:]]),
                   "is not a recsys run folder (it has no config.json)", "`moe-apps recsys train`")
    (tmp_path / "config.json").write_text(json.dumps({"app": "vision", "config": {}}))
    before = snapshot(tmp_path)
    one_line_error(runner.invoke(app, ["recsys", command[0], str(tmp_path), *command[1:]]),
                   "is a vision run (config.json has app='vision')", "expected a run folder made by `moe-apps recsys train`")
    assert snapshot(tmp_path) == before
    one_line_error(runner.invoke(app, ["recsys", command[0], str(tmp_path / "absent"), *command[1:]]),
                   "does not exist")
    assert not (tmp_path / "absent").exists()


def test_a_run_folder_written_before_the_platform_still_opens(run_copy: Path, data_root: Path) -> None:
    """config.json without "format", checkpoints without a digest, no .lock: eval and resume work."""
    import torch

    config = json.loads((run_copy / "config.json").read_text())
    del config["format"]
    (run_copy / "config.json").write_text(json.dumps(config))
    for path in (run_copy / "checkpoints").glob("*.pt"):
        state = torch.load(path, weights_only=True)
        del state["sha256"]
        torch.save(state, path)
    (run_copy / ".lock").unlink()
    result = runner.invoke(app, ["recsys", "eval", str(run_copy), "--json", "--data-dir", str(data_root)])
    assert result.exit_code == 0, result.output
    saved = json.loads((run_copy / "test_metrics.json").read_text())["metrics"]
    assert json.loads(result.stdout)["metrics"]["like_auc"] == pytest.approx(saved["like_auc"], rel=1e-6)
    assert runner.invoke(app, resume_args(run_copy, data_root)).exit_code == 0
