"""Full-ranking metrics against a plain per-user Python reference; bad K; skipped users."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from moe_apps.recsys.config import LIKE, RATING
from moe_apps.recsys.ranking import (
    full_ranking,
    interaction_matrix,
    ranking_score,
    sampling_odds_ratio,
)


def reference(scores: np.ndarray, seen: np.ndarray, relevant: np.ndarray, k: int) -> dict[str, float]:
    """One user at a time, with Python lists: sort candidates by (-score, index), read the top k."""
    totals = {"recall": 0.0, "ndcg": 0.0, "hit": 0.0, "mrr": 0.0}
    users = 0
    for u in range(scores.shape[0]):
        rel = {i for i in range(scores.shape[1]) if relevant[u, i] and not seen[u, i]}
        if not rel:
            continue
        users += 1
        candidates = [i for i in range(scores.shape[1]) if not seen[u, i]]
        top = sorted(candidates, key=lambda i: (-scores[u, i], i))[:k]
        hits = [i in rel for i in top]
        dcg = sum(1 / math.log2(r + 2) for r, h in enumerate(hits) if h)
        idcg = sum(1 / math.log2(r + 2) for r in range(min(k, len(rel))))
        totals["recall"] += sum(hits) / len(rel)
        totals["ndcg"] += dcg / idcg
        totals["hit"] += float(any(hits))
        totals["mrr"] += next((1 / (r + 1) for r, h in enumerate(hits) if h), 0.0)
    return {f"{m}@{k}": v / users for m, v in totals.items()} | {"users": users}


@pytest.mark.parametrize("ties", [False, True])
def test_full_ranking_matches_per_user_reference(ties: bool) -> None:
    rng = np.random.default_rng(3)
    U, I = 37, 25  # noqa: E741 (the shape letters)
    scores = rng.integers(0, 4, (U, I)).astype(np.float32) if ties else rng.normal(size=(U, I)).astype(np.float32)
    seen = rng.random((U, I)) < 0.4
    seen[0] = True  # a user who rated every movie in training: no candidate
    seen[1, :22] = True  # fewer candidates (3) than K
    relevant = (rng.random((U, I)) < 0.15) & ~seen
    relevant[2] = False  # a user without test movies
    relevant[1, 23] = True
    liked = relevant & (rng.random((U, I)) < 0.5)
    scores_t = torch.as_tensor(scores)
    result = full_ranking(lambda u: scores_t[u], torch.as_tensor(seen), torch.as_tensor(relevant),
                          torch.as_tensor(liked), ks=(5, 10), chunk_users=7).metrics
    for k in (5, 10):
        ref = reference(scores, seen, relevant, k)
        for m in ("recall", "ndcg", "hit", "mrr"):
            assert result[f"{m}@{k}"] == pytest.approx(ref[f"{m}@{k}"], abs=1e-9), (m, k)
        liked_ref = reference(scores, seen, liked, k)
        assert result[f"liked_ndcg@{k}"] == pytest.approx(liked_ref[f"ndcg@{k}"], abs=1e-9)
        assert result[f"liked_recall@{k}"] == pytest.approx(liked_ref[f"recall@{k}"], abs=1e-9)
    assert result["users_evaluated"] == reference(scores, seen, relevant, 5)["users"]
    assert result["users_evaluated"] + result["users_skipped"] == U
    assert result["liked_users_evaluated"] == reference(scores, seen, liked, 5)["users"]
    assert result["users_without_candidates"] == 1


def test_perfect_and_worst_scores() -> None:
    relevant = torch.zeros(4, 30, dtype=torch.bool)
    relevant[:, :3] = True
    seen = torch.zeros_like(relevant)
    best = full_ranking(lambda u: relevant[u].float(), seen, relevant, ks=(10,)).metrics
    worst = full_ranking(lambda u: -relevant[u].float(), seen, relevant, ks=(10,)).metrics
    assert best["ndcg@10"] == best["recall@10"] == best["hit@10"] == best["mrr@10"] == 1.0
    assert worst["ndcg@10"] == worst["recall@10"] == worst["hit@10"] == worst["mrr@10"] == 0.0


def test_seen_movies_are_never_listed() -> None:
    relevant = torch.zeros(1, 5, dtype=torch.bool)
    relevant[0, 4] = True
    seen = torch.tensor([[True, True, True, True, False]])
    result = full_ranking(lambda u: torch.tensor([[9.0, 8, 7, 6, -5]]), seen, relevant, ks=(1,)).metrics
    assert result["hit@1"] == 1.0


def test_k_larger_than_catalogue_is_one_clear_error() -> None:
    seen = torch.zeros(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="K=6 is larger than the catalogue of 5 movies"):
        full_ranking(lambda u: torch.zeros(len(u), 5), seen, seen, ks=(6,))
    with pytest.raises(ValueError, match="K must be >= 1"):
        full_ranking(lambda u: torch.zeros(len(u), 5), seen, seen, ks=(0,))


def test_interaction_matrix_and_liked_threshold() -> None:
    from recsys_synthetic import hand_data

    ratings = hand_data().ratings
    rated = interaction_matrix(ratings, 3, 4)
    liked = interaction_matrix(ratings, 3, 4, min_rating=4)
    assert rated.sum() == 7 and rated[0].tolist() == [True, True, False, True]
    assert liked.nonzero().tolist() == [[0, 0], [1, 0], [2, 3]]


def test_ranking_score_is_rate_times_like_for_the_task_mix() -> None:
    rate = SimpleNamespace(name="rate", kind="binary", target="rated")
    p = torch.tensor([[0.5, 0.2, 3.0], [0.9, 0.8, 4.0]])
    torch.testing.assert_close(ranking_score(p, (rate, LIKE, RATING)), torch.tensor([0.1, 0.72]))
    torch.testing.assert_close(ranking_score(p[:, 1:], (LIKE, RATING)), torch.tensor([0.2, 0.8]))


def test_sampling_odds_ratio_and_the_corrected_score_follow_bayes_rule() -> None:
    # 3 users over a catalogue of 10 movies with 1, 4 and 0 fit ratings, 2 negatives per rating.
    fit = SimpleNamespace(user=np.array([0, 1, 1, 1, 1]))
    r = sampling_odds_ratio(fit, num_users=3, num_items=10, negatives=2)
    torch.testing.assert_close(r, torch.tensor([9 / 2, 6 / 8, 9 / 2]))  # (I - n) / (neg * n), n >= 1
    assert sampling_odds_ratio(fit, 3, 10, negatives=0).tolist() == [1.0, 1.0, 1.0]
    # Independently: the sampled posterior's odds divided by r is the catalogue posterior's odds.
    rate = SimpleNamespace(name="rate", kind="binary", target="rated")
    p = torch.tensor([[0.8, 0.5, 3.0], [0.6, 0.9, 4.0], [0.8, 0.5, 3.0]])
    score = ranking_score(p, (rate, LIKE, RATING), r)
    for b in range(3):
        odds = 0.8 / 0.2 if b != 1 else 0.6 / 0.4
        corrected = odds / float(r[b])
        assert math.isclose(float(score[b]), corrected / (1 + corrected) * float(p[b, 1]), rel_tol=1e-6)
    # The correction can reorder the product: a near-certain P(rate) no longer hides in P(like).
    q = torch.tensor([[0.99, 0.5, 0.0], [0.6, 0.9, 0.0]])
    assert ranking_score(q, (rate, LIKE, RATING))[0] < ranking_score(q, (rate, LIKE, RATING))[1]
    assert ranking_score(q, (rate, LIKE, RATING), 20.0)[0] > ranking_score(q, (rate, LIKE, RATING), 20.0)[1]


class _TableModel(torch.nn.Module):
    """Predictions read from a fixed (users, movies, tasks) table, for candidate batches."""

    def __init__(self, table_UIT: torch.Tensor, user_rows: torch.Tensor) -> None:
        super().__init__()
        self.table_UIT, self.user_rows = table_UIT, user_rows

    def forward(self, batch):
        users = batch.user_sparse.to_dict()["user"].values()  # the batch's user indices
        return SimpleNamespace(predictions_BT=self.table_UIT[users[batch.pair_user_B], batch.pair_item_B])


def test_evaluate_ranking_ranks_the_model_predictions_and_rate_alone() -> None:
    from test_recsys_protocols import _random_data

    from moe_apps.recsys.data import build_features
    from moe_apps.recsys.ranking import evaluate_ranking
    from moe_apps.recsys.splits import protocol_parts

    data = _random_data()
    parts = protocol_parts(data, "random", seed=0, val_fraction=0.1)
    features = build_features(data, parts.fit)
    table = torch.rand(40, 60, 2, generator=torch.Generator().manual_seed(0))
    tasks = (SimpleNamespace(name="rate", kind="binary", target="rated"), LIKE)
    got = evaluate_ranking(_TableModel(table, torch.arange(40)), features, tasks, parts.train,
                           parts.test, 40, 60, ks=(5, 10))
    masks = [interaction_matrix(r, 40, 60, m) for r, m in ((parts.train, None), (parts.test, None),
                                                          (parts.test, 4.0))]
    product = full_ranking(lambda u: table[u, :, 0] * table[u, :, 1], *masks, ks=(5, 10)).metrics
    rate = full_ranking(lambda u: table[u, :, 0], *masks, ks=(5, 10)).metrics
    assert got["ndcg@10"] == pytest.approx(product["ndcg@10"]) and got["ndcg@10"] != got["by_rate_ndcg@10"]
    assert got["by_rate_ndcg@10"] == pytest.approx(rate["ndcg@10"])
    assert got["liked_recall@5"] == pytest.approx(product["liked_recall@5"])
    # with per-user odds ratios: each user's P(rate) odds divided by its own r_u before the product
    r_U = torch.linspace(0.2, 30.0, 40)
    corrected = evaluate_ranking(_TableModel(table, torch.arange(40)), features, tasks, parts.train,
                                 parts.test, 40, 60, ks=(5, 10), odds_ratio_U=r_U)

    def by_hand(u):
        odds = table[u, :, 0] / (1 - table[u, :, 0]) / r_U[u][:, None]
        return odds / (1 + odds) * table[u, :, 1]

    expected = full_ranking(by_hand, *masks, ks=(5, 10)).metrics
    assert corrected["ndcg@10"] == pytest.approx(expected["ndcg@10"]) and corrected["ndcg@10"] != got["ndcg@10"]
    assert corrected["by_rate_ndcg@10"] == pytest.approx(rate["ndcg@10"])  # the order by P(rate) is kept
    assert evaluate_ranking(_TableModel(table, torch.arange(40)), features, tasks, parts.train,
                            parts.test, 40, 60, ks=(61,)) == {}  # K above the catalogue: left out
