"""Evaluation protocols as four parts: train = fit + val (what the model may see), and test.

`protocol_parts` is the one place that decides, for a protocol name, which ratings the model fits,
which ones validation (early stopping, model choice) reads, and which ones the test reads once.
Validation follows the protocol it stands in for:

* official folds ``u1..u5 / ua / ub`` and ``random`` (a random test part): a seeded random
  ``val_fraction`` of the training part (the test part is random too);
* ``temporal`` (the test part is each user's latest 20 %): each user's latest ``val_fraction`` of
  the *training* part (at least one rating for a user with two or more), so early stopping sees
  the future the way the test does;
* ``recbole``: RecBole's default protocol (Zhao et al. 2021, ``RS: [0.8, 0.1, 0.1]``, random
  order, grouped by user): per user, a seeded random 80 % / 10 % / 10 % (fit / val / test;
  ``floor(0.1 n)`` ratings each for val and test, at least one for a user with three or more);
  every rating is a positive, and at test time the validation movies are masked like the
  training ones (they belong to ``train``). ``val_fraction`` does not apply.

Seeds: the split's own (``random``, ``recbole``) and the validation slice's come from the run's
seed (0 by default); a seed is never chosen by its result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moe_apps.datasets import MovieLensData, Ratings
from moe_apps.recsys.data import make_split, temporal_split, validation_slice

RECBOLE_RATIOS = (0.8, 0.1, 0.1)


@dataclass(frozen=True)
class Parts:
    """The ratings of one protocol: ``train`` = ``fit`` + ``val`` (a test movie's user's seen
    movies come from ``train``), ``test`` read once at the end."""

    train: Ratings
    test: Ratings
    fit: Ratings
    val: Ratings


def _concat(a: Ratings, b: Ratings) -> Ratings:
    return Ratings(*(np.concatenate([getattr(a, f), getattr(b, f)])
                     for f in ("user", "item", "rating", "timestamp")))


def recbole_split(ratings: Ratings, seed: int,
                  ratios: tuple[float, float, float] = RECBOLE_RATIOS) -> tuple[Ratings, Ratings, Ratings]:
    """(fit, val, test): per user a seeded random ``ratios`` split of the user's ratings."""
    key = np.random.default_rng([seed, 2]).random(len(ratings))
    order = np.lexsort((key, ratings.user))
    user_sorted = ratings.user[order]
    counts = np.bincount(user_sorted)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(order)) - starts[user_sorted]  # random rank within the user
    n_val = np.floor(ratios[1] * counts).astype(np.int64)
    n_test = np.floor(ratios[2] * counts).astype(np.int64)
    n_val = np.where((n_val == 0) & (counts >= 3), 1, n_val)
    n_test = np.where((n_test == 0) & (counts >= 3), 1, n_test)
    part = np.zeros(len(ratings), dtype=np.int64)  # 0 fit, 1 val, 2 test
    n_fit = counts - n_val - n_test
    part[order] = np.where(rank < n_fit[user_sorted], 0, np.where(rank < (n_fit + n_val)[user_sorted], 1, 2))
    return tuple(ratings.subset(np.flatnonzero(part == p)) for p in range(3))  # type: ignore[return-value]


def temporal_validation(train: Ratings, fraction: float) -> tuple[Ratings, Ratings]:
    """(fit, val): each user's latest ``fraction`` of the training part (by timestamp)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val fraction must be in (0, 1), got {fraction}")
    fit, val = temporal_split(train, fraction)
    if len(val) == 0 or len(fit) == 0:
        raise ValueError(f"training part has {len(train)} ratings, too few to hold out each user's "
                         f"latest {fraction:.0%}")
    return fit, val


def protocol_parts(data: MovieLensData, split: str, seed: int, val_fraction: float) -> Parts:
    """The fit / val / test parts of protocol ``split`` (ValueError if unknown or a part is empty)."""
    if split == "recbole":
        fit, val, test = recbole_split(data.ratings, seed)
        for name, part in (("fit", fit), ("val", val), ("test", test)):
            if len(part) == 0:
                raise ValueError(f"split 'recbole' of {data.name} has an empty {name} part")
        return Parts(_concat(fit, val), test, fit, val)
    train, test = make_split(data, split, seed)
    if split == "temporal":
        fit, val = temporal_validation(train, val_fraction)
    else:
        fit, val = validation_slice(train, val_fraction, seed)
    return Parts(train, test, fit, val)

