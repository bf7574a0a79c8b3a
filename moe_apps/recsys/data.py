"""MovieLens ratings -> evaluation protocols and typed torchrec batches for the recsys app.

Protocols (`make_split`): the official ML-100K folds u1..u5 / ua / ub, a seeded random 80/20
split, and a per-user temporal split (each user's latest 20 % of ratings form the test part).
`validation_slice` holds out a seeded share of the training part for early stopping; the test part
is only read once, at the end.

Features (`build_features`) are looked up per rating and packed into a torchrec
`KeyedJaggedTensor` (one id per rating for user, movie, gender, age bucket, occupation, zip prefix,
release-year bucket; several for ``genres``; and ``history``, the movies the user rated in the
*fit* part of the training data -- implicit feedback as in SVD++ (Koren 2008), mean-pooled). The
history never contains test or validation ratings, and a rating's own movie is left out of its
history, so training rows look like test rows; training batches may also drop each history
movie at random (``history_dropout``, a regulariser). Two dense features: log1p of the user's and the
movie's number of fit ratings (again without the rating itself), and optionally a third: the
pair's cross-fitted EASE item-item score (`moe_apps.recsys.neighbourhood`, ``neighbourhood > 0``).

Rows may also be (user, movie) pairs the user did not rate (rating 0, drawn by
`moe_apps.recsys.implicit`): only tasks with an implicit target (``rated``) have a label there, so
a batch carries a per-task mask. `CandidateBatch` scores users against many movies at once: the
user-side and movie-side features are looked up once per user and once per movie and paired by
index (what full ranking and the exported model use; equal to `make_batch` for unfitted rows).

Shapes: B ratings in a batch, T tasks, F dense features, V jagged values, U users, I movies.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torchrec import KeyedJaggedTensor

from moe_apps.datasets import MovieLensData, Ratings
from moe_apps.recsys.config import OFFICIAL_SPLITS, SPLITS, TARGETS, TaskSpec
from moe_apps.recsys.neighbourhood import NeighbourhoodScores, neighbourhood_scores

SPARSE_FEATURES = ("user", "item", "gender", "age", "occupation", "zip", "year", "genres", "history")
USER_SIDE = ("user", "gender", "age", "occupation", "zip", "history")
ITEM_SIDE = ("item", "year", "genres")
#: targets defined on a pair the user did not rate (rating 0); every other task is masked there.
IMPLICIT_TARGETS = ("rated",)
AGE_EDGES = (18, 25, 35, 45, 50, 56)  # ML-1M's age groups; ML-100K ages (years) fall in the same
YEAR_BUCKETS = 18  # 0 unknown, 1 = before 1925, then 5-year buckets up to 1995+
TEST_FRACTION = 0.2


def random_split(ratings: Ratings, seed: int, test_fraction: float = TEST_FRACTION) -> tuple[Ratings, Ratings]:
    """A seeded random split of the ratings into (train, test)."""
    order = np.random.default_rng(seed).permutation(len(ratings))
    cut = len(ratings) - int(round(test_fraction * len(ratings)))
    return ratings.subset(np.sort(order[:cut])), ratings.subset(np.sort(order[cut:]))


def temporal_split(ratings: Ratings, test_fraction: float = TEST_FRACTION) -> tuple[Ratings, Ratings]:
    """Per user, the latest ``test_fraction`` of the ratings (by timestamp, ties by file order) go
    to the test part; a user with one rating keeps it in train."""
    order = np.lexsort((np.arange(len(ratings)), ratings.timestamp, ratings.user))
    user_sorted = ratings.user[order]
    counts = np.bincount(user_sorted)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(order)) - starts[user_sorted]  # 0 = the user's earliest rating
    n_test = np.floor(test_fraction * counts).astype(np.int64)
    n_test = np.where((n_test == 0) & (counts >= 2), 1, n_test)
    is_test = np.zeros(len(ratings), dtype=bool)
    is_test[order] = rank >= counts[user_sorted] - n_test[user_sorted]
    return ratings.subset(np.flatnonzero(~is_test)), ratings.subset(np.flatnonzero(is_test))


def make_split(data: MovieLensData, split: str, seed: int) -> tuple[Ratings, Ratings]:
    """(train, test) of protocol ``split``; ValueError if unknown, missing, or a part is empty."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split in OFFICIAL_SPLITS:
        if split not in data.folds:
            raise ValueError(
                f"split {split!r}: {data.name} has no official folds; use 'random' or 'temporal'"
            )
        train, test = data.folds[split]
    elif split == "random":
        train, test = random_split(data.ratings, seed)
    elif split == "temporal":
        train, test = temporal_split(data.ratings)
    else:  # three parts (e.g. recbole): moe_apps.recsys.splits.protocol_parts
        raise ValueError(f"split {split!r} has a validation part of its own; use "
                         "moe_apps.recsys.splits.protocol_parts")
    for part, ratings in (("train", train), ("test", test)):
        if len(ratings) == 0:
            raise ValueError(f"split {split!r} of {data.name} has an empty {part} part")
    return train, test


