"""Recsys top-K quality on MovieLens 100K with full ranking: popularity, BPR and the multi-task
recommenders of the `ranking` preset, on the official folds u1..u5 and/or RecBole's split.

Every movie the user did not rate in the training part is a candidate (no sampled negatives,
Krichene & Rendle 2020); relevant = the user's test ratings (``liked_*``: those >= 4); metrics
from `moe_apps.recsys.ranking` (Recall, NDCG, Hit, MRR at 10 and 20, RecBole's definitions).

* ``pop``: movies by their number of training ratings (most popular first).
* ``bpr``: BPR-MF (Rendle et al. 2009) as RecBole's quick-start runs it: 64-d user and movie
  embeddings, one sampled unrated movie per rating, Adam lr 1e-3, batch 2048, early stopping on the
  validation part's MRR@10 (checked every epoch, patience 10, at most 300 epochs).
* ``ease``: EASE (Steck 2019), the closed-form item-item model on the fit part, L2 250 (the best
  of 100 / 250 / 500 / 1000 by validation NDCG@10 on the recbole split); no training loop. The
  networks can add its cross-fitted score to their logits (``--neighbourhood``, the
  ``ranking-ease`` preset's 250).
* ``shared_bottom``, ``mmoe``, ``ple``, ``single``: `moe_apps.recsys.train.train` with the
  `ranking` preset (ESMM-style task mix: rate over the whole catalogue with sampled negatives,
  like | rate, rating; ranked by P(rate) x P(like | rate); ``by_rate_*``: the same predictions
  ranked by P(rate) alone).

Folds: ``u1..u5`` (the official ``uK.base`` / ``uK.test``; validation = a seeded 5 % of the base
part) and ``recbole`` (per user a seeded random 80/10/10; the validation movies are masked at test
time too). Seed 0 throughout.

    .venv/bin/python benchmarks/recsys_ranking.py [--models pop,bpr,ease,shared_bottom,mmoe,ple]
        [--folds u1,u2,u3 | --folds recbole] [--epochs N] [--patience N] [--monitor ndcg@10]
        [--rate-softmax W] [--negatives N] [--neighbourhood L2] [--threads 1] [--data-dir PATH] [--json]
    .venv/bin/python benchmarks/recsys_ranking.py --from-json u1.json u2.json ... [--json]

The JSON maps each model to ``{metric: {mean, std, folds}}``, ``fold_names`` to the folds in that
order; ``differences`` holds, per multi-gate model, the per-fold NDCG@10 difference to
shared-bottom (mean, std) and, per model, NDCG@10 relative to ``pop``. ``--from-json`` merges the
JSONs of runs over different folds, or of different models on one fold (e.g. run side by side),
and prints the table of all of them.
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

from moe_apps.datasets import MovieLensData, load_movielens
from moe_apps.recsys.config import RANKING_MONITORS
from moe_apps.recsys.neighbourhood import ease_weights
from moe_apps.recsys.ranking import KS, METRICS, full_ranking, interaction_matrix
from moe_apps.recsys.splits import Parts, protocol_parts

FOLDS = ("u1", "u2", "u3", "u4", "u5", "recbole")
NETWORKS = {"shared_bottom": "shared-bottom", "mmoe": "mmoe", "ple": "ple", "single": "single"}
KEYS = tuple(f"{m}@{k}" for k in KS for m in METRICS)
REPORTED = (*KEYS, *(f"liked_{k}" for k in KEYS), "users_evaluated")
VAL_FRACTION = 0.05
EASE_L2 = 250.0
BASELINES = ("pop", "bpr", "ease")
BY_RATE = ("by_rate_ndcg@10", "by_rate_recall@10", "by_rate_hit@10", "by_rate_liked_ndcg@10")


def _masks(parts: Parts, num_users: int, num_items: int, relevant) -> tuple[torch.Tensor, ...]:
    return (interaction_matrix(parts.train, num_users, num_items),
            interaction_matrix(relevant, num_users, num_items),
            interaction_matrix(relevant, num_users, num_items, min_rating=4.0))


def popularity(data: MovieLensData, parts: Parts) -> dict[str, float]:
    num_users, num_items = len(data.users), len(data.items)
    counts = torch.as_tensor(np.bincount(parts.train.item, minlength=num_items), dtype=torch.float32)
    seen, relevant, liked = _masks(parts, num_users, num_items, parts.test)
    return full_ranking(lambda u: counts.expand(len(u), -1), seen, relevant, liked).metrics


def ease(data: MovieLensData, parts: Parts, lam: float = EASE_L2) -> dict[str, float]:
    """EASE fitted in closed form on ``parts.fit``; a user's scores are their fit row times B."""
    x_UI = interaction_matrix(parts.fit, len(data.users), len(data.items)).double()
    scores_UI = (x_UI @ ease_weights(x_UI, lam)).float()
    seen, relevant, liked = _masks(parts, len(data.users), len(data.items), parts.test)
    return full_ranking(lambda u: scores_UI[u], seen, relevant, liked).metrics


