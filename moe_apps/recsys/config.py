"""Configs of the recommendation app: task specs, model, data, training, and the named presets.

Multi-task recommendation on MovieLens in the style of MMoE (Ma et al. 2018) and PLE (Tang et al.
2020): every (user, movie) rating gives one target per task, e.g. ``like`` (rating >= 4, binary)
and ``rating`` (1..5, regression). Tasks are data: a `TaskSpec` names a target function of the
`TARGETS` registry, so adding ``dislike`` (rating <= 2) is one more spec, not new code.

Everything is a frozen dataclass; presets are plain functions returning a `RecsysConfig` and live
in the one `PRESETS` dict. ``ModelConfig`` also holds the vocabulary sizes of the features (filled
from the data by `with_vocab`), so a checkpoint's config alone rebuilds its model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from moe_core.checks import check_positive_int

if TYPE_CHECKING:
    from moe_apps.training import TrainConfig

MODELS = ("mmoe", "ple", "shared-bottom", "single")
DATASETS = ("movielens-100k", "movielens-1m")
OFFICIAL_SPLITS = ("u1", "u2", "u3", "u4", "u5", "ua", "ub")
SPLITS = (*OFFICIAL_SPLITS, "random", "temporal", "recbole")
TASK_KINDS = ("binary", "regression")
#: full-ranking metrics early stopping can watch (`moe_apps.recsys.ranking`, K = 10 and 20),
#: measured each epoch on the validation part
RANKING_MONITORS = tuple(f"{m}@{k}" for k in (10, 20) for m in ("recall", "ndcg", "hit", "mrr"))

#: target functions of a rating (float array 1..5) -> float array; one line per new target.
TARGETS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "like": lambda r: (r >= 4).astype(np.float32),
    "dislike": lambda r: (r <= 2).astype(np.float32),
    "rating": lambda r: r.astype(np.float32),
    # did the user rate the movie at all: 1 for a rating, 0 for a sampled unrated pair (rating 0)
    "rated": lambda r: (r > 0).astype(np.float32),
}


@dataclass(frozen=True)
class TaskSpec:
    """One task learned from each rating.

    Attributes:
        name: the metric prefix (``like_auc``, ``rating_rmse``) and the gate's name.
        kind: "binary" (logit head, BCE; AUC and log loss) or "regression" (MSE; RMSE and MAE).
        target: key of `TARGETS` turning the rating into this task's label.
        loss_weight: weight of this task's loss in the sum.
        low, high: range of a regression head ``low + (high - low) * sigmoid(z)``.
    """

    name: str
    kind: str
    target: str
    loss_weight: float = 1.0
    low: float = 1.0
    high: float = 5.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"TaskSpec.name must be an identifier such as 'like', got {self.name!r}")
        if self.kind not in TASK_KINDS:
            raise ValueError(f"TaskSpec.kind must be one of {TASK_KINDS}, got {self.kind!r}")
        if self.target not in TARGETS:
            raise ValueError(
                f"TaskSpec.target must be one of {sorted(TARGETS)} (add a function to "
                f"moe_apps.recsys.config.TARGETS for a new one), got {self.target!r}"
            )
        if not (math.isfinite(self.loss_weight) and self.loss_weight >= 0):
            raise ValueError(f"TaskSpec.loss_weight must be finite and >= 0, got {self.loss_weight}")
        if not self.low < self.high:
            raise ValueError(f"TaskSpec needs low < high, got low={self.low}, high={self.high}")

    @property
    def metric_names(self) -> tuple[str, str]:
        kind = ("auc", "logloss") if self.kind == "binary" else ("rmse", "mae")
        return (f"{self.name}_{kind[0]}", f"{self.name}_{kind[1]}")


LIKE = TaskSpec("like", "binary", "like")
RATING = TaskSpec("rating", "regression", "rating")
DISLIKE = TaskSpec("dislike", "binary", "dislike")
RATE = TaskSpec("rate", "binary", "rated")  # implicit: learned over rated and sampled unrated pairs


@dataclass(frozen=True)
class ModelConfig:
    """The network: which multi-task bottom, its sizes, and the feature vocabularies.

    Attributes:
        model: "mmoe" | "ple" | "shared-bottom" | "single" (one separate network per task).
        tasks: the `TaskSpec`s, in head order.
        embedding_dim: width of every embedding table (user, movie, side features, history).
        num_experts: MMoE experts; PLE uses ``num_task_experts`` per task and the rest of this
            budget as shared experts per level; shared-bottom / single use a hidden width of
            ``num_experts * expert_dim`` so that all bottoms cost about the same.
        expert_dim: output width H of every expert.
        num_task_experts: PLE experts owned by each task per level.
        ple_levels: PLE CGC levels.
        tower_dim: hidden width of each task tower.
        dropout: on the concatenated features and the expert outputs.
        neighbourhood: EASE's L2 (lambda) for the pair's cross-fitted item-item score
            (`moe_apps.recsys.neighbourhood`), added to every task's logit with a learned weight
            (Koren 2008's neighbourhood term beside the factors); 0 = off.
        vocab: feature name -> number of ids (set by `with_vocab` from the data).
    """

    model: str = "mmoe"
    tasks: tuple[TaskSpec, ...] = (LIKE, RATING)
    embedding_dim: int = 16
    num_experts: int = 4
    expert_dim: int = 64
    num_task_experts: int = 1
    ple_levels: int = 2
    tower_dim: int = 32
    dropout: float = 0.6
    neighbourhood: float = 0.0
    vocab: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if not self.tasks or not all(isinstance(t, TaskSpec) for t in self.tasks):
            raise ValueError(f"tasks must be a non-empty tuple of TaskSpec, got {self.tasks!r}")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        for name in ("embedding_dim", "num_experts", "expert_dim", "ple_levels", "tower_dim"):
            check_positive_int(getattr(self, name), name)
        check_positive_int(self.num_task_experts, "num_task_experts", minimum=0)
        if self.model == "ple" and self.num_shared_experts < 1:
            raise ValueError(
                f"ple needs num_experts > num_task_experts * num_tasks to leave a shared expert, got "
                f"num_experts={self.num_experts}, num_task_experts={self.num_task_experts}, "
                f"{len(self.tasks)} tasks"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not (isinstance(self.neighbourhood, (int, float)) and 0 <= self.neighbourhood < math.inf):
            raise ValueError(f"neighbourhood (EASE's L2, 0 = off) must be a finite number >= 0, "
                             f"got {self.neighbourhood!r}")

    @property
    def num_shared_experts(self) -> int:
        return self.num_experts - self.num_task_experts * len(self.tasks)

    def vocab_size(self, feature: str) -> int:
        sizes = dict(self.vocab)
        if feature not in sizes:
            raise ValueError(f"ModelConfig.vocab has no size for feature {feature!r}; call with_vocab")
        return sizes[feature]


@dataclass(frozen=True)
class RecsysConfig:
    """One training run: data protocol, model, optimisation.

    Attributes:
        dataset: "movielens-100k" | "movielens-1m".
        split: an official ML-100K fold (u1..u5, ua, ub), "random" (seeded 80/20), "temporal"
            (each user's latest 20 % of ratings are the test part) or "recbole" (per user a seeded
            random 80/10/10 fit / val / test, RecBole's default; `moe_apps.recsys.splits`).
        val_fraction: share of the training part held out for early stopping: seeded random, or
            for "temporal" each user's latest share (the protocol's own); "recbole" keeps its 10 %.
        history_dropout: probability of dropping each movie of a training rating's history.
        negatives: unrated movies drawn per rating for a task with an implicit target (``rate``):
            afresh each training epoch, once (fixed) for validation and test; 0 = ratings only.
        rate_softmax: weight of a sampled-softmax loss on the ``rate`` logit beside its BCE: each
            training rating against its own ``negatives`` unrated movies (`moe_apps.recsys.task.
            sampled_softmax`; the batches keep each rating with its negatives). 0 = off.
        batch_size, eval_batch_size: ratings per training / evaluation batch.
        embedding_l2: coefficient of the L2 penalty on the embedding rows a batch looks up.
        epochs, lr, weight_decay, schedule, grad_clip, patience, monitor, monitor_mode, seed,
        device, precision: handed to `moe_apps.training.TrainConfig`. ``monitor`` may also be a
            ranking metric of `RANKING_MONITORS` (e.g. ``ndcg@10``, with ``monitor_mode="max"``):
            each epoch then also ranks the whole catalogue for the validation part's users
            (candidates: movies not in the fit part; relevant: their validation movies), which
            on ML-100K costs about 12 s per epoch at one thread (scoring every user-movie pair).
        importance_coef: weight of moe_core's gate "importance" loss (0 = off).
    """

    dataset: str = "movielens-100k"
    split: str = "u1"
    val_fraction: float = 0.05
    history_dropout: float = 0.5
    negatives: int = 0
    rate_softmax: float = 0.0
    model: ModelConfig = field(default_factory=ModelConfig)
    batch_size: int = 1024
    eval_batch_size: int = 8192
    embedding_l2: float = 0.05
    epochs: int = 30
    lr: float = 5e-3
    weight_decay: float = 1e-4
    schedule: str = "constant"
    grad_clip: float | None = 5.0
    patience: int | None = 5
    monitor: str = "rating_rmse"
    monitor_mode: str = "min"
    importance_coef: float = 0.0
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.dataset == "movielens-1m" and self.split in OFFICIAL_SPLITS:
            raise ValueError(
                f"split {self.split!r} is an official ML-100K fold; movielens-1m has none, use "
                "--split random or --split temporal"
            )
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if not 0.0 <= self.history_dropout < 1.0:
            raise ValueError(f"history_dropout must be in [0, 1), got {self.history_dropout}")
        check_positive_int(self.negatives, "negatives", minimum=0)
        implicit = [t.name for t in self.model.tasks if t.target == "rated"]
        if implicit and self.negatives == 0:
            raise ValueError(f"task {implicit[0]!r} is learned over unrated movies too: set negatives >= 1")
        if self.negatives and not implicit:
            raise ValueError("negatives > 0 needs a task with the implicit target 'rated' (e.g. RATE)")
        if not (isinstance(self.rate_softmax, (int, float)) and 0 <= self.rate_softmax < math.inf):
            raise ValueError(f"rate_softmax must be a finite number >= 0, got {self.rate_softmax!r}")
        if self.rate_softmax and not implicit:
            raise ValueError("rate_softmax > 0 needs a task with the implicit target 'rated' (e.g. RATE)")
        check_positive_int(self.batch_size, "batch_size")
        check_positive_int(self.eval_batch_size, "eval_batch_size")
        if self.embedding_l2 < 0 or self.importance_coef < 0:
            raise ValueError("embedding_l2 and importance_coef must be >= 0")
        metrics = {"loss"} | {m for t in self.model.tasks for m in t.metric_names}
        if self.monitor not in metrics | set(RANKING_MONITORS):
            raise ValueError(f"monitor must be one of {sorted(metrics)} or a validation ranking "
                             f"metric ({', '.join(RANKING_MONITORS)}), got {self.monitor!r}")
        if self.monitor in RANKING_MONITORS and self.monitor_mode != "max":
            raise ValueError(f"monitor {self.monitor!r} is better when higher: set monitor_mode='max'")

    def train_config(self, *, progress: bool = True) -> TrainConfig:
        """The shared loop's `TrainConfig` for this run."""
        from moe_apps.training import TrainConfig

        coefficients = (("importance", self.importance_coef),) if self.importance_coef else ()
        return TrainConfig(
            epochs=self.epochs, lr=self.lr, weight_decay=self.weight_decay, optimizer="adamw",
            schedule=self.schedule, grad_clip=self.grad_clip, precision=self.precision,
            device=self.device, seed=self.seed, aux_loss_coefficients=coefficients,
            monitor=self.monitor, monitor_mode=self.monitor_mode, patience=self.patience,
            log_every=20, progress=progress,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (config.json)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RecsysConfig:
        """Inverse of `to_dict` (ValueError on unknown keys, e.g. a foreign config.json)."""
        if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
            raise ValueError("not a recsys config: expected a dict with a 'model' dict")
        model_raw = dict(raw["model"])
        model_raw["tasks"] = tuple(TaskSpec(**t) for t in model_raw.get("tasks", ()))
        model_raw["vocab"] = tuple((str(k), int(v)) for k, v in model_raw.get("vocab", ()))
        _check_keys(model_raw, ModelConfig)
        top = {**raw, "model": ModelConfig(**model_raw)}
        _check_keys(top, cls)
        return cls(**top)


def _check_keys(raw: dict[str, Any], cls: type) -> None:
    unknown = set(raw) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {sorted(unknown)}")


def with_vocab(config: RecsysConfig, vocab: dict[str, int]) -> RecsysConfig:
    """``config`` with the model's feature vocabulary sizes set."""
    return replace(config, model=replace(config.model, vocab=tuple(sorted(vocab.items()))))


def default_preset() -> RecsysConfig:
    """MMoE on ML-100K fold u1: the run `moe-apps recsys train` makes with no options."""
    return RecsysConfig()


def ple_preset() -> RecsysConfig:
    """PLE (two CGC levels, one expert per task and two shared per level) on ML-100K u1.

    Dropout 0.3: at the default 0.6 PLE's validation RMSE swung by 0.01-0.02 between epochs and
    early stopping fired early (fold u1 test RMSE 0.941 at 0.6, 0.929 at 0.3)."""
    return RecsysConfig(model=ModelConfig(model="ple", dropout=0.3))


def three_tasks_preset() -> RecsysConfig:
    """MMoE with a third task, dislike (rating <= 2)."""
    return RecsysConfig(model=ModelConfig(tasks=(LIKE, RATING, DISLIKE), num_experts=6))


def tiny_preset() -> RecsysConfig:
    """A seconds-long run for tests and smoke checks (2 epochs, small widths)."""
    return RecsysConfig(
        model=ModelConfig(embedding_dim=4, num_experts=3, expert_dim=8, tower_dim=4, dropout=0.1),
        batch_size=64, epochs=2, patience=None,
    )


def ml1m_preset() -> RecsysConfig:
    """MMoE on MovieLens 1M with the per-user temporal split and bigger batches."""
    return RecsysConfig(dataset="movielens-1m", split="temporal", batch_size=4096, epochs=20)


def ranking_preset() -> RecsysConfig:
    """The ESMM-style task mix for top-K lists (Ma et al. 2018): ``rate`` (did the user rate the
    movie; over the whole catalogue, four unrated movies drawn afresh per rating each epoch),
    ``like`` given rated, and the rating; ranked by P(rate) (corrected for the sampled negatives,
    `moe_apps.recsys.ranking.sampling_odds_ratio`) x P(like | rate). 64-d embeddings; MMoE with 6
    experts of 32 (PLE: one per task + 3 shared); `--model` swaps the bottom on the same
    features. Four negatives and 64-d tables against one and 16-d: fold u1 NDCG@10 0.4005 ->
    0.4452 (MMoE), 0.4083 -> 0.4328 (shared-bottom), 0.3945 -> 0.4451 (PLE); docs/BENCHMARKS.md."""
    return RecsysConfig(
        model=ModelConfig(tasks=(RATE, LIKE, RATING), embedding_dim=64, num_experts=6, expert_dim=32,
                          dropout=0.3),
        negatives=4, batch_size=2048, epochs=10, patience=2, monitor="loss",
    )


def ranking_ease_preset() -> RecsysConfig:
    """`ranking_preset` plus the EASE neighbourhood score (Steck 2019, L2 250) on each task's
    logit (`moe_apps.recsys.neighbourhood`): the better top-K lists (five folds, NDCG@10 of every
    bottom about +0.1), though the bottoms then tie (docs/BENCHMARKS.md)."""
    ranking = ranking_preset()
    return replace(ranking, model=replace(ranking.model, neighbourhood=250.0))


PRESETS: dict[str, Callable[[], RecsysConfig]] = {
    "default": default_preset,
    "ple": ple_preset,
    "three-tasks": three_tasks_preset,
    "tiny": tiny_preset,
    "ml1m": ml1m_preset,
    "ranking": ranking_preset,
    "ranking-ease": ranking_ease_preset,
}


def get_preset(name: str) -> RecsysConfig:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]()
