"""Recsys quality on MovieLens 100K: every model on the official folds u1..u5, plus two references.

For each model (single-task towers, shared-bottom, MMoE, PLE; Ma et al. 2018, Tang et al. 2020)
and fold, one `moe_apps.recsys.train.train` run (early stopping on a 5 % validation slice of the
fold's base file, the fold's test file scored once); then mean and std over the folds of like-AUC,
like log loss, rating RMSE and MAE, and the seconds per run. References computed here on the same
folds: the global mean + user/item biases baseline (regularised, alternating closed-form passes)
and biased matrix factorisation (ALS, Koren et al. 2009); both predict a rating, and their like
score is that rating (AUC and log loss of ``sigmoid(rating - 3.5)`` are reported for them).

    .venv/bin/python benchmarks/recsys_quality.py [--models mmoe,ple] [--folds u1,u2] [--epochs N]
                                                  [--data-dir PATH] [--json] [--no-references]
                                                  [--threads N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from moe_apps.datasets import Ratings, load_movielens
from moe_apps.recsys.config import LIKE, MODELS, RATING, TARGETS, get_preset
from moe_apps.recsys.task import task_metrics
from moe_apps.recsys.train import train

FOLDS = ("u1", "u2", "u3", "u4", "u5")
KEYS = ("like_auc", "like_logloss", "rating_rmse", "rating_mae")


def biases(train: Ratings, num_users: int, num_items: int, reg_user: float = 15.0,
           reg_item: float = 10.0, passes: int = 10) -> tuple[float, np.ndarray, np.ndarray]:
    """mu, b_u, b_i minimising squared error + reg * ||b||^2, by alternating closed-form passes."""
    mu = float(train.rating.mean())
    b_user, b_item = np.zeros(num_users), np.zeros(num_items)
    r = train.rating.astype(np.float64)
    for _ in range(passes):
        b_item = np.bincount(train.item, r - mu - b_user[train.user], num_items) / (
            reg_item + np.bincount(train.item, minlength=num_items))
        b_user = np.bincount(train.user, r - mu - b_item[train.item], num_users) / (
            reg_user + np.bincount(train.user, minlength=num_users))
    return mu, b_user, b_item


def _ridge_side(rows: torch.Tensor, cols: torch.Tensor, residual: torch.Tensor, other: torch.Tensor,
                num_rows: int, reg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve each row's ridge regression of ``residual`` on ``[other[cols], 1]`` (ALS-WR scaling)."""
    x_RK = torch.cat([other[cols], torch.ones(len(cols), 1, dtype=other.dtype)], 1)
    k = x_RK.shape[1]
    gram = torch.zeros(num_rows, k, k, dtype=other.dtype).index_add_(0, rows, x_RK[:, :, None] * x_RK[:, None, :])
    rhs = torch.zeros(num_rows, k, dtype=other.dtype).index_add_(0, rows, x_RK * residual[:, None])
    count = torch.bincount(rows, minlength=num_rows).clamp(min=1).to(other.dtype)
    gram += reg * count[:, None, None] * torch.eye(k, dtype=other.dtype)
    sol = torch.linalg.solve(gram, rhs)
    return sol[:, :-1], sol[:, -1]


def biased_mf(train: Ratings, num_users: int, num_items: int, rank: int = 10, reg: float = 0.1,
              passes: int = 15, seed: int = 0):
    """Biased MF ``mu + b_u + b_i + p_u . q_i`` by alternating least squares; returns a predictor."""
    gen = torch.Generator().manual_seed(seed)
    u, i = torch.as_tensor(train.user), torch.as_tensor(train.item)
    r = torch.as_tensor(train.rating, dtype=torch.float64)
    mu = float(r.mean())
    p = 0.1 * torch.randn(num_users, rank, generator=gen, dtype=torch.float64)
    q = 0.1 * torch.randn(num_items, rank, generator=gen, dtype=torch.float64)
    b_u, b_i = torch.zeros(num_users, dtype=torch.float64), torch.zeros(num_items, dtype=torch.float64)
    for _ in range(passes):
        p, b_u = _ridge_side(u, i, r - mu - b_i[i], q, num_users, reg)
        q, b_i = _ridge_side(i, u, r - mu - b_u[u], p, num_items, reg)

    def predict(users: np.ndarray, items: np.ndarray) -> np.ndarray:
        uu, ii = torch.as_tensor(users), torch.as_tensor(items)
        return (mu + b_u[uu] + b_i[ii] + (p[uu] * q[ii]).sum(1)).clamp(1, 5).numpy()

    return predict