def bpr(data: MovieLensData, parts: Parts, seed: int = 0, dim: int = 64, lr: float = 1e-3,
        batch: int = 2048, max_epochs: int = 300, patience: int = 10) -> dict[str, float]:
    """BPR-MF trained on ``parts.fit``, early-stopped on the validation part, tested once."""
    num_users, num_items = len(data.users), len(data.items)
    gen = torch.Generator().manual_seed(seed)
    user_emb = torch.nn.Embedding(num_users, dim)
    item_emb = torch.nn.Embedding(num_items, dim)
    for table in (user_emb, item_emb):  # RecBole initialises embeddings with xavier_normal_
        torch.nn.init.xavier_normal_(table.weight, generator=gen)
    optimizer = torch.optim.Adam([user_emb.weight, item_emb.weight], lr=lr)
    seen_fit = interaction_matrix(parts.fit, num_users, num_items)
    fit_users = torch.as_tensor(parts.fit.user)
    fit_items = torch.as_tensor(parts.fit.item)
    val_seen = seen_fit
    val_relevant = interaction_matrix(parts.val, num_users, num_items)

    def score(u: torch.Tensor) -> torch.Tensor:
        return user_emb.weight[u] @ item_emb.weight.T

    best, best_state, bad = -1.0, None, 0
    for _ in range(max_epochs):
        order = torch.randperm(len(fit_users), generator=gen)
        negatives = torch.randint(num_items, (len(order),), generator=gen)
        for _ in range(20):  # resample negatives that the user rated
            clash = seen_fit[fit_users, negatives]
            if not clash.any():
                break
            negatives[clash] = torch.randint(num_items, (int(clash.sum()),), generator=gen)
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            u, p, n = user_emb(fit_users[idx]), item_emb(fit_items[idx]), item_emb(negatives[idx])
            loss = -torch.nn.functional.logsigmoid((u * p).sum(1) - (u * n).sum(1)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            mrr = full_ranking(score, val_seen, val_relevant, ks=(10,)).metrics["mrr@10"]
        if mrr > best:
            best, bad = mrr, 0
            best_state = (user_emb.weight.detach().clone(), item_emb.weight.detach().clone())
        else:
            bad += 1
            if bad >= patience:
                break
    with torch.no_grad():
        user_emb.weight.copy_(best_state[0])
        item_emb.weight.copy_(best_state[1])
        seen, relevant, liked = _masks(parts, num_users, num_items, parts.test)
        return full_ranking(score, seen, relevant, liked).metrics


def network(name: str, data: MovieLensData, fold: str, **overrides: object) -> dict[str, float]:
    """Test metrics of the `ranking` preset with bottom ``name`` on ``fold``; ``overrides``
    (`RecsysConfig` fields, e.g. ``epochs``, ``patience``, ``rate_softmax``, and the model's
    ``neighbourhood``; None = the preset's) replace the preset's. A ``monitor`` (a validation
    ranking metric such as ndcg@10) is maximised."""
    from rich.console import Console

    from moe_apps.recsys.config import get_preset
    from moe_apps.recsys.train import train

    config = get_preset("ranking")
    neighbourhood = overrides.pop("neighbourhood", None)
    config = replace(config, split=fold, model=replace(
        config.model, model=NETWORKS[name],
        neighbourhood=config.model.neighbourhood if neighbourhood is None else neighbourhood))
    if overrides.get("monitor") is not None:
        overrides |= {"monitor_mode": "max"}
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    with tempfile.TemporaryDirectory() as tmp:
        outcome = train(config, Path(tmp) / "run", data=data, console=Console(quiet=True), progress=False)
    return outcome.test_metrics


def _summary(values: list[float]) -> dict[str, object]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "folds": values}


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="pop,bpr,ease,shared_bottom,mmoe,ple")
    parser.add_argument("--folds", default=None,
                        help="comma-separated folds (default u1..u5); with --from-json: keep only these")
    parser.add_argument("--epochs", type=int, default=None, help="max epochs of the networks (default: the preset's)")
    parser.add_argument("--patience", type=int, default=None, help="early-stopping patience of the networks")
    parser.add_argument("--monitor", default=None,
                        help="early-stop the networks on this validation ranking metric (e.g. ndcg@10) "
                             "instead of the preset's validation loss")
    parser.add_argument("--rate-softmax", type=float, default=None,
                        help="weight of the sampled softmax on the rate logit (default: the preset's, 0 = off)")
    parser.add_argument("--negatives", type=int, default=None,
                        help="unrated movies drawn per rating (default: the preset's)")
    parser.add_argument("--neighbourhood", type=float, default=None,
                        help="EASE L2 of the networks' neighbourhood term on the logits (default: the preset's, 0 = off)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on 2 shared cores one thread ran 5-10x faster than 2)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    parser.add_argument("--from-json", nargs="+", default=None,
                        help="merge these JSON outputs (runs over different folds) instead of training")
    args = parser.parse_args(argv)
    if args.from_json:
        only = None if args.folds is None else args.folds.split(",")
        per_fold, seconds, folds = _merge([Path(p) for p in args.from_json], parser, only)
        return _report(per_fold, seconds, folds, args.json)
    models = [m.replace("-", "_") for m in args.models.split(",")]
    folds = (args.folds or ",".join(FOLDS[:5])).split(",")
    unknown = [m for m in models if m not in (*BASELINES, *NETWORKS)] + [f for f in folds if f not in FOLDS]
    if unknown:
        parser.error(f"unknown model or fold {unknown}; models: {', '.join((*BASELINES, *NETWORKS))}; "
                     f"folds: {FOLDS}")
    if args.neighbourhood is not None and not args.neighbourhood >= 0:
        parser.error(f"--neighbourhood must be >= 0 (EASE's L2; 0 = off), got {args.neighbourhood}")
    if args.monitor is not None and args.monitor not in RANKING_MONITORS:
        parser.error(f"--monitor must be a validation ranking metric: {', '.join(RANKING_MONITORS)}")
    torch.set_num_threads(args.threads)
    from rich.console import Console

    console = Console(stderr=args.json, width=200)
    data = load_movielens("movielens-100k", args.data_dir)
    per_fold: dict[str, dict[str, list[float]]] = {}
    seconds: dict[str, list[float]] = {}
    for fold in folds:
        parts = protocol_parts(data, fold, 0, VAL_FRACTION)
        for model in models:
            started = time.perf_counter()
            if model == "pop":
                metrics = popularity(data, parts)
            elif model == "bpr":
                metrics = bpr(data, parts)
            elif model == "ease":
                metrics = ease(data, parts)
            else:
                metrics = network(model, data, fold, epochs=args.epochs, patience=args.patience,
                                  monitor=args.monitor, rate_softmax=args.rate_softmax,
                                  negatives=args.negatives, neighbourhood=args.neighbourhood)
            elapsed = time.perf_counter() - started
            extra = [k for k in BY_RATE if k in metrics]
            row = per_fold.setdefault(model, {k: [] for k in (*REPORTED, *extra)})
            for k in (*REPORTED, *extra):
                row[k].append(float(metrics[k]))
            seconds.setdefault(model, []).append(elapsed)
            console.print(f"{fold} {model:14s} " + "  ".join(f"{k} {metrics[k]:.4f}" for k in KEYS[:4])
                          + f"  ndcg@20 {metrics['ndcg@20']:.4f}  {elapsed:.1f}s", highlight=False)
    return _report(per_fold, seconds, folds, args.json, torch.get_num_threads())


