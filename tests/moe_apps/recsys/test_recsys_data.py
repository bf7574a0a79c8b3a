"""Recsys data pipeline: protocols, validation slice, feature tables and torchrec batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from recsys_synthetic import hand_data, write_random_ml100k

from moe_apps.datasets import MovieLensData, Ratings, load_movielens
from moe_apps.recsys.config import LIKE, RATING
from moe_apps.recsys.data import (
    SPARSE_FEATURES,
    RatingBatches,
    build_features,
    make_batch,
    make_split,
    random_split,
    temporal_split,
    validation_slice,
)


@pytest.fixture
def random_data(tmp_path: Path) -> MovieLensData:
    write_random_ml100k(tmp_path)
    return load_movielens("movielens-100k", tmp_path)


def _pairs(r: Ratings) -> set[tuple[int, int]]:
    return set(zip(r.user.tolist(), r.item.tolist(), strict=True))


def test_training_batch_kjt_by_hand() -> None:
    data = hand_data()
    train, _ = data.folds["u1"]  # ratings 0..4
    features = build_features(data, train)
    rows = np.array([0, 3])  # (u0, movie 0, 5 stars), (u1, movie 3, 1 star)
    batch = make_batch(features, (LIKE, RATING), torch.tensor(train.user[rows]),
                       torch.tensor(train.item[rows]), train.rating[rows],
                       in_fit_B=torch.tensor([True, True]))
    kjt = batch.sparse
    assert kjt.keys() == list(SPARSE_FEATURES)
    got = {k: (kjt[k].values().tolist(), kjt[k].lengths().tolist()) for k in kjt.keys()}
    assert got["user"] == ([0, 1], [1, 1])
    assert got["item"] == ([0, 3], [1, 1])
    assert got["gender"] == ([1, 0], [1, 1])
    assert got["age"] == ([0, 2], [1, 1])  # 17 -> under 18, 30 -> 25-34
    assert got["occupation"] == ([2, 0], [1, 1])
    assert got["zip"] == ([0, 1], [1, 1])  # prefixes 55, 94, T8 sorted
    assert got["year"] == ([16, 1], [1, 1])  # 1995 -> last bucket, 1921 -> first
    assert got["genres"] == ([0, 2, 0, 1, 2], [2, 3])
    # history = movies rated in the fit part, without the rating's own movie
    assert got["history"] == ([1, 0], [1, 1])
    assert batch.targets_BT.tolist() == [[1.0, 5.0], [0.0, 1.0]]
    expected_dense = np.log1p([[1, 1], [1, 0]]) / 5.0  # counts without the rating itself
    np.testing.assert_allclose(batch.dense_BF.numpy(), expected_dense, rtol=1e-6)


def test_test_batch_history_is_training_only() -> None:
    data = hand_data()
    train, test = data.folds["u1"]  # test: (u2, movie 3, 4 stars), (u0, movie 3, 2 stars)
    features = build_features(data, train)
    batch = next(iter(RatingBatches(features, (LIKE, RATING), test, 8, in_fit=False)))
    history = batch.sparse["history"]
    assert history.lengths().tolist() == [1, 2]
    assert history.values().tolist() == [2, 0, 1]
    assert batch.sparse["genres"].lengths().tolist() == [3, 3]
    assert batch.sparse["item"].values().tolist() == [3, 3]


def test_movie_without_genres_has_empty_bag() -> None:
    data = hand_data()
    features = build_features(data, data.folds["u1"][0])
    batch = make_batch(features, (LIKE,), torch.tensor([2]), torch.tensor([2]), None)
    assert batch.sparse["genres"].lengths().tolist() == [0]
    assert batch.targets_BT.shape == (1, 1)


def test_history_never_holds_test_or_validation_ratings(random_data: MovieLensData) -> None:
    train, test = make_split(random_data, "u1", seed=0)
    fit, val = validation_slice(train, 0.1, seed=0)
    features = build_features(random_data, fit)
    fit_pairs = _pairs(fit)
    for part in (test, val):
        for batch in RatingBatches(features, (RATING,), part, 64, in_fit=False):
            lengths = batch.sparse["history"].lengths().tolist()
            values = iter(batch.sparse["history"].values().tolist())
            for u, i, n in zip(batch.user_B.tolist(), batch.item_B.tolist(), lengths, strict=True):
                movies = [next(values) for _ in range(n)]
                assert i not in movies
                assert {(u, m) for m in movies} <= fit_pairs
                assert n == int(np.sum(fit.user == u))


def test_temporal_split_puts_each_users_later_ratings_in_test(random_data: MovieLensData) -> None:
    ratings = random_data.ratings
    train, test = temporal_split(ratings)
    assert len(train) + len(test) == len(ratings)
    assert not _pairs(train) & _pairs(test)
    for u in np.unique(ratings.user):
        n = int(np.sum(ratings.user == u))
        t_train, t_test = train.timestamp[train.user == u], test.timestamp[test.user == u]
        assert len(t_test) == (max(1, int(0.2 * n)) if n >= 2 else 0)
        if len(t_test) and len(t_train):
            assert t_train.max() <= t_test.min()


def test_random_split_is_seeded_and_disjoint(random_data: MovieLensData) -> None:
    ratings = random_data.ratings
    train, test = random_split(ratings, seed=3)
    again, _ = random_split(ratings, seed=3)
    other, _ = random_split(ratings, seed=4)
    assert _pairs(train) == _pairs(again) and _pairs(train) != _pairs(other)
    assert not _pairs(train) & _pairs(test)
    assert len(train) + len(test) == len(ratings) and len(test) == round(0.2 * len(ratings))


def test_validation_slice_is_disjoint_and_seeded(random_data: MovieLensData) -> None:
    train, _ = make_split(random_data, "u2", seed=0)
    fit, val = validation_slice(train, 0.1, seed=7)
    assert not _pairs(fit) & _pairs(val)
    assert _pairs(fit) | _pairs(val) == _pairs(train)
    assert len(val) == round(0.1 * len(train))
    assert _pairs(validation_slice(train, 0.1, seed=7)[1]) == _pairs(val)
    assert _pairs(validation_slice(train, 0.1, seed=8)[1]) != _pairs(val)


def test_official_fold_and_bad_splits(random_data: MovieLensData) -> None:
    train, test = make_split(random_data, "ub", seed=0)
    assert (len(train), len(test)) == (len(random_data.folds["ub"][0]), len(random_data.folds["ub"][1]))
    with pytest.raises(ValueError, match="split must be one of"):
        make_split(random_data, "u9", seed=0)
    no_folds = MovieLensData("movielens-1m", random_data.ratings, random_data.users,
                             random_data.items, {})
    with pytest.raises(ValueError, match="no official folds"):
        make_split(no_folds, "u1", seed=0)
    one = random_data.ratings.subset(np.array([0]))
    single = MovieLensData("movielens-1m", one, random_data.users, random_data.items, {})
    with pytest.raises(ValueError, match="empty test part"):
        make_split(single, "temporal", seed=0)


def test_training_batches_are_seeded_and_cover_the_fit_part(random_data: MovieLensData) -> None:
    train, _ = make_split(random_data, "u1", seed=0)
    features = build_features(random_data, train)
    first = RatingBatches(features, (LIKE,), train, 50, in_fit=True, seed=(0, 1))
    same = RatingBatches(features, (LIKE,), train, 50, in_fit=True, seed=(0, 1))
    other = RatingBatches(features, (LIKE,), train, 50, in_fit=True, seed=(0, 2))
    order = [b.user_B * 1000 + b.item_B for b in first]
    assert len(first) == len(order) == -(-len(train) // 50)
    assert all(torch.equal(a, b.user_B * 1000 + b.item_B) for a, b in zip(order, same, strict=True))
    assert not torch.equal(torch.cat(order), torch.cat([b.user_B * 1000 + b.item_B for b in other]))
    assert sorted(torch.cat(order).tolist()) == sorted((train.user * 1000 + train.item).tolist())
    with pytest.raises(ValueError, match="empty"):
        RatingBatches(features, (LIKE,), train.subset(np.array([], dtype=np.int64)), 8, in_fit=True)


def test_history_dropout_is_seeded_and_only_drops(random_data: MovieLensData) -> None:
    train, _ = make_split(random_data, "u1", seed=0)
    features = build_features(random_data, train)

    def histories(seed: tuple[int, int], drop: float) -> list[tuple[list[int], list[int]]]:
        batches = RatingBatches(features, (LIKE,), train, 64, in_fit=True, seed=seed,
                                history_dropout=drop)
        return [(b.sparse["history"].values().tolist(), b.sparse["history"].lengths().tolist())
                for b in batches]

    full, dropped = histories((0, 0), 0.0), histories((0, 0), 0.5)
    assert dropped == histories((0, 0), 0.5) and dropped != histories((0, 1), 0.5)
    kept = sum(len(v) for v, _ in dropped) / sum(len(v) for v, _ in full)
    assert 0.35 < kept < 0.65
    for (v_full, l_full), (v_drop, l_drop) in zip(full, dropped, strict=True):
        assert all(a <= b for a, b in zip(l_drop, l_full, strict=True))
        rows_full = iter(v_full)
        rows_drop = iter(v_drop)
        for n_full, n_drop in zip(l_full, l_drop, strict=True):
            row_full = [next(rows_full) for _ in range(n_full)]
            assert set(next(rows_drop) for _ in range(n_drop)) <= set(row_full)
    with pytest.raises(ValueError, match="history_dropout"):
        RatingBatches(features, (LIKE,), train, 8, in_fit=True, history_dropout=1.0)