def validation_slice(train: Ratings, fraction: float, seed: int) -> tuple[Ratings, Ratings]:
    """(fit, val): a seeded random ``fraction`` of the training ratings held out for validation."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val fraction must be in (0, 1), got {fraction}")
    n_val = max(1, int(round(fraction * len(train))))
    if n_val >= len(train):
        raise ValueError(f"training part has {len(train)} ratings, too few to hold out {fraction:.0%}")
    order = np.random.default_rng([seed, 1]).permutation(len(train))
    return train.subset(np.sort(order[n_val:])), train.subset(np.sort(order[:n_val]))


@dataclass(frozen=True)
class Csr:
    """A jagged table: row r holds ``values[offsets[r]:offsets[r + 1]]`` (int64 tensors)."""

    offsets: Tensor
    values: Tensor

    @classmethod
    def build(cls, rows: np.ndarray, values: np.ndarray, num_rows: int) -> Csr:
        order = np.lexsort((values, rows))
        counts = np.bincount(rows, minlength=num_rows)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(torch.from_numpy(offsets), torch.from_numpy(values[order].astype(np.int64)))

    def gather(self, rows_B: Tensor, exclude_B: Tensor | None = None, drop: float = 0.0,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(values_V, lengths_B) of the given rows, leaving out the value ``exclude_B[b]`` of row b
        and, with ``drop > 0``, each value with probability ``drop`` (drawn from ``generator``)."""
        starts_B = self.offsets[rows_B]
        lengths_B = self.offsets[rows_B + 1] - starts_B
        total = int(lengths_B.sum())
        row_V = torch.repeat_interleave(torch.arange(len(rows_B)), lengths_B, output_size=total)
        first_V = torch.repeat_interleave(torch.cumsum(lengths_B, 0) - lengths_B, lengths_B,
                                          output_size=total)
        values_V = self.values[starts_B[row_V] + torch.arange(total) - first_V]
        if exclude_B is not None or drop > 0:
            keep_V = torch.ones(total, dtype=torch.bool)
            if exclude_B is not None:
                keep_V &= values_V != exclude_B[row_V]
            if drop > 0:
                keep_V &= torch.rand(total, generator=generator) >= drop
            values_V = values_V[keep_V]
            lengths_B = torch.bincount(row_V[keep_V], minlength=len(rows_B))
        return values_V, lengths_B


@dataclass(frozen=True)
class Features:
    """Per-user and per-movie feature ids, the genre and history tables, and the vocabulary."""

    user_ids: dict[str, Tensor]  # gender, age, occupation, zip: (num_users,)
    item_year: Tensor  # (num_items,)
    genres: Csr  # movie -> genre ids
    history: Csr  # user -> movies rated in the fit part
    user_count: Tensor  # (num_users,) fit ratings per user
    item_count: Tensor  # (num_items,)
    vocab: dict[str, int]
    neighbourhood: NeighbourhoodScores | None = None  # the EASE pair feature, if on


