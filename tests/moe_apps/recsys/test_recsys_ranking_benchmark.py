"""benchmarks/recsys_ranking.py end to end on a small synthetic ML-100K folder (one epoch)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from recsys_synthetic import write_random_ml100k

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "recsys_ranking.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("recsys_ranking", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_json_has_every_model_metric_and_difference(tmp_path: Path, capsys) -> None:
    write_random_ml100k(tmp_path)
    module = _load_script()
    threads = torch.get_num_threads()
    try:
        module.main(["--models", "pop,bpr,ease,shared_bottom,mmoe", "--folds", "u1,recbole", "--epochs", "1",
                     "--neighbourhood", "5", "--data-dir", str(tmp_path), "--json"])
    finally:
        torch.set_num_threads(threads)  # the script sets its own
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for model in ("pop", "bpr", "ease", "shared_bottom", "mmoe"):
        for key in ("ndcg@10", "recall@10", "hit@10", "mrr@10", "ndcg@20", "liked_ndcg@10"):
            assert len(result[model][key]["folds"]) == 2 and 0 <= result[model][key]["mean"] <= 1
    assert "by_rate_ndcg@10" in result["mmoe"]
    diff = result["differences"]["mmoe-shared_bottom ndcg@10"]
    assert diff["folds"] == [m - s for m, s in zip(result["mmoe"]["ndcg@10"]["folds"],
                                                    result["shared_bottom"]["ndcg@10"]["folds"], strict=True)]
    assert set(result["differences"]) >= {"bpr/pop ndcg@10 - 1", "mmoe/pop ndcg@10 - 1"}


def test_a_negative_neighbourhood_l2_is_refused(capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        _load_script().main(["--models", "mmoe", "--folds", "u1", "--neighbourhood", "-1"])
    assert stop.value.code == 2 and "--neighbourhood must be >= 0" in capsys.readouterr().err


def _one_fold_json(path: Path, fold: str, values: dict[str, float]) -> Path:
    """A hand-written one-fold output: every shown metric of a model = its value in ``values``."""
    keys = ("ndcg@10", "recall@10", "hit@10", "mrr@10", "ndcg@20", "recall@20", "liked_ndcg@10")
    raw = {model: {k: {"mean": v, "std": 0.0, "folds": [v]} for k in keys}
           | {"seconds": {"mean": 1.0, "std": 0.0, "folds": [1.0]}} for model, v in values.items()}
    path.write_text(json.dumps(raw | {"differences": {}, "fold_names": [fold]}))
    return path


def test_from_json_merges_folds_and_recomputes_differences(tmp_path: Path, capsys) -> None:
    module = _load_script()
    a = _one_fold_json(tmp_path / "a.json", "u1", {"pop": 0.2, "shared_bottom": 0.3, "mmoe": 0.35})
    b = _one_fold_json(tmp_path / "b.json", "u2", {"pop": 0.1, "shared_bottom": 0.25, "mmoe": 0.24})
    module.main(["--from-json", str(a), str(b), "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["fold_names"] == ["u1", "u2"]
    assert result["mmoe"]["ndcg@10"]["folds"] == [0.35, 0.24]
    assert abs(result["mmoe"]["ndcg@10"]["mean"] - 0.295) < 1e-12
    diff = result["differences"]["mmoe-shared_bottom ndcg@10"]
    assert [round(d, 12) for d in diff["folds"]] == [0.05, -0.01]
    assert abs(diff["std"] - 0.03) < 1e-12  # population std of +0.05 and -0.01
    ratio = result["differences"]["shared_bottom/pop ndcg@10 - 1"]["folds"]
    assert [round(r, 12) for r in ratio] == [0.5, 1.5]


def test_from_json_merges_models_of_one_fold_run_side_by_side(tmp_path: Path, capsys) -> None:
    module = _load_script()
    a = _one_fold_json(tmp_path / "a.json", "u1", {"shared_bottom": 0.3, "mmoe": 0.35})
    b = _one_fold_json(tmp_path / "b.json", "u2", {"shared_bottom": 0.25})
    c = _one_fold_json(tmp_path / "c.json", "u2", {"mmoe": 0.24})
    module.main(["--from-json", str(a), str(b), str(c), "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["fold_names"] == ["u1", "u2"]
    assert result["mmoe"]["ndcg@10"]["folds"] == [0.35, 0.24]
    assert result["shared_bottom"]["ndcg@10"]["folds"] == [0.3, 0.25]
    assert [round(d, 12) for d in result["differences"]["mmoe-shared_bottom ndcg@10"]["folds"]] == [0.05, -0.01]


def test_from_json_refuses_repeated_folds_missing_models_and_foreign_files(tmp_path: Path) -> None:
    module = _load_script()
    a = _one_fold_json(tmp_path / "a.json", "u1", {"pop": 0.2})
    b = _one_fold_json(tmp_path / "b.json", "u1", {"pop": 0.2, "mmoe": 0.3})
    c = _one_fold_json(tmp_path / "c.json", "u2", {"mmoe": 0.3})
    (tmp_path / "other.json").write_text('{"accuracy": 0.9}')
    for paths in ([a, a], [a, b], [a, c], [a, tmp_path / "other.json"]):
        with pytest.raises(SystemExit) as stop:
            module.main(["--from-json", *map(str, paths)])
        assert stop.value.code == 2, paths


def test_monitor_and_patience_reach_the_networks_config(tmp_path: Path, monkeypatch, capsys) -> None:
    import moe_apps.recsys.train as recsys_train

    write_random_ml100k(tmp_path)
    module = _load_script()
    seen = []

    def fake_train(config, out_dir, **kwargs):
        seen.append(config)
        raise RuntimeError("stop here")

    monkeypatch.setattr(recsys_train, "train", fake_train)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(RuntimeError, match="stop here"):
            module.main(["--models", "mmoe", "--folds", "recbole", "--patience", "3", "--monitor", "mrr@10",
                         "--data-dir", str(tmp_path)])
        with pytest.raises(SystemExit):
            module.main(["--models", "mmoe", "--monitor", "loss", "--data-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert (seen[0].monitor, seen[0].monitor_mode, seen[0].patience) == ("mrr@10", "max", 3)
    assert seen[0].epochs == 10  # the preset's
    assert "--monitor must be a validation ranking metric" in capsys.readouterr().err


def test_from_json_keeps_only_the_given_folds(tmp_path: Path, capsys) -> None:
    module = _load_script()
    a = _one_fold_json(tmp_path / "a.json", "u1", {"shared_bottom": 0.3, "mmoe": 0.35})
    b = _one_fold_json(tmp_path / "b.json", "recbole", {"shared_bottom": 0.2, "mmoe": 0.1})
    module.main(["--from-json", str(a), str(b), "--folds", "u1", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["fold_names"] == ["u1"] and result["mmoe"]["ndcg@10"]["folds"] == [0.35]
    with pytest.raises(SystemExit):
        module.main(["--from-json", str(a), "--folds", "u5"])
    assert "none of the files holds the folds ['u5']" in capsys.readouterr().err


def test_ease_baseline_ranks_by_a_per_movie_ridge_reference(tmp_path: Path) -> None:
    """The `ease` model's lists equal those of scores from per-movie ridge regressions (numpy)."""
    import numpy as np
    from test_recsys_neighbourhood import _ridge_columns

    from moe_apps.datasets import load_movielens
    from moe_apps.recsys.ranking import full_ranking
    from moe_apps.recsys.splits import protocol_parts

    write_random_ml100k(tmp_path)
    module = _load_script()
    data = load_movielens("movielens-100k", tmp_path)
    parts = protocol_parts(data, "recbole", 0, module.VAL_FRACTION)
    users, items = len(data.users), len(data.items)
    x = np.zeros((users, items))
    x[parts.fit.user, parts.fit.item] = 1.0
    scores = torch.as_tensor(x @ _ridge_columns(x, 7.0), dtype=torch.float32)
    seen, relevant, liked = module._masks(parts, users, items, parts.test)
    expected = full_ranking(lambda u: scores[u], seen, relevant, liked).metrics
    got = module.ease(data, parts, lam=7.0)
    for key in ("ndcg@10", "recall@10", "hit@10", "mrr@20", "liked_ndcg@10"):
        assert got[key] == pytest.approx(expected[key], abs=1e-9), key
    assert got["ndcg@10"] != pytest.approx(module.popularity(data, parts)["ndcg@10"], abs=1e-9)
