"""Train, evaluate and query recsys runs (what `moe-apps recsys train / eval / recommend` call).

A run folder holds ``config.json`` (``{"app": "recsys", "config": ..., "data_root": ...}``), the
shared loop's ``metrics.jsonl``, ``checkpoints/{last,best}.pt`` and ``curves.png``, and after
training ``test_metrics.json``, ``gates.json`` and ``gates.png`` (mean gate weight per task and
expert, for MMoE / PLE). The test part is evaluated once, with the best-validation weights.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moe_apps.atomic import atomic_write
from moe_apps.datasets import MovieLensData, Ratings, load_movielens, resolve_data_root
from moe_apps.recsys.config import RecsysConfig, with_vocab
from moe_apps.recsys.data import (
    Features,
    RatingBatches,
    build_features,
    make_batch,
    make_split,
    validation_slice,
)
from moe_apps.recsys.model import build_model, count_parameters, gate_labels
from moe_apps.recsys.task import RecsysTask
from moe_apps.training import fit, load_checkpoint, set_seed

APP = "recsys"


@dataclass(frozen=True)
class RunData:
    """The data of one run: dataset, protocol parts and feature tables."""

    data: MovieLensData
    train: Ratings
    test: Ratings
    fit: Ratings
    val: Ratings
    features: Features


@dataclass(frozen=True)
class TrainOutcome:
    """What `train` returns."""

    run_dir: Path
    config: RecsysConfig
    best_epoch: int
    val_metrics: dict[str, float]
    test_metrics: dict[str, float]
    parameters: dict[str, int]
    seconds: float


def prepare_data(config: RecsysConfig, data_root: Path, data: MovieLensData | None = None) -> RunData:
    """Load the dataset (unless given), split it by ``config`` and build the feature tables."""
    data = load_movielens(config.dataset, data_root) if data is None else data
    train, test = make_split(data, config.split, config.seed)
    fit_part, val = validation_slice(train, config.val_fraction, config.seed)
    return RunData(data, train, test, fit_part, val, build_features(data, fit_part))


def _write_json(path: Path, payload: Any) -> None:
    text = json.dumps(payload, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def _eval_batches(config: RecsysConfig, run: RunData, ratings: Ratings) -> RatingBatches:
    """Batches of validation or test ratings (in order, no history dropout, not in the fit part)."""
    return RatingBatches(run.features, config.model.tasks, ratings, config.eval_batch_size,
                         in_fit=False)


def _task(config: RecsysConfig) -> RecsysTask:
    return RecsysTask(config.model.tasks, config.embedding_l2, gate_labels(config.model))


def _gate_weights(metrics: dict[str, float], config: RecsysConfig,
                  labels: list[list[str]]) -> list[list[float]]:
    """Per task, the mean gate weight of each of its experts, read back from ``gate_<task>_<expert>``."""
    return [[metrics[f"gate_{t.name}_{e}"] for e in names]
            for t, names in zip(config.model.tasks, labels, strict=True)]


def read_run_config(run_dir: str | Path) -> tuple[RecsysConfig, dict[str, Any]]:
    """(config, raw config.json) of a recsys run; ValueError if ``run_dir`` is not one."""
    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a recsys run folder: {path} does not exist")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} cannot be read as JSON: {error}") from error
    if not isinstance(raw, dict) or raw.get("app") != APP:
        app = raw.get("app") if isinstance(raw, dict) else None
        raise ValueError(f"{run_dir} is not a recsys run folder: config.json has app={app!r}")
    return RecsysConfig.from_dict(raw["config"]), raw


def train(config: RecsysConfig, out_dir: str | Path, *, resume: bool = False,
          data_dir: str | Path | None = None, data: MovieLensData | None = None,
          console: Any = None, progress: bool = True) -> TrainOutcome:
    """Train ``config`` into ``out_dir`` (or continue it with ``resume``) and test the best epoch.

    A fresh run refuses a folder that already holds a run (nothing is overwritten); ``resume``
    needs one with a checkpoints/last.pt, made with the same config (only epochs, patience and
    device may change), and reads the run's data folder unless ``data_dir`` is given.
    """
    from rich.console import Console

    console = console if console is not None else Console()
    run_dir = Path(out_dir)
    started = time.perf_counter()
    has_run = (run_dir / "config.json").exists() or (run_dir / "checkpoints").exists()
    if not resume and has_run:
        raise FileExistsError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose another --out"
        )
    if resume:
        saved, raw = read_run_config(run_dir)
        free = {"epochs": config.epochs, "patience": config.patience, "device": config.device}
        if replace(saved, **free) != replace(config, model=replace(config.model, vocab=saved.model.vocab)):
            raise ValueError(
                f"--resume: the options differ from the run's config.json in {run_dir} (only "
                "--epochs and --device may change); drop the other options to continue it"
            )
        if not (run_dir / "checkpoints" / "last.pt").is_file():
            raise FileNotFoundError(
                f"{run_dir} has no checkpoints/last.pt to resume from (the run stopped before its "
                f"first epoch ended); delete {run_dir} or choose another --out to start afresh"
            )
        if data_dir is None:  # continue on the data the run was trained on
            data_dir = raw.get("data_root")
    root = resolve_data_root(data_dir)
    run = prepare_data(config, root, data)
    config = with_vocab(config, run.features.vocab)
    set_seed(config.seed)  # the initial weights depend on the seed alone
    model = build_model(config.model)
    labels = gate_labels(config.model)
    task = _task(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(run_dir / "config.json", {"app": APP, "config": config.to_dict(), "data_root": str(root)})
    params = count_parameters(model)
    console.print(
        f"[bold]{config.model.model}[/bold] on {config.dataset} split {config.split}: "
        f"{len(run.fit)} fit / {len(run.val)} val / {len(run.test)} test ratings, "
        f"{params['total']:,} parameters ({params['embeddings']:,} in embedding tables)"
    )
    tasks = config.model.tasks
    val_batches = list(_eval_batches(config, run, run.val))

    def train_batches(epoch: int) -> RatingBatches:
        return RatingBatches(run.features, tasks, run.fit, config.batch_size, in_fit=True,
                             seed=(config.seed, epoch), history_dropout=config.history_dropout)

    result = fit(model, task, train_batches, lambda: val_batches, config.train_config(progress=progress),
                 run_dir, app=APP, model_config=model_config_dict(config), resume=resume,
                 console=console)
    device = next(model.parameters()).device
    model.eval()
    test_metrics = task.evaluate(model, (b.to(device) for b in _eval_batches(config, run, run.test)))
    seconds = time.perf_counter() - started
    _write_json(run_dir / "test_metrics.json", {"split": config.split, "best_epoch": result.best_epoch,
                                                "metrics": test_metrics, "seconds": seconds})
    if labels is not None:
        from moe_apps.recsys.plots import plot_gates

        gates = {"tasks": [t.name for t in tasks], "experts": labels,
                 "val": _gate_weights(result.best_metrics, config, labels),
                 "test": _gate_weights(test_metrics, config, labels)}
        _write_json(run_dir / "gates.json", gates)
        plot_gates(gates, run_dir / "gates.png", title=f"{config.model.model} on {config.split}")
    return TrainOutcome(run_dir, config, result.best_epoch, result.best_metrics, test_metrics,
                        params, seconds)


def model_config_dict(config: RecsysConfig) -> dict[str, Any]:
    """The model config as checkpoints record it."""
    return asdict(config.model)


@dataclass(frozen=True)
class LoadedRun:
    """A trained run ready for inference."""

    config: RecsysConfig
    model: nn.Module
    run: RunData


def load_run(run_dir: str | Path, data_dir: str | Path | None = None,
             data: MovieLensData | None = None) -> LoadedRun:
    """Rebuild a run's data and model and load its best checkpoint (ValueError on any mismatch)."""
    run_dir = Path(run_dir)
    config, raw = read_run_config(run_dir)
    best = run_dir / "checkpoints" / "best.pt"
    if not best.is_file():
        raise ValueError(f"{run_dir} has no checkpoints/best.pt: the run has not finished an epoch")
    root = resolve_data_root(data_dir if data_dir is not None else raw.get("data_root"))
    run = prepare_data(config, root, data)
    if run.features.vocab != dict(config.model.vocab):
        raise ValueError(
            f"the data under {root} does not match the run (feature sizes {run.features.vocab} vs "
            f"{dict(config.model.vocab)}); point --data-dir at the data the run was trained on"
        )
    model = build_model(config.model)
    load_checkpoint(best, model, app=APP, model_config=model_config_dict(config))
    model.eval()
    return LoadedRun(config, model, run)