def _merge(paths: list[Path], parser: argparse.ArgumentParser,
           only: list[str] | None = None) -> tuple[dict, dict, list[str]]:
    """Per-fold values of several JSON outputs: runs over different folds, or different models of
    one fold (run side by side); each model's fold may come from one file only. ``only``: keep
    just these folds (e.g. the five official ones of files that also hold ``recbole``)."""
    cells: dict[str, dict[str, dict[str, float]]] = {}  # model -> fold -> metric -> value
    folds: list[str] = []
    for path in paths:
        try:
            raw = json.loads(path.read_text())
            names = raw["fold_names"]
            models = {m: v for m, v in raw.items() if m not in ("differences", "fold_names")}
            values = {m: {f: {k: v["folds"][i] for k, v in metrics.items()} for i, f in enumerate(names)}
                      for m, metrics in models.items()}
        except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
            parser.error(f"{path} is not a JSON output of this script ({error})")
        if only is not None:
            names = [f for f in names if f in only]
            values = {m: {f: v for f, v in by_fold.items() if f in only} for m, by_fold in values.items()}
        for model, by_fold in values.items():
            repeated = sorted(set(by_fold) & set(cells.get(model, {})))
            if repeated:
                parser.error(f"{path} repeats {model} on folds {repeated}; give each model's fold once")
            cells.setdefault(model, {}).update(by_fold)
        folds += [f for f in names if f not in folds]
    if not folds:
        parser.error(f"none of the files holds the folds {only}")
    cells = {m: by_fold for m, by_fold in cells.items() if by_fold}
    short = sorted(m for m, by_fold in cells.items() if set(by_fold) != set(folds))
    if short:
        parser.error(f"models {short} are missing from some folds of {folds}; merge runs of the same --models")
    per_fold, seconds = {}, {}
    for model, by_fold in cells.items():  # the metrics every fold has (older outputs have fewer)
        keys = [k for k in by_fold[folds[0]] if k != "seconds" and all(k in by_fold[f] for f in folds)]
        per_fold[model] = {k: [by_fold[f][k] for f in folds] for k in keys}
        seconds[model] = [by_fold[f].get("seconds", float("nan")) for f in folds]
    return per_fold, seconds, folds


