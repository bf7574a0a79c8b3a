"""The recsys `Task` for the shared training loop: weighted multi-task loss and per-task metrics.

Loss: ``sum_t w_t * L_t + rate_softmax * S + embedding_l2 * embedding_sq`` with ``L_t`` the binary
cross-entropy on the logit (binary tasks) or the mean squared error of the prediction (regression
tasks), ``S`` the optional sampled softmax of the ``rate`` logit (each training rating against its
own sampled unrated movies, `sampled_softmax`) and ``embedding_sq`` the squared norms of the
embedding rows the batch looked up (the usual per-example L2 of matrix factorisation). Metrics
come from scikit-learn: ROC AUC and log loss for binary tasks, RMSE and MAE for regression tasks,
plus the weighted validation ``loss`` and, for models with gates, the mean gate weight per task
and expert (``gate_<task>_<expert>``: expert utilisation).
A batch's ``mask_BT`` (pairs the user did not rate: only the implicit ``rated`` task has a label)
restricts each task's loss and metrics to its labelled rows (the full-ranking metrics are
`moe_apps.recsys.ranking`'s, added by `moe_apps.recsys.train` to the test metrics and, when early
stopping follows one of them, to every validation through ``RecsysTask(ranking=...)``).

Shape legend: B batch, T tasks, E_t experts of task t's gate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_apps.recsys.config import TaskSpec
from moe_apps.recsys.data import RecsysBatch
from moe_apps.recsys.ranking import RATE_TARGET


@dataclass(frozen=True)
class Predictions:
    """Targets and predictions of a whole evaluation set, and the summed gate weights."""

    targets_BT: np.ndarray
    predictions_BT: np.ndarray
    gate_means: list[np.ndarray] | None  # per task, (E_t,) mean gate weight over the set
    mask_BT: np.ndarray | None = None  # bool, where each task has a label (None = everywhere)


def binary_metrics(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """(ROC AUC, log loss) via scikit-learn; AUC is nan when only one class is present."""
    from sklearn.metrics import log_loss, roc_auc_score

    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    auc = float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else math.nan
    return auc, float(log_loss(y, p, labels=[0, 1]))


def regression_metrics(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """(RMSE, MAE) via scikit-learn."""
    from sklearn.metrics import mean_absolute_error, mean_squared_error

    return (float(np.sqrt(mean_squared_error(y, p))), float(mean_absolute_error(y, p)))


def task_metrics(tasks: Sequence[TaskSpec], targets_BT: np.ndarray, predictions_BT: np.ndarray,
                 mask_BT: np.ndarray | None = None) -> dict[str, float]:
    """``{<task>_auc, <task>_logloss | <task>_rmse, <task>_mae, ..., loss}`` over a whole set
    (each task over its labelled rows of ``mask_BT``; nan for a task without any)."""
    if targets_BT.shape != predictions_BT.shape or targets_BT.shape[1:] != (len(tasks),):
        raise ValueError(
            f"targets {targets_BT.shape} and predictions {predictions_BT.shape} must both be "
            f"(B, T={len(tasks)})"
        )
    if len(targets_BT) == 0:
        raise ValueError("cannot compute metrics on an empty set of ratings")
    metrics: dict[str, float] = {}
    loss = 0.0
    for t, spec in enumerate(tasks):
        y, p = targets_BT[:, t].astype(np.float64), predictions_BT[:, t].astype(np.float64)
        if mask_BT is not None:
            y, p = y[mask_BT[:, t]], p[mask_BT[:, t]]
        names = spec.metric_names
        if len(y) == 0:
            metrics[names[0]], metrics[names[1]] = math.nan, math.nan
            continue
        if spec.kind == "binary":
            first, second = binary_metrics(y, p)
            loss += spec.loss_weight * second
        else:
            first, second = regression_metrics(y, p)
            loss += spec.loss_weight * first**2
        metrics[names[0]], metrics[names[1]] = first, second
    metrics["loss"] = loss
    return metrics


def entire_space_bce(rate_logit_B: Tensor, like_logit_B: Tensor, rated_and_liked_B: Tensor) -> Tensor:
    """Per-row BCE of ``P(rate) x P(like | rate)`` against "rated and liked" (0 on unrated pairs):
    ESMM's pCTCVR loss (Ma et al. 2018), which trains the conditional tower over the entire space."""
    log_p = F.logsigmoid(rate_logit_B) + F.logsigmoid(like_logit_B)
    log_not_p = torch.log1p(-torch.exp(log_p).clamp(max=1.0 - 1e-6))
    return -(rated_and_liked_B * log_p + (1.0 - rated_and_liked_B) * log_not_p)