def _reference_metrics(test: Ratings, rating_pred: np.ndarray) -> dict[str, float]:
    targets = np.stack([TARGETS[task.target](test.rating) for task in (LIKE, RATING)], 1)
    preds = np.stack([1 / (1 + np.exp(-(rating_pred - 3.5))), np.clip(rating_pred, 1, 5)], 1)
    return task_metrics((LIKE, RATING), targets, preds)


def main(argv: list[str] | None = None) -> dict[str, dict[str, list[float]]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--folds", default=",".join(FOLDS))
    parser.add_argument("--epochs", type=int, default=None, help="max epochs (default: the preset's)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    parser.add_argument("--no-references", action="store_true", help="skip biases and biased MF")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    models, folds = args.models.split(","), args.folds.split(",")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=args.json)
    quiet = Console(quiet=True)
    data = load_movielens("movielens-100k", args.data_dir)
    nu, ni = len(data.users), len(data.items)
    results: dict[str, dict[str, list[float]]] = {}

    def record(name: str, metrics: dict[str, float], seconds: float) -> None:
        row = results.setdefault(name, {k: [] for k in (*KEYS, "seconds")})
        for k in KEYS:
            row[k].append(metrics[k])
        row["seconds"].append(seconds)
        console.print(f"{name:14s} " + "  ".join(f"{k} {metrics[k]:.4f}" for k in KEYS)
                      + f"  {seconds:.1f}s", highlight=False)

    for fold in folds:
        train_part, test = data.folds[fold]
        if not args.no_references:
            started = time.perf_counter()
            mu, b_u, b_i = biases(train_part, nu, ni)
            record(f"biases/{fold}", _reference_metrics(test, mu + b_u[test.user] + b_i[test.item]),
                   time.perf_counter() - started)
            started = time.perf_counter()
            predictor = biased_mf(train_part, nu, ni)
            record(f"biased-mf/{fold}", _reference_metrics(test, predictor(test.user, test.item)),
                   time.perf_counter() - started)
        for model in models:
            config = get_preset("ple" if model == "ple" else "default")
            config = replace(config, split=fold, model=replace(config.model, model=model))
            if args.epochs is not None:
                config = replace(config, epochs=args.epochs)
            with tempfile.TemporaryDirectory() as tmp:
                outcome = train(config, Path(tmp) / "run", data=data, console=quiet, progress=False)
            record(f"{model}/{fold}", outcome.test_metrics, outcome.seconds)

    merged: dict[str, dict[str, list[float]]] = {}
    for name, row in results.items():
        target = merged.setdefault(name.split("/")[0], {k: [] for k in row})
        for k, v in row.items():
            target[k] += v
    table = Table(title=f"ML-100K folds {','.join(folds)}: test mean ± std (torch threads "
                        f"{torch.get_num_threads()})")
    for column in ("model", *KEYS, "s / run"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, row in merged.items():
        cells = [f"{np.mean(row[k]):.4f} ± {np.std(row[k]):.4f}" for k in KEYS]
        table.add_row(name, *cells, f"{np.mean(row['seconds']):.1f}")
    console.print(table)
    if args.json:
        print(json.dumps({name: {k: {"mean": float(np.mean(v)), "std": float(np.std(v)),
                                     "folds": v} for k, v in row.items()}
                          for name, row in merged.items()}))
    return merged


if __name__ == "__main__":
    main(sys.argv[1:])