def build_features(data: MovieLensData, fit: Ratings, neighbourhood: float = 0.0, seed: int = 0) -> Features:
    """Feature tables of ``data``; history, counts and the neighbourhood scores come from ``fit``
    only. ``neighbourhood``: EASE's L2 for the pair score (0 = no such feature); ``seed`` deals the
    fit ratings into its cross-fitting folds."""
    users, items = data.users, data.items
    prefixes = [z[:2].upper() if z[:2].isalnum() else "?" for z in users.zip_code]
    zip_vocab = {p: i for i, p in enumerate(sorted(set(prefixes)))}
    year = items.year.astype(np.int64)
    year_bucket = np.where(year == 0, 0, 1 + np.clip((year - 1920) // 5, 0, YEAR_BUCKETS - 2))
    genre_rows, genre_cols = np.nonzero(np.asarray(items.genres, dtype=bool))
    num_users, num_items = len(users), len(items)
    user_ids = {
        "gender": torch.as_tensor(np.asarray(users.gender, dtype=np.int64)),
        "age": torch.as_tensor(np.searchsorted(AGE_EDGES, np.asarray(users.age), side="right")),
        "occupation": torch.as_tensor(np.asarray(users.occupation, dtype=np.int64)),
        "zip": torch.as_tensor(np.array([zip_vocab[p] for p in prefixes], dtype=np.int64)),
    }
    vocab = {
        "user": num_users, "item": num_items, "gender": 2, "age": len(AGE_EDGES) + 1,
        "occupation": max(len(users.occupation_names), int(user_ids["occupation"].max()) + 1),
        "zip": len(zip_vocab), "year": YEAR_BUCKETS, "genres": len(items.genre_names),
        "history": num_items,
    }
    return Features(
        user_ids=user_ids,
        item_year=torch.as_tensor(year_bucket.astype(np.int64)),
        genres=Csr.build(genre_rows, genre_cols, num_items),
        history=Csr.build(fit.user, fit.item, num_users),
        user_count=torch.as_tensor(np.bincount(fit.user, minlength=num_users)),
        item_count=torch.as_tensor(np.bincount(fit.item, minlength=num_items)),
        vocab=vocab,
        neighbourhood=(neighbourhood_scores(fit, num_users, num_items, neighbourhood, seed)
                       if neighbourhood else None),
    )


@dataclass(frozen=True)
class RecsysBatch:
    """B (user, movie) pairs: torchrec sparse features, dense features, per-task targets."""

    sparse: KeyedJaggedTensor  # keys SPARSE_FEATURES
    dense_BF: Tensor  # float32
    targets_BT: Tensor  # float32, one column per task
    user_B: Tensor
    item_B: Tensor
    mask_BT: Tensor | None = None  # bool, False where a task has no label (unrated pairs); None = all
    group_B: Tensor | None = None  # int64, a rating and its own sampled unrated movies share an id

    def to(self, device: torch.device | str) -> RecsysBatch:
        mask, group = (None if t is None else t.to(device) for t in (self.mask_BT, self.group_B))
        return RecsysBatch(self.sparse.to(device), self.dense_BF.to(device),
                           self.targets_BT.to(device), self.user_B.to(device), self.item_B.to(device),
                           mask, group)

    def __len__(self) -> int:
        return len(self.user_B)


def stack_dense(user_B: Tensor, item_B: Tensor, pair_B: Tensor | None) -> Tensor:
    """``dense_BF``: the user's and the movie's count features, then the pair's neighbourhood
    score when there is one (batches, candidate pairs and the exported model stack it alike)."""
    return torch.stack([user_B, item_B] if pair_B is None else [user_B, item_B, pair_B], 1)


def make_batch(features: Features, tasks: Sequence[TaskSpec], user_B: Tensor, item_B: Tensor,
               rating_B: np.ndarray | None, *, in_fit_B: Tensor | None = None,
               history_dropout: float = 0.0, generator: torch.Generator | None = None,
               group_B: Tensor | None = None) -> RecsysBatch:
    """One batch; ``in_fit_B`` (bool) marks rows whose rating is in the fit part, whose movie is
    then left out of the history and whose counts are lowered by one (default: all False).
    A rating of 0 marks a pair the user did not rate: only `IMPLICIT_TARGETS` tasks are labelled
    there (``mask_BT``). ``group_B`` (optional) ties each rating to its own sampled unrated
    movies, for the sampled-softmax loss.
    ``history_dropout`` drops each history movie with that probability (training-time
    regularisation, like the node dropout of GC-MC, van den Berg et al. 2017)."""
    in_fit_B = torch.zeros(len(user_B), dtype=torch.bool) if in_fit_B is None else in_fit_B
    genre_V, genre_len_B = features.genres.gather(item_B)
    exclude_B = torch.where(in_fit_B, item_B, torch.full_like(item_B, -1))
    hist_V, hist_len_B = features.history.gather(user_B, exclude_B, history_dropout, generator)
    ones_B = torch.ones_like(user_B)
    singles = [user_B, item_B, *(features.user_ids[k][user_B] for k in ("gender", "age", "occupation", "zip")),
               features.item_year[item_B]]
    values = torch.cat([*singles, genre_V, hist_V])
    lengths = torch.cat([ones_B] * len(singles) + [genre_len_B, hist_len_B])
    sparse = KeyedJaggedTensor.from_lengths_sync(keys=list(SPARSE_FEATURES), values=values,
                                                 lengths=lengths.to(torch.int64))
    own = in_fit_B.to(torch.int64)
    scores = features.neighbourhood
    dense_BF = stack_dense(torch.log1p((features.user_count[user_B] - own).float()) / 5.0,
                           torch.log1p((features.item_count[item_B] - own).float()) / 5.0,
                           None if scores is None else scores.lookup(user_B, item_B, in_fit_B))
    mask_BT = None
    if rating_B is None:
        targets_BT = torch.zeros(len(user_B), len(tasks))
    else:
        targets_BT = torch.stack([torch.as_tensor(TARGETS[t.target](rating_B)) for t in tasks], 1)
        rated_B = torch.as_tensor(rating_B > 0)
        if not bool(rated_B.all()):
            mask_BT = torch.stack([torch.ones_like(rated_B) if t.target in IMPLICIT_TARGETS
                                   else rated_B for t in tasks], 1)
    return RecsysBatch(sparse, dense_BF, targets_BT.float(), user_B, item_B, mask_BT, group_B)


@dataclass(frozen=True)
class CandidateBatch:
    """Pairs of U users and I movies whose features are looked up once per user / movie.

    ``user_sparse`` has U rows with ids only for `USER_SIDE` features (the others empty),
    ``item_sparse`` I rows with ids only for `ITEM_SIDE`; pair b is (``pair_user_B[b]``,
    ``pair_item_B[b]``), row indices into them. Rows are scored as unfitted (held-out) pairs."""

    user_sparse: KeyedJaggedTensor
    item_sparse: KeyedJaggedTensor
    user_dense_U: Tensor  # float32, log1p(fit ratings of the user) / 5
    item_dense_I: Tensor
    pair_user_B: Tensor
    pair_item_B: Tensor
    pair_dense_B: Tensor | None = None  # float32, the pair's neighbourhood score (if the feature is on)

    def to(self, device: torch.device | str) -> CandidateBatch:
        return CandidateBatch(*(None if getattr(self, f) is None else getattr(self, f).to(device) for f in (
            "user_sparse", "item_sparse", "user_dense_U", "item_dense_I", "pair_user_B", "pair_item_B",
            "pair_dense_B")))

    def __len__(self) -> int:
        return len(self.pair_user_B)


def _side_kjt(columns: dict[str, tuple[Tensor, Tensor]], rows: int) -> KeyedJaggedTensor:
    """A KJT over every sparse feature: ``columns`` maps a feature to (values, lengths); the rest empty."""
    empty = torch.zeros(rows, dtype=torch.int64)
    values = torch.cat([columns[f][0] for f in SPARSE_FEATURES if f in columns])
    lengths = torch.cat([columns[f][1] if f in columns else empty for f in SPARSE_FEATURES])
    return KeyedJaggedTensor.from_lengths_sync(keys=list(SPARSE_FEATURES), values=values,
                                               lengths=lengths.to(torch.int64))


def candidate_batch(features: Features, user_U: Tensor, item_I: Tensor,
                    pairs: tuple[Tensor, Tensor] | None = None) -> CandidateBatch:
    """Users ``user_U`` x movies ``item_I`` (dense indices): every pair (user-major), or the given
    ``pairs`` of row indices."""
    ones_U, ones_I = torch.ones_like(user_U), torch.ones_like(item_I)
    hist_V, hist_len_U = features.history.gather(user_U)
    genre_V, genre_len_I = features.genres.gather(item_I)
    user_cols = {"user": (user_U, ones_U), "history": (hist_V, hist_len_U),
                 **{k: (features.user_ids[k][user_U], ones_U) for k in ("gender", "age", "occupation", "zip")}}
    item_cols = {"item": (item_I, ones_I), "year": (features.item_year[item_I], ones_I),
                 "genres": (genre_V, genre_len_I)}
    if pairs is None:
        pairs = (torch.arange(len(user_U)).repeat_interleave(len(item_I)),
                 torch.arange(len(item_I)).repeat(len(user_U)))
    pair_dense_B = None
    if features.neighbourhood is not None:
        pair_dense_B = features.neighbourhood.held_out_UI[user_U[pairs[0]], item_I[pairs[1]]]
    return CandidateBatch(_side_kjt(user_cols, len(user_U)), _side_kjt(item_cols, len(item_I)),
                          torch.log1p(features.user_count[user_U].float()) / 5.0,
                          torch.log1p(features.item_count[item_I].float()) / 5.0, *pairs, pair_dense_B)


class RatingBatches:
    """The batches of ``ratings`` in order, or shuffled by ``seed`` (same seed, same order).

    Sized, so the training loop can count steps; iterating builds batches lazily. The order and the
    history dropout depend only on ``seed`` (e.g. ``(run seed, epoch)``), as exact resume needs.
    """

    def __init__(self, features: Features, tasks: Sequence[TaskSpec], ratings: Ratings,
                 batch_size: int, *, in_fit: bool, seed: Sequence[int] | None = None,
                 history_dropout: float = 0.0) -> None:
        if len(ratings) == 0:
            raise ValueError("cannot make batches from an empty set of ratings")
        if not 0.0 <= history_dropout < 1.0:
            raise ValueError(f"history_dropout must be in [0, 1), got {history_dropout}")
        self.features, self.tasks, self.ratings = features, tuple(tasks), ratings
        self.batch_size, self.in_fit, self.seed = batch_size, in_fit, seed
        self.history_dropout = history_dropout

    def __len__(self) -> int:
        return -(-len(self.ratings) // self.batch_size)

    def __iter__(self) -> Iterator[RecsysBatch]:
        n = len(self.ratings)
        order = (np.arange(n) if self.seed is None
                 else np.random.default_rng(list(self.seed)).permutation(n))
        generator = torch.Generator()
        if self.seed is not None:
            generator.manual_seed(int(np.random.default_rng(list(self.seed)).integers(2**62)))
        user = torch.as_tensor(self.ratings.user, dtype=torch.int64)
        item = torch.as_tensor(self.ratings.item, dtype=torch.int64)
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            idx_t = torch.as_tensor(idx)
            in_fit_B = torch.full((len(idx),), self.in_fit, dtype=torch.bool)
            yield make_batch(self.features, self.tasks, user[idx_t], item[idx_t],
                             self.ratings.rating[idx], in_fit_B=in_fit_B,
                             history_dropout=self.history_dropout, generator=generator)