def sampled_softmax(logit_B: Tensor, group_B: Tensor, positive_B: Tensor) -> Tensor:
    """Mean over groups of ``-log softmax`` of the group's positive row among its rows: a rating
    against its own sampled unrated movies (Jean et al. 2015; Covington et al. 2016). Only groups
    with exactly one positive and at least one negative count (a group cut by a batch boundary may
    lack either); 0 if none does. ``group_B``: int64 ids in ``[0, G)``; ``positive_B``: bool."""
    num_groups = int(group_B.max()) + 1 if len(group_B) else 0
    zeros_G = logit_B.new_zeros(num_groups)
    max_G = torch.full_like(zeros_G, -math.inf).scatter_reduce(0, group_B, logit_B.detach(), "amax")
    sum_exp_G = zeros_G.index_add(0, group_B, (logit_B - max_G[group_B]).exp())
    positive_logit_G = zeros_G.index_add(0, group_B, torch.where(positive_B, logit_B, 0.0))
    positives_G = torch.bincount(group_B[positive_B], minlength=num_groups)
    valid_G = (positives_G == 1) & (torch.bincount(group_B, minlength=num_groups) > 1)
    if not bool(valid_G.any()):
        return logit_B.sum() * 0.0
    return (max_G + sum_exp_G.log() - positive_logit_G)[valid_G].mean()


def task_losses(tasks: Sequence[TaskSpec], logits_BT: Tensor, predictions_BT: Tensor,
                targets_BT: Tensor, mask_BT: Tensor | None = None) -> list[Tensor]:
    """Unweighted per-task losses: BCE-with-logits (binary) or MSE (regression), each the mean
    over the rows where the task has a label (``mask_BT``; all rows if None, 0 if none).

    With an implicit ``rated`` task beside ``like``, the like loss is ESMM's entire-space one
    (`entire_space_bce` over every row: rated or sampled unrated), so P(like | rate) is learned
    through the product that ranks the lists; its metrics stay those of P(like | rate) on rated rows."""
    targets = [spec.target for spec in tasks]
    esmm = RATE_TARGET in targets and "like" in targets
    losses = []
    for t, spec in enumerate(tasks):
        if esmm and spec.target == "like":  # ESMM: P(rate) x P(like | rate) vs "rated and liked"
            losses.append(entire_space_bce(logits_BT[:, targets.index(RATE_TARGET)].float(),
                                           logits_BT[:, t].float(), targets_BT[:, t]).mean())
            continue
        if spec.kind == "binary":
            per_row = F.binary_cross_entropy_with_logits(logits_BT[:, t].float(), targets_BT[:, t],
                                                         reduction="none")
        else:
            per_row = (predictions_BT[:, t].float() - targets_BT[:, t]).square()
        if mask_BT is None:
            losses.append(per_row.mean())
        else:
            weight = mask_BT[:, t].float()
            losses.append((per_row * weight).sum() / weight.sum().clamp(min=1.0))
    return losses


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[RecsysBatch]) -> Predictions:
    """Run ``model`` over ``batches`` (already on the model's device) and gather everything."""
    targets, predictions, masks, gate_sums, count = [], [], [], None, 0
    for batch in batches:
        out = model(batch)
        targets.append(batch.targets_BT.float().cpu())
        predictions.append(out.predictions_BT.float().cpu())
        masks.append(torch.ones_like(batch.targets_BT, dtype=torch.bool).cpu()
                     if batch.mask_BT is None else batch.mask_BT.cpu())
        if out.gate_weights is not None:
            sums = [g.float().sum(0).cpu() for g in out.gate_weights]
            gate_sums = sums if gate_sums is None else [a + b for a, b in zip(gate_sums, sums, strict=True)]
        count += len(batch)
    if count == 0:
        raise ValueError("no batches to evaluate (empty validation or test part)")
    gate_means = None if gate_sums is None else [(g / count).numpy() for g in gate_sums]
    mask = torch.cat(masks)
    return Predictions(torch.cat(targets).numpy(), torch.cat(predictions).numpy(), gate_means,
                       None if bool(mask.all()) else mask.numpy())