def _report(per_fold: dict[str, dict[str, list[float]]], seconds: dict[str, list[float]], folds: list[str],
            as_json: bool, threads: int | None = None) -> dict[str, object]:
    """Print the table and differences of ``per_fold``; the JSON (printed with ``as_json``)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=as_json, width=200)
    threads_note = f" (torch threads {threads})" if threads is not None else ""
    table = Table(title=f"ML-100K full ranking, folds {','.join(folds)}: test mean ± std{threads_note}")
    shown = ("ndcg@10", "recall@10", "hit@10", "mrr@10", "ndcg@20", "recall@20", "liked_ndcg@10")
    for column in ("model", *shown, "s / run"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for model, row in per_fold.items():
        table.add_row(model, *(f"{np.mean(row[k]):.4f} ± {np.std(row[k]):.4f}" for k in shown),
                      f"{np.mean(seconds[model]):.1f}")
    console.print(table)
    differences: dict[str, object] = {}
    if "shared_bottom" in per_fold:
        base = np.array(per_fold["shared_bottom"]["ndcg@10"])
        for model in ("mmoe", "ple"):
            if model in per_fold:
                diff = np.array(per_fold[model]["ndcg@10"]) - base
                differences[f"{model}-shared_bottom ndcg@10"] = _summary(diff.tolist())
    if "pop" in per_fold:
        pop = np.array(per_fold["pop"]["ndcg@10"])
        for model, row in per_fold.items():
            if model != "pop":
                differences[f"{model}/pop ndcg@10 - 1"] = _summary((np.array(row["ndcg@10"]) / pop - 1).tolist())
    for name, value in differences.items():
        console.print(f"{name}: {value['mean']:+.4f} ± {value['std']:.4f}", highlight=False)
    result = {model: {k: _summary(v) for k, v in row.items()} | {"seconds": _summary(seconds[model])}
              for model, row in per_fold.items()}
    result["differences"] = differences
    result["fold_names"] = folds
    if as_json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
