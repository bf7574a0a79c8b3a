"""Implicit feedback over the whole catalogue: every rating is a positive of the ``rated`` task,
and movies the user did not rate are drawn afresh each epoch as its negatives.

This is the entire-space sample of ESMM (Ma et al. 2018, "Entire Space Multi-Task Model"): the
``rate`` task (did the user rate this movie at all; ESMM's click) is learned over rated and
unrated pairs, while ``like`` (rating >= 4; ESMM's conversion) and the rating regression are
labelled only on rated pairs (the batch mask). ``negatives`` unrated movies are drawn per rating,
uniformly over the movies that user did not rate in ``seen_UI`` (rejection sampling; the same
user, so both classes have the same user mix; a user who has rated every movie gets none, the
documented answer to "nothing left to draw"). The draw depends only on the seed, e.g.
``(run seed, epoch)``: a fresh set each epoch, the same set again on resume.

``grouped`` batches keep each rating next to its own negatives (``RecsysBatch.group_B``), for a
sampled-softmax loss on ``rate`` (each rating against its negatives; Jean et al. 2015, the
sampled softmax of Covington et al. 2016's candidate generator): the groups are shuffled, not
the rows, and a batch holds ``batch_size`` rows as before (a group cut by a batch boundary
counts in neither part's softmax that lacks its rating or every negative).

Shapes: N rows (ratings + negatives), U users, I movies.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from moe_apps.datasets import Ratings
from moe_apps.recsys.config import TaskSpec
from moe_apps.recsys.data import IMPLICIT_TARGETS, Features, RatingBatches, RecsysBatch, make_batch

REJECTION_ROUNDS = 30
HELD_OUT_STREAM = 1 << 20  # seed stream of held-out negatives, apart from the epochs' (seed, epoch)


def sample_unrated(seen_UI: Tensor, user_N: Tensor, generator: torch.Generator) -> Tensor:
    """For each ``user_N[n]`` one movie that user has not rated (uniform over those movies).

    Rejection sampling; the rare rows still on a rated movie after `REJECTION_ROUNDS` rounds take
    the user's first unrated movie. ValueError if a user has rated every movie."""
    num_items = seen_UI.shape[1]
    full = seen_UI[user_N].all(1) if len(user_N) else torch.zeros(0, dtype=torch.bool)
    if bool(full.any()):
        raise ValueError(f"user index {int(user_N[full][0])} has rated every movie: no unrated movie "
                         "to sample; leave such users out of the implicit task")
    item_N = torch.randint(num_items, (len(user_N),), generator=generator)
    for _ in range(REJECTION_ROUNDS):
        bad = seen_UI[user_N, item_N]
        if not bool(bad.any()):
            return item_N
        item_N[bad] = torch.randint(num_items, (int(bad.sum()),), generator=generator)
    bad = seen_UI[user_N, item_N]
    item_N[bad] = (~seen_UI[user_N[bad]]).int().argmax(1)
    return item_N


