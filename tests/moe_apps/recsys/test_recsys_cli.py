"""`moe-apps recsys train / eval / recommend` on a small synthetic ML-100K folder (CliRunner)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from moe_apps.cli import app

runner = CliRunner()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_train_writes_a_complete_run_folder(trained: Path) -> None:
    for name in ("config.json", "metrics.jsonl", "checkpoints/last.pt", "checkpoints/best.pt",
                 "curves.png", "gates.png", "gates.json", "test_metrics.json"):
        assert (trained / name).is_file(), name
    config = json.loads((trained / "config.json").read_text())
    assert config["app"] == "recsys" and config["config"]["model"]["model"] == "mmoe"
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    gate_keys = [k for k in rows[0] if k.startswith("val_gate_like_")]
    assert len(gate_keys) == 3 and abs(sum(rows[0][k] for k in gate_keys) - 1) < 1e-4
    gates = json.loads((trained / "gates.json").read_text())
    assert gates["tasks"] == ["like", "rating"] and len(gates["test"][0]) == 3
    assert (trained / "gates.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_json_matches_the_training_test_metrics(trained: Path, data_root: Path) -> None:
    result = runner.invoke(app, ["recsys", "eval", str(trained), "--json", "--data-dir", str(data_root)])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    saved = json.loads((trained / "test_metrics.json").read_text())["metrics"]
    assert payload["split"] == "u1" and payload["model"] == "mmoe"
    for key in ("like_auc", "like_logloss", "rating_rmse", "rating_mae"):
        assert payload["metrics"][key] == pytest.approx(saved[key], rel=1e-5)


def test_recommend_lists_unseen_movies_with_titles(trained: Path, data_root: Path) -> None:
    result = runner.invoke(app, ["recsys", "recommend", str(trained), "--user", "3", "--top", "4",
                                 "--data-dir", str(data_root)])
    assert result.exit_code == 0, result.output
    assert result.output.count("Movie ") == 4 and "p(like)" in result.output
    from moe_apps.datasets import load_movielens
    from moe_apps.recsys.train import load_run, recommend

    loaded = load_run(trained, data_root, load_movielens("movielens-100k", data_root))
    recs = recommend(loaded, 3, top=40, min_ratings=2)
    assert all(int(np.sum(loaded.run.train.item == np.flatnonzero(loaded.run.data.items.raw_id == r.item_id)[0])) >= 2 for r in recs)
    seen = set(loaded.run.data.items.raw_id[loaded.run.train.item[loaded.run.train.user == 2]])
    assert recs and not {r.item_id for r in recs} & seen
    likes = [r.scores["like"] for r in recs]
    assert likes == sorted(likes, reverse=True)


def test_unknown_user_fails_cleanly(trained: Path, data_root: Path) -> None:
    before = _snapshot(trained)
    result = runner.invoke(app, ["recsys", "recommend", str(trained), "--user", "9999",
                                 "--data-dir", str(data_root)])
    assert result.exit_code != 0 and "unknown user id 9999" in result.output
    assert _snapshot(trained) == before


def test_folder_that_is_not_a_recsys_run(tmp_path: Path) -> None:
    result = runner.invoke(app, ["recsys", "eval", str(tmp_path)])
    assert result.exit_code != 0 and "not a recsys run folder" in result.output
    (tmp_path / "config.json").write_text(json.dumps({"app": "vision"}))
    result = runner.invoke(app, ["recsys", "recommend", str(tmp_path), "--user", "1"])
    assert result.exit_code != 0 and "app='vision'" in result.output


def test_corrupted_checkpoint_fails_cleanly(trained: Path, data_root: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    best = copy / "checkpoints" / "best.pt"
    best.write_bytes(best.read_bytes()[:100])
    before = _snapshot(copy)
    result = runner.invoke(app, ["recsys", "eval", str(copy), "--data-dir", str(data_root)])
    assert result.exit_code != 0 and "cannot be read" in result.output
    assert _snapshot(copy) == before


def test_existing_run_is_not_overwritten(trained: Path, data_root: Path) -> None:
    before = _snapshot(trained)
    result = runner.invoke(app, ["recsys", "train", "--preset", "tiny", "--data-dir", str(data_root),
                                 "--out", str(trained), "--no-progress"])
    assert result.exit_code != 0 and "already holds a run" in result.output
    assert _snapshot(trained) == before


def test_resume_continues_and_rejects_changed_options(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    base = ["recsys", "train", "--preset", "tiny", "--data-dir", str(data_root), "--out", str(out),
            "--no-progress", "--model", "shared-bottom"]
    assert runner.invoke(app, [*base, "--epochs", "1"]).exit_code == 0
    changed = runner.invoke(app, ["recsys", "train", "--out", str(out), "--resume", "--model", "ple",
                                  "--data-dir", str(data_root), "--no-progress"])
    assert changed.exit_code != 0 and "differ" in changed.output
    # no --data-dir: the run's own data folder, not $MOE_APPS_DATA / ~/.cache
    resumed = runner.invoke(app, ["recsys", "train", "--out", str(out), "--resume", "--epochs", "2",
                                  "--no-progress"])
    assert resumed.exit_code == 0, resumed.output
    assert "resumed" in resumed.output and "epoch 1/2" not in resumed.output  # epoch 1 not redone
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2]
    assert not (out / "gates.png").exists()  # shared-bottom has no gates


def test_resume_before_the_first_checkpoint_says_what_to_do(data_root: Path, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "run"
    args = ["recsys", "train", "--preset", "tiny", "--epochs", "1", "--data-dir", str(data_root),
            "--out", str(out), "--no-progress"]
    assert runner.invoke(app, args).exit_code == 0
    shutil.rmtree(out / "checkpoints")  # as if killed during epoch 1: config.json, no checkpoint
    before = _snapshot(out)
    result = runner.invoke(app, [*args, "--resume"])
    assert result.exit_code != 0
    assert "no checkpoints/last.pt to resume from" in result.output and "delete" in result.output
    assert _snapshot(out) == before


def test_bad_options_exit_non_zero(data_root: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["recsys", "train", "--model", "moe", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "model must be one of" in result.output
    result = runner.invoke(app, ["recsys", "train", "--split", "u1", "--dataset", "movielens-1m",
                                 "--out", str(tmp_path / "y")])
    assert result.exit_code != 0 and "official ML-100K fold" in result.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_model_ple_takes_the_ple_preset(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "ple"
    result = runner.invoke(app, ["recsys", "train", "--model", "ple", "--epochs", "1", "--data-dir",
                                 str(data_root), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    model = json.loads((out / "config.json").read_text())["config"]["model"]
    assert model["model"] == "ple" and model["dropout"] == 0.3
    gates = json.loads((out / "gates.json").read_text())
    assert gates["experts"] == [["like0", "shared0", "shared1"], ["rating0", "shared0", "shared1"]]


def test_same_seed_gives_the_same_run(trained: Path, data_root: Path, tmp_path: Path) -> None:
    """The whole run, initial weights included, depends on --seed alone (not on RNG state left over)."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(12345)  # disturb the global RNG: a model built before seeding would differ
    again = tmp_path / "again"
    result = runner.invoke(app, ["recsys", "train", "--preset", "tiny", "--data-dir", str(data_root),
                                 "--out", str(again), "--no-progress"])
    assert result.exit_code == 0, result.output
    first = json.loads((trained / "test_metrics.json").read_text())["metrics"]
    second = json.loads((again / "test_metrics.json").read_text())["metrics"]
    assert first == second
