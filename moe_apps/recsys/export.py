"""Export a trained recsys model for serving: user id + candidate movie ids -> ranking scores.

Format: ``torch.export`` (an `ExportedProgram` saved as ``model.pt2``), not TorchScript. The
exported program is a graph of ATen operators with the weights and feature tables inside; it loads
with ``torch.export.load`` and nothing else (no moe_apps, moe_core or torchrec class is needed,
no Python source is pickled), and it is the format PyTorch develops further (AOTInductor,
ExecuTorch), while TorchScript is in maintenance and would need every module on the way
(moe_core's dataclass outputs, torchrec's `KeyedJaggedTensor`) to be scriptable.

What is inside: the features a user and a movie bring (user, side features and the
mean-pooled rating history; movie, release-year bucket and genres; the log-count dense features,
and the pairs' neighbourhood scores when the model has that feature)
are looked up through the trained embedding tables once, at export time, into one table per side
(`ServingRecommender`), so a call is a gather plus the model's bottom and heads. Scores equal the
eager model's on the same pairs (tested in a separate process that cannot import moe_apps).

Calling it (MovieLens ids, as in ``u.data``)::

    program = torch.export.load("OUT/model.pt2").module()
    scores = program(torch.tensor(USER_ID), torch.tensor([MOVIE_ID, ...]))  # float32 (N,)

Unknown ids: a user id or movie id the model was not trained with gets the score NaN (the
documented answer; the graph cannot raise a Python error). ``export.json`` lists the known ids'
range, the tasks and what the score is.

Shapes: N candidate movies, U users, I movies, S features of one side, D embedding width, T tasks.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from moe_apps.recsys.data import ITEM_SIDE, USER_SIDE, Features, candidate_batch, stack_dense
from moe_apps.recsys.model import SingleTaskModels
from moe_apps.recsys.ranking import ranking_score, ranking_score_name, sampling_odds_ratio

FORMAT = 1
PROGRAM = "model.pt2"
INFO = "export.json"


def _id_index(raw_ids: np.ndarray) -> Tensor:
    """raw id -> dense index (-1 where no such id), indexed by the raw id."""
    index = torch.full((int(raw_ids.max()) + 1,), -1, dtype=torch.int64)
    index[torch.as_tensor(raw_ids, dtype=torch.int64)] = torch.arange(len(raw_ids))
    return index


class ServingRecommender(nn.Module):
    """(user id, movie ids) -> ranking scores, with every feature table inside (eval mode only).

    For each network of the model (one, or one per task for ``single``) it keeps the pooled
    user-side features of every user ``(U, S_u, D)`` with the user biases and dense feature, and
    the movie-side ones of every movie; a call gathers them and runs the network's bottom and heads.
    """

    def __init__(self, model: nn.Module, features: Features, tasks: Sequence[Any],
                 user_raw_ids: np.ndarray, item_raw_ids: np.ndarray,
                 odds_ratio_U: Tensor | None = None) -> None:
        super().__init__()
        model = copy.deepcopy(model).eval().requires_grad_(False)  # the caller's model is left alone
        self.tasks = tuple(tasks)
        self.nets = nn.ModuleList(model.nets if isinstance(model, SingleTaskModels) else [model])
        self.register_buffer("odds_ratio", torch.ones(len(user_raw_ids)) if odds_ratio_U is None
                             else odds_ratio_U.float().clone())
        self.register_buffer("user_index", _id_index(user_raw_ids))
        self.register_buffer("item_index", _id_index(item_raw_ids))
        batch = candidate_batch(features, torch.arange(len(user_raw_ids)), torch.arange(len(item_raw_ids)),
                                pairs=(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)))
        self.register_buffer("user_dense", batch.user_dense_U.clone())
        self.register_buffer("item_dense", batch.item_dense_I.clone())
        scores = features.neighbourhood
        self.register_buffer("pair_score", None if scores is None else scores.held_out_UI.clone())
        with torch.no_grad():
            for k, net in enumerate(self.nets):
                user, item = net.encoder.side_tables(batch.user_sparse, batch.item_sparse)
                self.register_buffer(f"user_table_{k}", torch.stack([user[f] for f in USER_SIDE], 1))
                self.register_buffer(f"item_table_{k}", torch.stack([item[f] for f in ITEM_SIDE], 1))
                self.register_buffer(f"user_bias_{k}", user["bias"].clone())
                self.register_buffer(f"item_bias_{k}", item["bias"].clone())

    @staticmethod
    def _lookup(index: Tensor, raw: Tensor) -> tuple[Tensor, Tensor]:
        """(dense index, known) of raw ids; unknown ids get index 0 and known False."""
        inside = (raw >= 0) & (raw < index.shape[0])
        dense = index[raw.clamp(0, index.shape[0] - 1)]
        known = inside & (dense >= 0)
        return dense.clamp(min=0), known

    def forward(self, user_id: Tensor, movie_ids: Tensor) -> Tensor:
        u, user_known = self._lookup(self.user_index, user_id.reshape(1))
        i_N, item_known_N = self._lookup(self.item_index, movie_ids)
        u_N = u.expand(i_N.shape[0])
        pair_N = None if self.pair_score is None else self.pair_score[u_N, i_N]
        dense_NF = stack_dense(self.user_dense[u_N], self.item_dense[i_N], pair_N)
        outputs = []
        for k, net in enumerate(self.nets):
            user_NSD = getattr(self, f"user_table_{k}")[u_N]
            item_NSD = getattr(self, f"item_table_{k}")[i_N]
            pooled = ({f: user_NSD[:, s] for s, f in enumerate(USER_SIDE)}
                      | {f: item_NSD[:, s] for s, f in enumerate(ITEM_SIDE)})
            bias_NT = getattr(self, f"user_bias_{k}")[u_N] + getattr(self, f"item_bias_{k}")[i_N]
            outputs.append(net.from_encoded(*net.encoder.combine(pooled, bias_NT, dense_NF)).predictions_BT)
        scores_N = ranking_score(torch.cat(outputs, 1), self.tasks, self.odds_ratio[u_N])
        return torch.where(user_known & item_known_N, scores_N, torch.full_like(scores_N, float("nan")))


@dataclass(frozen=True)
class ExportInfo:
    """What `export_model` wrote."""

    out_dir: Path
    program: Path
    info: dict[str, Any]


def export_model(model: nn.Module, features: Features, tasks: Sequence[Any], user_raw_ids: np.ndarray,
                 item_raw_ids: np.ndarray, out_dir: str | Path, *,
                 odds_ratio_U: Tensor | None = None, extra: dict[str, Any] | None = None) -> ExportInfo:
    """Export ``model`` into a new folder ``out_dir`` (``model.pt2`` + ``export.json``);
    ``odds_ratio_U``: each user's `sampling_odds_ratio` for the ranking score (None = ones).

    FileExistsError if ``out_dir`` exists (nothing is overwritten); the folder is built under a
    temporary name next to it and renamed when complete."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; choose a new export folder (nothing was written)")
    serving = ServingRecommender(model, features, tasks, user_raw_ids, item_raw_ids, odds_ratio_U).eval()
    example = (torch.tensor(int(user_raw_ids[0])), torch.as_tensor(item_raw_ids[:3], dtype=torch.int64))
    movies = torch.export.Dim("movies", min=1, max=1 << 30)
    with torch.no_grad():
        program = torch.export.export(serving, example, dynamic_shapes=({}, {0: movies}), strict=False)
    info = {
        "format": FORMAT, "app": "recsys", "program": PROGRAM, "torch": torch.__version__,
        "exporter": "torch.export",
        "inputs": {"user_id": "int64 scalar tensor, MovieLens user id",
                   "movie_ids": "int64 tensor (N,), MovieLens movie ids"},
        "output": "float32 tensor (N,): ranking score, higher is better; NaN for an unknown user or movie id",
        "score": ranking_score_name(tasks), "tasks": [t.name for t in tasks],
        "user_ids": {"min": int(user_raw_ids.min()), "max": int(user_raw_ids.max()), "count": len(user_raw_ids)},
        "movie_ids": {"min": int(item_raw_ids.min()), "max": int(item_raw_ids.max()), "count": len(item_raw_ids)},
        "load": "torch.export.load(path).module()(torch.tensor(user_id), torch.tensor(movie_ids))",
        **(extra or {}),
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.{secrets.token_hex(4)}.tmp"
    os.mkdir(tmp)  # mode 0o777 less the umask, like any new folder
    try:
        torch.export.save(program, tmp / PROGRAM)
        (tmp / INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportInfo(out_dir, out_dir / PROGRAM, info)



def export_run(loaded: Any, out_dir: str | Path) -> ExportInfo:
    """Export a loaded run (`moe_apps.recsys.train.LoadedRun`: config, model, run data)."""
    config, run = loaded.config, loaded.run
    odds_ratio_U = sampling_odds_ratio(run.fit, len(run.data.users), len(run.data.items), config.negatives)
    return export_model(loaded.model, run.features, config.model.tasks, run.data.users.raw_id,
                        run.data.items.raw_id, out_dir, odds_ratio_U=odds_ratio_U,
                        extra={"model": config.model.model, "dataset": config.dataset, "split": config.split})