def gate_metrics(tasks: Sequence[TaskSpec], gate_means: list[np.ndarray] | None,
                 labels: list[list[str]] | None) -> dict[str, float]:
    """``{gate_<task>_<expert>: mean weight}`` (empty for models without gates)."""
    if gate_means is None or labels is None:
        return {}
    return {
        f"gate_{spec.name}_{label}": float(weight)
        for spec, means, names in zip(tasks, gate_means, labels, strict=True)
        for label, weight in zip(names, means, strict=True)
    }


class RecsysTask:
    """Implements the `moe_apps.training.Task` protocol for the recsys models."""

    def __init__(self, tasks: Sequence[TaskSpec], embedding_l2: float,
                 gate_labels: list[list[str]] | None = None,
                 ranking: Callable[[nn.Module], dict[str, float]] | None = None,
                 rate_softmax: float = 0.0) -> None:
        """``ranking``: model -> full-ranking metrics of the validation part, added to every
        validation (so early stopping can watch e.g. ``ndcg@10``); None = none. ``rate_softmax``:
        weight of `sampled_softmax` on the ``rate`` logit for batches with ``group_B``."""
        if embedding_l2 < 0 or rate_softmax < 0:
            raise ValueError(f"embedding_l2 and rate_softmax must be >= 0, got {embedding_l2}, {rate_softmax}")
        targets = [spec.target for spec in tasks]
        if rate_softmax and RATE_TARGET not in targets:
            raise ValueError(f"rate_softmax needs a task with the target {RATE_TARGET!r}")
        self.tasks, self.embedding_l2, self.gate_labels = tuple(tasks), embedding_l2, gate_labels
        self.ranking, self.rate_softmax = ranking, rate_softmax
        self.rate_index = targets.index(RATE_TARGET) if rate_softmax else None

    def training_loss(self, model: nn.Module, batch: RecsysBatch) -> tuple[Tensor, dict[str, Tensor]]:
        out = model(batch)
        losses = task_losses(self.tasks, out.logits_BT, out.predictions_BT, batch.targets_BT,
                             batch.mask_BT)
        loss = sum(spec.loss_weight * value for spec, value in zip(self.tasks, losses, strict=True))
        loss = loss + self.embedding_l2 * out.embedding_sq
        logs = {f"{spec.name}_loss": v.detach() for spec, v in zip(self.tasks, losses, strict=True)}
        if self.rate_index is not None and batch.group_B is not None:
            r = self.rate_index
            softmax = sampled_softmax(out.logits_BT[:, r].float(), batch.group_B, batch.targets_BT[:, r] > 0)
            loss = loss + self.rate_softmax * softmax
            logs["rate_softmax_loss"] = softmax.detach()
        return loss, logs

    def evaluate(self, model: nn.Module, batches: Iterable[RecsysBatch]) -> dict[str, float]:
        result = predict(model, batches)
        metrics = task_metrics(self.tasks, result.targets_BT, result.predictions_BT, result.mask_BT)
        metrics.update(gate_metrics(self.tasks, result.gate_means, self.gate_labels))
        if self.ranking is not None:
            metrics.update(self.ranking(model))
        return metrics
