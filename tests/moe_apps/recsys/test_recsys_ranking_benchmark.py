"""benchmarks/recsys_ranking.py end to end on a small synthetic ML-100K folder (one epoch)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from recsys_synthetic import write_random_ml100k

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "recsys_ranking.py"


def test_benchmark_json_has_every_model_metric_and_difference(tmp_path: Path, capsys) -> None:
    write_random_ml100k(tmp_path)
    spec = importlib.util.spec_from_file_location("recsys_ranking", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        module.main(["--models", "pop,bpr,shared_bottom,mmoe", "--folds", "u1,recbole", "--epochs", "1",
                     "--data-dir", str(tmp_path), "--json"])
    finally:
        torch.set_num_threads(threads)  # the script sets its own
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for model in ("pop", "bpr", "shared_bottom", "mmoe"):
        for key in ("ndcg@10", "recall@10", "hit@10", "mrr@10", "ndcg@20", "liked_ndcg@10"):
            assert len(result[model][key]["folds"]) == 2 and 0 <= result[model][key]["mean"] <= 1
    assert "by_rate_ndcg@10" in result["mmoe"]
    diff = result["differences"]["mmoe-shared_bottom ndcg@10"]
    assert diff["folds"] == [m - s for m, s in zip(result["mmoe"]["ndcg@10"]["folds"],
                                                    result["shared_bottom"]["ndcg@10"]["folds"], strict=True)]
    assert set(result["differences"]) >= {"bpr/pop ndcg@10 - 1", "mmoe/pop ndcg@10 - 1"}
