"""One short MMoE epoch on the real MovieLens 100K fold u1 (skipped when the data is absent)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console

from moe_apps.recsys.config import get_preset
from moe_apps.recsys.train import train


@pytest.mark.slow
def test_one_epoch_on_ml100k_beats_the_global_mean(shared_data: Path, tmp_path: Path) -> None:
    config = replace(get_preset("default"), epochs=1, batch_size=2048, device="cpu")
    outcome = train(config, tmp_path / "run", data_dir=shared_data, console=Console(quiet=True),
                    progress=False)
    test = outcome.test_metrics
    # predicting the global mean gives RMSE ~1.15 and AUC 0.5 on u1.test
    assert test["rating_rmse"] < 1.05
    assert test["like_auc"] > 0.70
    assert 0.99 < sum(v for k, v in test.items() if k.startswith("gate_like_")) < 1.01
    assert (tmp_path / "run" / "gates.png").is_file()
