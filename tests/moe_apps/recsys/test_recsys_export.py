"""The exported serving model: scores equal the eager model's in a process that cannot import
moe_apps; unknown ids score NaN; an existing export folder is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_recsys_protocols import _random_data

from moe_apps.recsys.config import ModelConfig, RecsysConfig, with_vocab
from moe_apps.recsys.data import build_features, make_batch
from moe_apps.recsys.export import export_model
from moe_apps.recsys.model import build_model
from moe_apps.recsys.ranking import ranking_score
from moe_apps.recsys.splits import protocol_parts

REPO = Path(__file__).resolve().parents[3]

# Runs with `python -I` (no cwd, PYTHONPATH or user site on sys.path); it also drops every path
# inside the repository but outside the interpreter's prefix (the venv) and blocks moe_apps / moe_core / torchrec (an editable install adds a
# finder), then checks that they cannot be imported before loading the program.
LOADER = r"""
import importlib.abc, json, sys
repo = sys.argv[1]
sys.path[:] = [p for p in sys.path if not p.startswith(repo) or p.startswith(sys.prefix)]
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("moe_apps", "moe_core", "torchrec"):
            raise ImportError(f"{name} is blocked in this process")
sys.meta_path.insert(0, Block())
for name in ("moe_apps", "moe_core", "torchrec"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} is importable")
import torch
program = torch.export.load(sys.argv[2]).module()
queries = json.loads(sys.argv[3])
print(json.dumps([program(torch.tensor(u), torch.tensor(items)).tolist() for u, items in queries]))
"""


def _model(kind: str, neighbourhood: float = 0.0):
    data = _random_data()
    parts = protocol_parts(data, "random", seed=0, val_fraction=0.1)
    features = build_features(data, parts.fit, neighbourhood)
    config = with_vocab(RecsysConfig(monitor="loss", model=ModelConfig(
        model=kind, embedding_dim=4, num_experts=3, expert_dim=5, tower_dim=3,
        neighbourhood=neighbourhood)), features.vocab)
    torch.manual_seed(1)
    model = build_model(config.model).eval()
    for p in model.parameters():  # away from the initial zeros, so every table matters
        p.data.add_(0.3 * torch.randn_like(p))
    return data, features, config, model


@pytest.mark.parametrize(("kind", "neighbourhood"), [("mmoe", 0.0), ("single", 0.0), ("mmoe", 5.0)])
def test_exported_scores_equal_eager_in_a_process_without_moe_apps(kind: str, neighbourhood: float,
                                                                   tmp_path: Path) -> None:
    data, features, config, model = _model(kind, neighbourhood)
    tasks = config.model.tasks
    info = export_model(model, features, tasks, data.users.raw_id, data.items.raw_id, tmp_path / "out")
    assert info.program.is_file() and json.loads((tmp_path / "out" / "export.json").read_text())["score"] == "P(like)"
    queries = [(1, [1, 2, 60, 33]), (40, list(range(1, 61))), (17, [5]), (999, [1, 2]), (3, [0, 61, 7])]
    done = subprocess.run([sys.executable, "-I", "-c", LOADER, str(REPO), str(info.program),
                           json.dumps(queries)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    served = json.loads(done.stdout)
    for (user, items), got in zip(queries[:3], served[:3], strict=True):
        u = int(np.flatnonzero(data.users.raw_id == user)[0])
        i = torch.as_tensor([int(np.flatnonzero(data.items.raw_id == m)[0]) for m in items])
        with torch.no_grad():
            out = model(make_batch(features, tasks, torch.full_like(i, u), i, None))
        np.testing.assert_allclose(got, ranking_score(out.predictions_BT, tasks).numpy(), rtol=1e-5, atol=1e-6)
    assert all(np.isnan(served[3]))  # unknown user: every score NaN
    assert np.isnan(served[4][0]) and np.isnan(served[4][1]) and not np.isnan(served[4][2])


def test_exported_ranking_mix_scores_use_each_users_sampling_correction(tmp_path: Path) -> None:
    from dataclasses import replace

    from moe_apps.recsys.config import RATE
    data, features, config, _ = _model("mmoe")
    tasks = (RATE, *config.model.tasks)
    torch.manual_seed(2)
    model = build_model(replace(config.model, tasks=tasks)).eval()
    odds_ratio_U = torch.linspace(0.5, 40.0, len(data.users.raw_id))
    info = export_model(model, features, tasks, data.users.raw_id, data.items.raw_id, tmp_path / "out",
                        odds_ratio_U=odds_ratio_U)
    program = torch.export.load(str(info.program)).module()
    for user in (1, 40):
        u = int(np.flatnonzero(data.users.raw_id == user)[0])
        i = torch.arange(len(data.items.raw_id))
        with torch.no_grad():
            p_BT = model(make_batch(features, tasks, torch.full_like(i, u), i, None)).predictions_BT
            got = program(torch.tensor(user), torch.as_tensor(data.items.raw_id, dtype=torch.int64))
        odds = p_BT[:, 0] / (1 - p_BT[:, 0]) / odds_ratio_U[u]
        names = [t.target for t in tasks]
        expected = odds / (1 + odds) * p_BT[:, names.index("like")]
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-7)


def test_existing_export_folder_is_refused(tmp_path: Path) -> None:
    data, features, config, model = _model("shared-bottom")
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists; choose a new export folder"):
        export_model(model, features, config.model.tasks, data.users.raw_id, data.items.raw_id,
                     tmp_path / "out")
    assert list(tmp_path.iterdir()) == [tmp_path / "out"]
