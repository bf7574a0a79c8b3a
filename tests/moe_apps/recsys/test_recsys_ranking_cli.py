"""The `ranking` preset through the CLI: train (task mix, recbole split), eval --json with the
full-ranking keys, recommend by P(rate) x P(like | rate), export (and its refusals)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from moe_apps.cli import app

runner = CliRunner()
RANKING_KEYS = [f"{m}@{k}" for k in (10, 20) for m in ("recall", "ndcg", "hit", "mrr")]


def one_line_error(result, needle: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.output


@pytest.fixture(scope="module")
def ranking_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "ple-recbole"
    result = runner.invoke(app, ["recsys", "train", "--preset", "ranking", "--model", "ple",
                                 "--split", "recbole", "--epochs", "2", "--data-dir", str(data_root),
                                 "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    return out


def test_ranking_run_learns_three_tasks_and_reports_top_k(ranking_run: Path) -> None:
    config = json.loads((ranking_run / "config.json").read_text())["config"]
    assert [t["name"] for t in config["model"]["tasks"]] == ["rate", "like", "rating"]
    assert config["negatives"] == 4 and config["split"] == "recbole"
    test = json.loads((ranking_run / "test_metrics.json").read_text())["metrics"]
    for key in ("rate_auc", "like_auc", "rating_rmse", *RANKING_KEYS, "liked_ndcg@10", "users_evaluated"):
        assert key in test, key
    assert 0 < test["rate_auc"] < 1 and 0 <= test["ndcg@10"] <= 1
    gates = json.loads((ranking_run / "gates.json").read_text())
    assert gates["tasks"] == ["rate", "like", "rating"] and (ranking_run / "gates.png").is_file()


def test_eval_json_has_ranking_keys(ranking_run: Path, data_root: Path) -> None:
    result = runner.invoke(app, ["recsys", "eval", str(ranking_run), "--json", "--data-dir", str(data_root)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)["metrics"]
    stored = json.loads((ranking_run / "test_metrics.json").read_text())["metrics"]
    for key in RANKING_KEYS:
        assert metrics[key] == pytest.approx(stored[key], abs=1e-9)


def test_recommend_ranks_by_the_ranking_score(ranking_run: Path, data_root: Path) -> None:
    result = runner.invoke(app, ["recsys", "recommend", str(ranking_run), "--user", "3", "--top", "5",
                                 "--min-ratings", "0", "--data-dir", str(data_root)])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.strip().startswith("│ ")]
    scores = [[float(c) for c in row.split("│")[4:6]] for row in rows]
    # P(rate) was learned with `negatives` sampled unrated movies per fit rating: the list ranks by
    # the catalogue-corrected P(rate) (odds / ((I - n_u) / (negatives * n_u))) times P(like).
    from moe_apps.recsys.train import load_run
    loaded = load_run(ranking_run, data_dir=data_root)
    user = int(np.flatnonzero(loaded.run.data.users.raw_id == 3)[0])
    n_u = max(1, int((loaded.run.fit.user == user).sum()))
    r_u = (len(loaded.run.data.items) - n_u) / (loaded.config.negatives * n_u)
    products = [rate / (rate + (1 - rate) * r_u) * like for rate, like in scores]
    assert len(products) == 5  # shown rounded to 3 decimals, so allow their rounding
    assert all(a >= 0.98 * b - 2e-3 for a, b in zip(products, products[1:], strict=False))


def test_export_writes_a_program_and_refuses_an_existing_folder(ranking_run: Path, data_root: Path,
                                                                tmp_path: Path) -> None:
    out = tmp_path / "served"
    result = runner.invoke(app, ["recsys", "export", str(ranking_run), str(out), "--data-dir", str(data_root)])
    assert result.exit_code == 0, result.output
    info = json.loads((out / "export.json").read_text())
    assert info["score"] == "P(rate) x P(like | rate), P(rate) corrected for sampled negatives" and (out / "model.pt2").is_file()
    before = sorted(p.name for p in tmp_path.iterdir())
    one_line_error(runner.invoke(app, ["recsys", "export", str(ranking_run), str(out)]),
                   "already exists; choose a new export folder")
    one_line_error(runner.invoke(app, ["recsys", "export", str(tmp_path), str(tmp_path / "x")]),
                   "")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_ranking_ease_preset_trains_evaluates_and_exports_with_the_neighbourhood_score(
        data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "ease-run"
    result = runner.invoke(app, ["recsys", "train", "--preset", "ranking-ease", "--split", "recbole",
                                 "--epochs", "1", "--data-dir", str(data_root), "--out", str(out),
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["config"]["model"]["neighbourhood"] == 250.0
    evaluated = runner.invoke(app, ["recsys", "eval", str(out), "--json", "--data-dir", str(data_root)])
    assert evaluated.exit_code == 0, evaluated.output
    stored = json.loads((out / "test_metrics.json").read_text())["metrics"]
    for key in RANKING_KEYS:  # the reloaded run rebuilds the same cross-fitted scores
        assert json.loads(evaluated.output)["metrics"][key] == pytest.approx(stored[key], abs=1e-9)
    exported = runner.invoke(app, ["recsys", "export", str(out), str(tmp_path / "served"),
                                   "--data-dir", str(data_root)])
    assert exported.exit_code == 0, exported.output
