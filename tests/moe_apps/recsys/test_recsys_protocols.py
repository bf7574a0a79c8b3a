"""Protocol parts (temporal validation, the recbole split), negative sampling, candidate batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from recsys_synthetic import hand_data

from moe_apps.datasets import MovieLensData, Ratings
from moe_apps.recsys.config import LIKE, RATING, ModelConfig, RecsysConfig, with_vocab
from moe_apps.recsys.data import build_features, candidate_batch, make_batch
from moe_apps.recsys.implicit import ImplicitBatches, sample_unrated
from moe_apps.recsys.model import build_model
from moe_apps.recsys.ranking import interaction_matrix
from moe_apps.recsys.splits import protocol_parts, recbole_split


def _random_data(num_users: int = 40, num_items: int = 60, per_user: int = 25, seed: int = 0) -> MovieLensData:
    rng = np.random.default_rng(seed)
    user = np.repeat(np.arange(num_users), per_user)
    item = np.concatenate([rng.choice(num_items, per_user, replace=False) for _ in range(num_users)])
    ratings = Ratings(user, item, rng.integers(1, 6, len(user)).astype(np.float32),
                      rng.permutation(len(user)).astype(np.int64))
    base = hand_data()
    users = type(base.users)(raw_id=np.arange(1, num_users + 1), gender=np.arange(num_users) % 2,
                             age=np.full(num_users, 30), occupation=np.zeros(num_users, dtype=np.int64),
                             zip_code=["55455"] * num_users, occupation_names=["artist"])
    genres = np.zeros((num_items, 3), dtype=bool)
    genres[np.arange(num_items), np.arange(num_items) % 3] = True
    items = type(base.items)(raw_id=np.arange(1, num_items + 1), title=[f"M{i}" for i in range(num_items)],
                             year=np.full(num_items, 1990), genres=genres, genre_names=["a", "b", "c"])
    return MovieLensData("movielens-100k", ratings, users, items, {})


def _pairs(r: Ratings) -> set[tuple[int, int]]:
    return set(zip(r.user.tolist(), r.item.tolist(), strict=True))


def test_temporal_validation_is_each_users_latest_training_ratings() -> None:
    data = _random_data()
    parts = protocol_parts(data, "temporal", seed=0, val_fraction=0.1)
    assert _pairs(parts.fit) | _pairs(parts.val) == _pairs(parts.train)
    assert not _pairs(parts.fit) & _pairs(parts.val)
    for u in range(40):
        fit_t = parts.fit.timestamp[parts.fit.user == u]
        val_t = parts.val.timestamp[parts.val.user == u]
        test_t = parts.test.timestamp[parts.test.user == u]
        assert len(val_t) == 2  # floor(0.1 * 20 training ratings)
        assert fit_t.max() < val_t.min() and val_t.max() < test_t.min()


def test_random_protocols_keep_a_random_validation_slice() -> None:
    parts = protocol_parts(_random_data(), "random", seed=0, val_fraction=0.1)
    assert _pairs(parts.fit) | _pairs(parts.val) == _pairs(parts.train)
    assert len(parts.val) == round(0.1 * len(parts.train))


def test_recbole_split_is_a_seeded_per_user_80_10_10() -> None:
    data = _random_data(per_user=25)
    fit, val, test = recbole_split(data.ratings, seed=0)
    for u in range(40):
        assert [(p.user == u).sum() for p in (fit, val, test)] == [21, 2, 2]  # floor(2.5) each
    assert len(_pairs(fit) | _pairs(val) | _pairs(test)) == len(data.ratings)
    again = recbole_split(data.ratings, seed=0)[2]
    other = recbole_split(data.ratings, seed=1)[2]
    assert _pairs(again) == _pairs(test) and _pairs(other) != _pairs(test)
    parts = protocol_parts(data, "recbole", seed=0, val_fraction=0.05)
    assert _pairs(parts.train) == _pairs(fit) | _pairs(val)  # validation masked at test time
    assert _pairs(parts.test) == _pairs(test) and _pairs(parts.val) == _pairs(val)


def test_sample_unrated_never_returns_a_rated_movie() -> None:
    seen = torch.zeros(3, 10, dtype=torch.bool)
    seen[0, :9] = True  # one unrated movie left: rejection then the fallback must find it
    seen[1, ::2] = True
    users = torch.tensor([0] * 50 + [1] * 50 + [2] * 50)
    items = sample_unrated(seen, users, torch.Generator().manual_seed(0))
    assert not seen[users, items].any()
    assert set(items[:50].tolist()) == {9}
    assert set(items[50:100].tolist()) == {1, 3, 5, 7, 9}
    seen[2] = True
    with pytest.raises(ValueError, match="rated every movie"):
        sample_unrated(seen, users, torch.Generator())


def test_implicit_batches_mix_ratings_and_fresh_negatives() -> None:
    data = _random_data()
    parts = protocol_parts(data, "u1" if data.folds else "random", seed=0, val_fraction=0.1)
    features = build_features(data, parts.fit)
    seen = interaction_matrix(parts.fit, 40, 60)

    def epoch(e: int) -> list:
        return list(ImplicitBatches(features, (LIKE, RATING), parts.fit, 64, negatives=3,
                                    seen_UI=seen, seed=(0, e), in_fit=True))

    first = epoch(0)
    assert len(first) == len(ImplicitBatches(features, (LIKE, RATING), parts.fit, 64, negatives=3,
                                             seen_UI=seen, seed=(0, 0), in_fit=True))
    users = torch.cat([b.user_B for b in first])
    items = torch.cat([b.item_B for b in first])
    mask = torch.cat([b.mask_BT for b in first])
    assert len(users) == 4 * len(parts.fit)
    rated = mask[:, 0]
    assert int(rated.sum()) == len(parts.fit) and bool((mask[:, 0] == mask[:, 1]).all())
    assert not seen[users[~rated], items[~rated]].any()  # negatives are unrated movies
    assert seen[users[rated], items[rated]].all()
    again = epoch(0)
    assert torch.equal(torch.cat([b.item_B for b in again]), items)
    assert not torch.equal(torch.cat([b.item_B for b in epoch(1)]), items)  # afresh each epoch


@pytest.mark.parametrize(("kind", "neighbourhood"), [("mmoe", 0.0), ("ple", 0.0), ("shared-bottom", 0.0),
                                                      ("single", 0.0), ("mmoe", 5.0), ("single", 5.0)])
def test_candidate_batch_scores_equal_per_rating_batches(kind: str, neighbourhood: float) -> None:
    data = _random_data()
    parts = protocol_parts(data, "random", seed=0, val_fraction=0.1)
    features = build_features(data, parts.fit, neighbourhood)
    config = with_vocab(RecsysConfig(monitor="loss", model=ModelConfig(
        model=kind, embedding_dim=4, num_experts=3, expert_dim=5, tower_dim=3,
        neighbourhood=neighbourhood)), features.vocab)
    model = build_model(config.model).eval()
    with torch.no_grad():  # the neighbourhood term's weight starts at zero: make it count
        for name, p in model.named_parameters():
            if name.endswith("neighbourhood_weight"):
                p.fill_(0.7)
    users, items = torch.tensor([0, 5, 39]), torch.tensor([2, 7, 59, 11])
    users = torch.cat([users, torch.as_tensor(parts.fit.user[:2])])  # and pairs that are fit ratings
    items = torch.cat([items, torch.as_tensor(parts.fit.item[:2])])
    rows = make_batch(features, config.model.tasks, users.repeat_interleave(len(items)),
                      items.repeat(len(users)), None)
    with torch.no_grad():
        expected = model(rows).predictions_BT
        got = model(candidate_batch(features, users, items)).predictions_BT
    torch.testing.assert_close(got, expected)


def test_held_out_negatives_are_fixed_and_training_ones_follow_the_epoch() -> None:
    from moe_apps.recsys.implicit import held_out_batches, training_batches

    data = _random_data()
    parts = protocol_parts(data, "random", seed=0, val_fraction=0.1)
    features = build_features(data, parts.fit)
    seen = interaction_matrix(parts.train, 40, 60)
    plain = training_batches(features, (LIKE, RATING), parts.fit, batch_size=32, negatives=0,
                             seen_UI=seen, seed=(0, 0), history_dropout=0.0)
    assert sum(len(b) for b in plain) == len(parts.fit) and next(iter(plain)).mask_BT is None
    val = [held_out_batches(features, (LIKE, RATING), parts.val, batch_size=32, negatives=2,
                            seen_UI=seen, seed=0) for _ in range(2)]
    items = [torch.cat([b.item_B for b in v]) for v in val]
    assert torch.equal(items[0], items[1]) and len(items[0]) == 3 * len(parts.val)


def test_a_user_who_rated_every_movie_gets_no_negatives() -> None:
    data = _random_data()
    features = build_features(data, data.ratings)
    seen = interaction_matrix(data.ratings, 40, 60)
    seen[3] = True  # user 3 has rated the whole catalogue
    batches = ImplicitBatches(features, (LIKE, RATING), data.ratings, 100, negatives=2, seen_UI=seen,
                              seed=(0, 0), in_fit=False)
    users = torch.cat([b.user_B for b in batches])
    rated = torch.cat([b.mask_BT[:, 0] for b in batches])
    assert int((users[~rated] == 3).sum()) == 0 and int((users[rated] == 3).sum()) == 25
    assert len(users) == 25 * 40 + 2 * 25 * 39 and len(batches) == -(-len(users) // 100)


def test_early_stopping_can_follow_the_validation_ranking(tmp_path) -> None:
    """monitor="ndcg@10": every epoch ranks the catalogue for the validation part (candidates:
    movies not in the fit part), the best epoch is the one with the highest val ndcg@10, and the
    value logged is the best weights' full ranking of the validation movies."""
    import json

    from rich.console import Console

    from moe_apps.recsys.config import RATE
    from moe_apps.recsys.ranking import evaluate_ranking
    from moe_apps.recsys.train import load_run, rate_odds_ratio, train

    data = _random_data()
    config = RecsysConfig(split="recbole", negatives=1, epochs=3, patience=None, batch_size=128,
                          monitor="ndcg@10", monitor_mode="max", device="cpu", model=ModelConfig(
                              model="mmoe", tasks=(RATE, LIKE, RATING), embedding_dim=4, num_experts=3,
                              expert_dim=5, tower_dim=3))
    out = train(config, tmp_path / "run", data=data, data_dir=tmp_path, console=Console(quiet=True),
                progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ndcg = [row["val_ndcg@10"] for row in rows]
    assert len(ndcg) == 3 and all(0 < v <= 1 for v in ndcg)
    assert out.best_epoch == 1 + int(np.argmax(ndcg))
    loaded = load_run(tmp_path / "run", data_dir=tmp_path, data=data)
    run = loaded.run
    by_hand = evaluate_ranking(loaded.model, run.features, config.model.tasks, run.fit, run.val,
                               len(data.users), len(data.items), ks=(10,),
                               odds_ratio_U=rate_odds_ratio(loaded.config, run))
    assert out.val_metrics["ndcg@10"] == pytest.approx(by_hand["ndcg@10"], rel=1e-6)


def test_grouped_batches_keep_each_rating_with_its_own_negatives() -> None:
    data = _random_data()
    features = build_features(data, data.ratings)
    seen = interaction_matrix(data.ratings, 40, 60)
    seen[3] = True  # user 3: nothing to draw, so its ratings are groups of one

    def rows(grouped: bool, batch_size: int = 100) -> list:
        return list(ImplicitBatches(features, (LIKE, RATING), data.ratings, batch_size, negatives=2,
                                    seen_UI=seen, seed=(0, 0), in_fit=True, grouped=grouped))

    plain, grouped = rows(False), rows(True)
    assert all(b.group_B is None for b in plain)
    key = [torch.cat([b.user_B * 100 + b.item_B for b in batches]).sort().values for batches in (plain, grouped)]
    assert torch.equal(key[0], key[1])  # the same draws, only laid out by group
    one = rows(True, batch_size=10_000)[0]  # one batch: every group whole
    rated = one.mask_BT[:, 1]
    groups = [torch.nonzero(one.group_B == g).squeeze(1) for g in range(int(one.group_B.max()) + 1)]
    assert torch.equal(one.group_B, one.group_B.sort().values) and len(groups) == len(data.ratings)
    for rows_g in groups:
        first, rest = int(rows_g[0]), rows_g[1:]
        assert bool(rated[first]) and not bool(rated[rest].any())  # the rating, then its negatives
        assert bool((one.user_B[rows_g] == one.user_B[first]).all())
        assert len(rest) == (0 if int(one.user_B[first]) == 3 else 2)
        assert not seen[one.user_B[rest], one.item_B[rest]].any()
    starts = [int(b.group_B[0]) for b in grouped]
    assert starts == [0] * len(grouped)  # each batch numbers its groups from 0
    assert sum(len(b) for b in grouped) == len(one) and max(len(b) for b in grouped) == 100


def test_sampled_softmax_matches_a_per_group_reference() -> None:
    import math

    from moe_apps.recsys.task import sampled_softmax

    gen = torch.Generator().manual_seed(0)
    logit_B = torch.randn(11, generator=gen) * 3
    group_B = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4])
    positive_B = torch.tensor([1, 0, 0, 0, 1, 1, 0, 0, 0, 1, 0], dtype=torch.bool)
    # group 3 is a lone rating and group 4 a lone negative (cut by a batch boundary): left out
    losses = []
    for g in (0, 1, 2):
        rows = [i for i in range(11) if int(group_B[i]) == g]
        pos = next(i for i in rows if positive_B[i])
        losses.append(math.log(sum(math.exp(float(logit_B[i])) for i in rows)) - float(logit_B[pos]))
    got = sampled_softmax(logit_B, group_B, positive_B)
    assert float(got) == pytest.approx(sum(losses) / 3, rel=1e-6)
    lone = torch.tensor([9, 10])
    x = logit_B.clone().requires_grad_()
    sampled_softmax(x, group_B, positive_B).backward()
    assert bool((x.grad[lone] == 0).all()) and float(x.grad[[0, 4, 5]].max()) < 0
    assert float(sampled_softmax(x, torch.tensor([0] * 11), torch.ones(11, dtype=torch.bool))) == 0.0


