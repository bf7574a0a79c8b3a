"""Train, evaluate and query recsys runs (what `moe-apps recsys train / eval / recommend` call).

The run folder is the platform's (`moe_apps.training.run`: config.json, the lock, refusals,
resume, digest-checked checkpoints) plus, after training, ``test_metrics.json``, ``gates.json`` and
``gates.png`` (mean gate weight per task and expert, for MMoE / PLE). The test part is evaluated
once, with the best-validation weights. Scoring the test part of another split than the run's is
refused when it shares ratings with the run's training part (`overlap_with_training`).
Test metrics (and ``eval``) hold the per-task metrics and the full-ranking top-K ones
(`moe_apps.recsys.ranking`: ``ndcg@10``, ``recall@10``, ... over every movie not rated in the
training part, ranked by the run's `ranking_score`); the protocol's parts, validation included,
come from `moe_apps.recsys.splits.protocol_parts`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moe_apps.atomic import atomic_write
from moe_apps.datasets import MovieLensData, Ratings, load_movielens, resolve_data_root
from moe_apps.recsys.config import (
    OFFICIAL_SPLITS,
    RANKING_MONITORS,
    RecsysConfig,
    get_preset,
    with_vocab,
)
from moe_apps.recsys.data import Features, RecsysBatch, build_features, make_batch
from moe_apps.recsys.implicit import held_out_batches, training_batches
from moe_apps.recsys.model import build_model, count_parameters, gate_labels
from moe_apps.recsys.ranking import (
    evaluate_ranking,
    interaction_matrix,
    ranking_score,
    sampling_odds_ratio,
)
from moe_apps.recsys.splits import protocol_parts
from moe_apps.recsys.task import RecsysTask
from moe_apps.training import fit, load_checkpoint, resolve_device, set_seed
from moe_apps.training.distributed import DistContext, current_context
from moe_apps.training.run import apply_overrides, check_run_folder, open_run, start_run

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
    test_metrics: dict[str, float]  # empty on ranks > 0 under torchrun (rank 0 tests and writes)
    parameters: dict[str, int]
    seconds: float


def prepare_data(config: RecsysConfig, data_root: Path, data: MovieLensData | None = None) -> RunData:
    """Load the dataset (unless given), split it by ``config`` and build the feature tables."""
    data = load_movielens(config.dataset, data_root) if data is None else data
    parts = protocol_parts(data, config.split, config.seed, config.val_fraction)
    features = build_features(data, parts.fit, config.model.neighbourhood, config.seed)
    return RunData(data, parts.train, parts.test, parts.fit, parts.val, features)


def _write_json(path: Path, payload: Any) -> None:
    text = json.dumps(payload, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def _seen(run: RunData, *parts: Ratings) -> torch.Tensor:
    """(users, movies) bool: rated in any of ``parts``."""
    shape = (len(run.data.users), len(run.data.items))
    seen = torch.zeros(shape, dtype=torch.bool)
    for part in parts:
        seen |= interaction_matrix(part, *shape)
    return seen


def _eval_batches(config: RecsysConfig, run: RunData, ratings: Ratings) -> Iterable[RecsysBatch]:
    """Batches of validation or test ratings (in order, no history dropout, not in the fit part);
    with ``negatives``, each rating also brings that many unrated movies, drawn once."""
    seen = _seen(run, run.train, ratings) if config.negatives else None
    return held_out_batches(run.features, config.model.tasks, ratings, batch_size=config.eval_batch_size,
                            negatives=config.negatives, seen_UI=seen, seed=config.seed)


def _ranking_metrics(model: nn.Module, config: RecsysConfig, run: RunData, relevant: Ratings,
                     device: torch.device | str | None = None, seen: Ratings | None = None) -> dict[str, float]:
    """Full-ranking top-K metrics (`moe_apps.recsys.ranking`): every movie not rated in ``seen``
    (default: the training part) is a candidate, ``relevant`` holds the test (or validation)
    ratings."""
    return evaluate_ranking(model, run.features, config.model.tasks, run.train if seen is None else seen,
                            relevant, len(run.data.users), len(run.data.items), device=device,
                            odds_ratio_U=rate_odds_ratio(config, run))


def rate_odds_ratio(config: RecsysConfig, run: RunData) -> torch.Tensor:
    """(U,) each user's `sampling_odds_ratio`: the fit ratings drew ``config.negatives`` unrated
    movies each, which inflates the odds P(rate) was learned at (1 when nothing was sampled)."""
    return sampling_odds_ratio(run.fit, len(run.data.users), len(run.data.items), config.negatives)


def _task(config: RecsysConfig, run: RunData | None = None) -> RecsysTask:
    """The loop's task; with ``run`` and a ranking ``monitor`` (`RANKING_MONITORS`), every
    validation also ranks the catalogue for the validation part (candidates: movies not in the fit
    part), so early stopping follows the lists rather than the losses. Under torchrun every rank
    validates, so the sharded model scores the same candidates on every rank."""
    ranking = None
    if run is not None and config.monitor in RANKING_MONITORS:
        def ranking(model: nn.Module) -> dict[str, float]:
            device = next(model.parameters()).device
            metrics = _ranking_metrics(model, config, run, run.val, device, seen=run.fit)
            return {k: v for k, v in metrics.items() if k in RANKING_MONITORS}
    return RecsysTask(config.model.tasks, config.embedding_l2, gate_labels(config.model), ranking,
                      rate_softmax=config.rate_softmax)


def _gate_weights(metrics: dict[str, float], config: RecsysConfig,
                  labels: list[list[str]]) -> list[list[float]]:
    """Per task, the mean gate weight of each of its experts, read back from ``gate_<task>_<expert>``."""
    return [[metrics[f"gate_{t.name}_{e}"] for e in names]
            for t, names in zip(config.model.tasks, labels, strict=True)]


def read_run_config(run_dir: str | Path) -> tuple[RecsysConfig, Path | None]:
    """(config, data folder) of a recsys run; RunError if ``run_dir`` is not one."""
    info = open_run(run_dir, app=APP)
    return RecsysConfig.from_dict(info.config), info.data_root


def build_config(preset: str, overrides: dict[str, Any], *, resume_dir: str | Path | None = None
                 ) -> RecsysConfig:
    """The run's config from the CLI: ``preset`` (or, with ``resume_dir``, the run's saved config
    without its data-derived vocabulary) with ``overrides`` (`apply_overrides` names, None = not
    given) laid on. ``--model ple`` without a preset takes the ple preset (its tuned dropout);
    ``--dataset movielens-1m`` without a split takes "random" (ML-1M has no official folds)."""
    if resume_dir is not None:
        saved, _ = read_run_config(resume_dir)
        base = replace(saved, model=replace(saved.model, vocab=()))
    else:
        base = get_preset("ple" if overrides.get("model.model") == "ple" and preset == "default" else preset)
    overrides = dict(overrides)
    if (overrides.get("split") is None and overrides.get("dataset") == "movielens-1m"
            and base.split in OFFICIAL_SPLITS):
        overrides["split"] = "random"
    return apply_overrides(base, overrides)


def train(config: RecsysConfig, out_dir: str | Path, *, resume: bool = False,
          data_dir: str | Path | None = None, data: MovieLensData | None = None,
          console: Any = None, progress: bool = True) -> TrainOutcome:
    """Train ``config`` into ``out_dir`` (or continue it with ``resume``) and test the best epoch.

    Everything is checked before anything is written: the run folder (`check_run_folder`: a fresh
    run refuses a folder that holds a run, a folder held by another job, one that cannot be
    created), the device and the data. ``resume`` needs a recsys run with a checkpoints/last.pt,
    made with the same config (only epochs, patience and device may change), and reads the run's
    data folder unless ``data_dir`` is given.
    """
    from rich.console import Console

    console = console if console is not None else Console()
    run_dir = Path(out_dir)
    started = time.perf_counter()
    saved_info = check_run_folder(run_dir, app=APP, resume=resume)
    if saved_info is not None:
        saved = RecsysConfig.from_dict(saved_info.config)
        free = {"epochs": config.epochs, "patience": config.patience, "device": config.device}
        if replace(saved, **free) != replace(config, model=replace(config.model, vocab=saved.model.vocab)):
            raise ValueError(
                f"--resume: the options differ from the run's config.json in {run_dir} (only "
                "--epochs and --device may change); drop the other options to continue it"
            )
        if data_dir is None:  # continue on the data the run was trained on
            data_dir = saved_info.data_root
    resolve_device(config.device)  # a device this machine lacks fails here, before any write
    root = resolve_data_root(data_dir)
    run = prepare_data(config, root, data)
    config = with_vocab(config, run.features.vocab)
    with start_run(run_dir, app=APP, config=config.to_dict(), data_root=root, resume=resume):
        result, model, ctx = _fit(config, run, run_dir, resume, console, progress)
        if not ctx.is_main:
            return TrainOutcome(run_dir, config, result.best_epoch, result.best_metrics, {},
                                count_parameters(model), time.perf_counter() - started)
        device = next(model.parameters()).device
        model.eval()
        # the test part: the per-task metrics (a task without the validation ranking), then its ranking
        test_metrics = _task(config).evaluate(model, (b.to(device) for b in _eval_batches(config, run, run.test)))
        test_metrics.update(_ranking_metrics(model, config, run, run.test, device))
        seconds = time.perf_counter() - started
        _write_json(run_dir / "test_metrics.json", {"split": config.split, "best_epoch": result.best_epoch,
                                                    "metrics": test_metrics, "seconds": seconds})
        labels = gate_labels(config.model)
        if labels is not None:
            from moe_apps.recsys.plots import plot_gates

            gates = {"tasks": [t.name for t in config.model.tasks], "experts": labels,
                     "val": _gate_weights(result.best_metrics, config, labels),
                     "test": _gate_weights(test_metrics, config, labels)}
            _write_json(run_dir / "gates.json", gates)
            plot_gates(gates, run_dir / "gates.png", title=f"{config.model.model} on {config.split}")
    return TrainOutcome(run_dir, config, result.best_epoch, result.best_metrics, test_metrics,
                        count_parameters(model), seconds)


def _fit(config: RecsysConfig, run: RunData, run_dir: Path, resume: bool, console: Any,
         progress: bool) -> tuple[Any, nn.Module, DistContext]:
    """Build the model (its initial weights depend on the seed alone) and run the shared loop.

    Under torchrun the loop trains it with its embedding tables sharded by torchrec
    (`moe_apps.recsys.distributed`); the model returned is then a plain one-process model holding
    the best checkpoint's weights (the trained one holds only this rank's shards)."""
    set_seed(config.seed)
    model = build_model(config.model)
    task = _task(config, run)
    params = count_parameters(model)
    console.print(
        f"[bold]{config.model.model}[/bold] on {config.dataset} split {config.split}: "
        f"{len(run.fit)} fit / {len(run.val)} val / {len(run.test)} test ratings, "
        f"{params['total']:,} parameters ({params['embeddings']:,} in embedding tables)"
    )
    tasks = config.model.tasks
    val_batches = list(_eval_batches(config, run, run.val))

    seen_fit = _seen(run, run.fit) if config.negatives else None

    def train_batches(epoch: int) -> Iterable[RecsysBatch]:
        return training_batches(run.features, tasks, run.fit, batch_size=config.batch_size,
                                negatives=config.negatives, seen_UI=seen_fit, seed=(config.seed, epoch),
                                history_dropout=config.history_dropout, grouped=config.rate_softmax > 0)

    ctx = current_context()
    distribute = None
    if ctx.enabled:
        from moe_apps.recsys import distributed

        distribute = distributed.torchrec_model_parallel
        if ctx.is_main:
            plan = distributed.sharding_plan(model, ctx.world_size)
            console.print(f"embedding tables: {distributed.describe_plan(plan, ctx.world_size)}",
                          highlight=False, soft_wrap=True)
    result = fit(model, task, train_batches, lambda: val_batches, config.train_config(progress=progress),
                 run_dir, app=APP, model_config=model_config_dict(config), resume=resume,
                 console=console, distribute=distribute)
    if ctx.enabled:
        model = build_model(config.model).to(resolve_device(config.device))
        load_checkpoint(result.best_checkpoint, model, app=APP, model_config=model_config_dict(config))
    return result, model, ctx


def model_config_dict(config: RecsysConfig) -> dict[str, Any]:
    """The model config as checkpoints record it (``neighbourhood`` only when on, so run folders
    from before that option still match)."""
    recorded = asdict(config.model)
    if not recorded["neighbourhood"]:
        del recorded["neighbourhood"]
    return recorded


@dataclass(frozen=True)
class LoadedRun:
    """A trained run ready for inference."""

    config: RecsysConfig
    model: nn.Module
    run: RunData


def load_run(run_dir: str | Path, data_dir: str | Path | None = None,
             data: MovieLensData | None = None) -> LoadedRun:
    """Rebuild a run's data and model and load its best checkpoint (RunError / ValueError on any
    mismatch: not a recsys run, no best.pt, a checkpoint failing its digest, other data)."""
    info = open_run(run_dir, app=APP)
    config = RecsysConfig.from_dict(info.config)
    best = info.checkpoint("best")
    root = resolve_data_root(data_dir if data_dir is not None else info.data_root)
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


def _test_part(loaded: LoadedRun, split: str | None) -> Ratings:
    config, run = loaded.config, loaded.run
    if split is None or split == config.split:
        return run.test
    return protocol_parts(run.data, split, config.seed, config.val_fraction).test


def overlap_with_training(loaded: LoadedRun, split: str | None = None) -> tuple[int, int]:
    """(ratings of the test part of ``split`` that the run trained or validated on, size of that
    test part): metrics on an overlapping test part are inflated."""
    test, train = _test_part(loaded, split), loaded.run.train
    width = len(loaded.run.data.items)
    shared = np.isin(test.user.astype(np.int64) * width + test.item,
                     train.user.astype(np.int64) * width + train.item)
    return int(shared.sum()), len(test)


def evaluate_run(loaded: LoadedRun, split: str | None = None) -> dict[str, float]:
    """Test metrics of a loaded run on its own split (or the test part of ``split``)."""
    config, run = loaded.config, loaded.run
    test = _test_part(loaded, split)
    metrics = _task(config).evaluate(loaded.model, _eval_batches(config, run, test))
    metrics.update(_ranking_metrics(loaded.model, config, run, test))
    return metrics


@dataclass(frozen=True)
class Recommendation:
    """One recommended movie."""

    item_id: int  # MovieLens id
    title: str
    scores: dict[str, float]  # task name -> predicted probability / value


def recommend(loaded: LoadedRun, user_id: int, top: int = 10, task: str | None = None,
              min_ratings: int = 0) -> list[Recommendation]:
    """The ``top`` movies user ``user_id`` (MovieLens id) has not rated in the training part,
    ranked by ``task``'s prediction, by default the run's ranking score (`ranking_score`: P(rate) x
    P(like | rate) for a ``ranking`` run, else P(like), else the first binary task).
    ``min_ratings`` keeps only movies with at least that many training ratings (movies seen by a
    handful of users get extreme scores from their few ratings)."""
    config, run = loaded.config, loaded.run
    tasks = config.model.tasks
    names = [t.name for t in tasks]
    if task is not None and task not in names:
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
    odds_ratio = rate_odds_ratio(config, run)[user]
    score_B = (ranking_score(predictions_BT, tasks, odds_ratio) if task is None
               else predictions_BT[:, names.index(task)])
    order = torch.argsort(score_B, descending=True, stable=True)[:top]
    return [
        Recommendation(int(run.data.items.raw_id[candidates[i]]), run.data.items.title[candidates[i]],
                       {name: float(predictions_BT[i, t]) for t, name in enumerate(names)})
        for i in order.tolist()
    ]