class ImplicitBatches:
    """Batches of ``ratings`` (positives, rating > 0) mixed with ``negatives`` unrated pairs per
    rating (rating 0), shuffled; sized, built lazily, the same for the same ``seed``.

    ``in_fit`` says whether the positives belong to the fit part (their movie then leaves their
    history); negatives never do. ``seen_UI``: the movies that count as rated for sampling (the
    training part for training; the training part plus ``ratings`` for validation)."""

    def __init__(self, features: Features, tasks: Sequence[TaskSpec], ratings: Ratings,
                 batch_size: int, *, negatives: int, seen_UI: Tensor, seed: Sequence[int],
                 in_fit: bool, history_dropout: float = 0.0, grouped: bool = False) -> None:
        if len(ratings) == 0:
            raise ValueError("cannot make batches from an empty set of ratings")
        if not isinstance(negatives, int) or negatives < 0:
            raise ValueError(f"negatives per rating must be an integer >= 0, got {negatives!r}")
        if not 0.0 <= history_dropout < 1.0:
            raise ValueError(f"history_dropout must be in [0, 1), got {history_dropout}")
        self.features, self.tasks, self.ratings = features, tuple(tasks), ratings
        self.batch_size, self.negatives, self.seen_UI = batch_size, negatives, seen_UI
        self.seed, self.in_fit, self.history_dropout = tuple(seed), in_fit, history_dropout
        self.grouped = grouped

    def _negative_ratings(self) -> Tensor:
        """The rating each negative is drawn for: ``negatives`` per rating, except for a user who
        has rated every movie (nothing to draw; documented answer: that user's ratings get none)."""
        user_P = torch.as_tensor(self.ratings.user, dtype=torch.int64)
        return torch.nonzero(~self.seen_UI.all(1)[user_P]).squeeze(1).repeat(self.negatives)

    def __len__(self) -> int:
        rows = len(self.ratings) + len(self._negative_ratings())
        return -(-rows // self.batch_size)

    def rows(self) -> tuple[Tensor, Tensor, np.ndarray, Tensor, Tensor | None]:
        """(user_N, item_N, rating_N, in_fit_N, group_N) of the epoch (negatives have rating 0),
        rows shuffled; if ``grouped``, the rating groups shuffled instead, each rating first and
        ``group_N`` its group's position (else None)."""
        generator = torch.Generator().manual_seed(
            int(np.random.default_rng(list(self.seed)).integers(2**62)))
        user_P = torch.as_tensor(self.ratings.user, dtype=torch.int64)
        item_P = torch.as_tensor(self.ratings.item, dtype=torch.int64)
        rating_M = self._negative_ratings()
        user_M = user_P[rating_M]
        item_M = sample_unrated(self.seen_UI, user_M, generator)
        user_N, item_N = torch.cat([user_P, user_M]), torch.cat([item_P, item_M])
        rating_N = np.concatenate([self.ratings.rating.astype(np.float32),
                                   np.zeros(len(user_M), dtype=np.float32)])
        in_fit_N = torch.cat([torch.full((len(user_P),), self.in_fit),
                              torch.zeros(len(user_M), dtype=torch.bool)])
        if not self.grouped:
            order = torch.randperm(len(user_N), generator=generator)
            return user_N[order], item_N[order], rating_N[order.numpy()], in_fit_N[order], None
        position_P = torch.randperm(len(user_P), generator=generator)  # the groups' new order
        group_N = position_P[torch.cat([torch.arange(len(user_P)), rating_M])]
        group_N, order = torch.sort(group_N, stable=True)  # each rating before its negatives
        return user_N[order], item_N[order], rating_N[order.numpy()], in_fit_N[order], group_N

    def __iter__(self) -> Iterator[RecsysBatch]:
        user_N, item_N, rating_N, in_fit_N, group_N = self.rows()
        generator = torch.Generator().manual_seed(
            int(np.random.default_rng([*self.seed, 1]).integers(2**62)))
        for start in range(0, len(user_N), self.batch_size):
            part = slice(start, start + self.batch_size)
            group_B = None if group_N is None else group_N[part] - group_N[start]
            yield make_batch(self.features, self.tasks, user_N[part], item_N[part], rating_N[part],
                             in_fit_B=in_fit_N[part], history_dropout=self.history_dropout,
                             generator=generator, group_B=group_B)


def uses_negatives(tasks: Sequence[TaskSpec]) -> bool:
    """Whether a task is labelled on unrated pairs (so batches need sampled negatives)."""
    return any(t.target in IMPLICIT_TARGETS for t in tasks)


def training_batches(features: Features, tasks: Sequence[TaskSpec], fit: Ratings, *, batch_size: int,
                     negatives: int, seen_UI: Tensor, seed: Sequence[int],
                     history_dropout: float, grouped: bool = False) -> RatingBatches | ImplicitBatches:
    """One epoch's training batches: the fit ratings alone (``negatives == 0``) or mixed with
    ``negatives`` unrated movies per rating drawn for this ``seed`` (e.g. (run seed, epoch)),
    ``grouped`` for a sampled softmax."""
    if negatives == 0:
        return RatingBatches(features, tasks, fit, batch_size, in_fit=True, seed=seed,
                             history_dropout=history_dropout)
    return ImplicitBatches(features, tasks, fit, batch_size, negatives=negatives, seen_UI=seen_UI,
                           seed=seed, in_fit=True, history_dropout=history_dropout, grouped=grouped)


def held_out_batches(features: Features, tasks: Sequence[TaskSpec], ratings: Ratings, *,
                     batch_size: int, negatives: int, seen_UI: Tensor,
                     seed: int) -> RatingBatches | ImplicitBatches:
    """Validation or test batches, in a fixed order: the ratings alone, or with ``negatives``
    unrated movies per rating drawn once from ``seed`` (the same set at every evaluation), so
    the implicit task's AUC and log loss see both classes. ``seen_UI`` must hold ``ratings``."""
    if negatives == 0:
        return RatingBatches(features, tasks, ratings, batch_size, in_fit=False)
    return ImplicitBatches(features, tasks, ratings, batch_size, negatives=negatives,
                           seen_UI=seen_UI, seed=(seed, HELD_OUT_STREAM), in_fit=False)