def evaluate_run(loaded: LoadedRun, split: str | None = None) -> dict[str, float]:
    """Test metrics of a loaded run on its own split (or the test part of ``split``)."""
    config, run = loaded.config, loaded.run
    test = run.test if split is None or split == config.split else make_split(run.data, split, config.seed)[1]
    return _task(config).evaluate(loaded.model, _eval_batches(config, run, test))


@dataclass(frozen=True)
class Recommendation:
    """One recommended movie."""

    item_id: int  # MovieLens id
    title: str
    scores: dict[str, float]  # task name -> predicted probability / value


def recommend(loaded: LoadedRun, user_id: int, top: int = 10, task: str | None = None,
              min_ratings: int = 0) -> list[Recommendation]:
    """The ``top`` movies user ``user_id`` (MovieLens id) has not rated in the training part,
    ranked by the predicted probability of ``task`` (default: "like", else the first binary task).
    ``min_ratings`` keeps only movies with at least that many training ratings (movies seen by a
    handful of users get extreme scores from their few ratings)."""
    config, run = loaded.config, loaded.run
    tasks = config.model.tasks
    names = [t.name for t in tasks]
    if task is None:
        binary = [t.name for t in tasks if t.kind == "binary"]
        task = "like" if "like" in names else (binary[0] if binary else names[0])
    if task not in names:
        raise ValueError(f"task must be one of {names}, got {task!r}")
    if top < 1:
        raise ValueError(f"--top must be >= 1, got {top}")
    if min_ratings < 0:
        raise ValueError(f"--min-ratings must be >= 0, got {min_ratings}")
    matches = np.flatnonzero(run.data.users.raw_id == user_id)
    if len(matches) == 0:
        raise ValueError(
            f"unknown user id {user_id}: {run.data.name} has user ids "
            f"{int(run.data.users.raw_id.min())}..{int(run.data.users.raw_id.max())}"
        )
    user = int(matches[0])
    seen = np.zeros(len(run.data.items), dtype=bool)
    seen[run.train.item[run.train.user == user]] = True
    popular = np.bincount(run.train.item, minlength=len(seen)) >= min_ratings
    candidates = torch.as_tensor(np.flatnonzero(~seen & popular))
    if len(candidates) == 0:
        raise ValueError(
            f"no movie left to recommend to user {user_id}: every movie with at least "
            f"{min_ratings} training ratings is already rated; lower --min-ratings"
        )
    batch = make_batch(run.features, tasks, torch.full_like(candidates, user), candidates, None)
    with torch.no_grad():
        predictions_BT = loaded.model(batch).predictions_BT.float()
    column = names.index(task)
    order = torch.argsort(predictions_BT[:, column], descending=True, stable=True)[:top]
    return [
        Recommendation(int(run.data.items.raw_id[candidates[i]]), run.data.items.title[candidates[i]],
                       {name: float(predictions_BT[i, t]) for t, name in enumerate(names)})
        for i in order.tolist()
    ]