def test_rate_softmax_adds_its_weighted_term_to_the_training_loss() -> None:
    from moe_apps.recsys.config import RATE
    from moe_apps.recsys.task import RecsysTask, sampled_softmax

    data = _random_data()
    features = build_features(data, data.ratings)
    seen = interaction_matrix(data.ratings, 40, 60)
    tasks = (RATE, LIKE, RATING)
    config = with_vocab(RecsysConfig(monitor="loss", negatives=2, rate_softmax=0.5, model=ModelConfig(
        tasks=tasks, embedding_dim=4, num_experts=3, expert_dim=5, tower_dim=3)), features.vocab)
    model = build_model(config.model).eval()
    batch = next(iter(ImplicitBatches(features, tasks, data.ratings, 90, negatives=2, seen_UI=seen,
                                      seed=(0, 0), in_fit=True, grouped=True)))
    with torch.no_grad():
        base, _ = RecsysTask(tasks, 0.05).training_loss(model, batch)
        loss, logs = RecsysTask(tasks, 0.05, rate_softmax=0.5).training_loss(model, batch)
        rate_logit = model(batch).logits_BT[:, 0]
    expected = sampled_softmax(rate_logit, batch.group_B, batch.targets_BT[:, 0] > 0)
    assert float(loss - base) == pytest.approx(0.5 * float(expected), rel=1e-5)
    assert float(logs["rate_softmax_loss"]) == pytest.approx(float(expected), rel=1e-6)
    with pytest.raises(ValueError, match="rate_softmax"):
        RecsysConfig(monitor="loss", rate_softmax=1.0)  # no rate task
    with pytest.raises(ValueError, match="rate_softmax"):
        RecsysConfig(monitor="loss", negatives=2, rate_softmax=-1.0, model=ModelConfig(tasks=tasks))
