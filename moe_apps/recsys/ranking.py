"""Full-ranking top-K evaluation of recommenders: Recall, NDCG, Hit and MRR at K.

Every movie a user has not rated in the training part is a candidate; nothing is sampled (sampled
metrics can reverse the order of two models, Krichene & Rendle 2020, "On Sampled Metrics for Item
Recommendation"). Definitions follow RecBole's (Zhao et al. 2021) full-sort evaluation:

* the top-K list is the K best-scored candidates, ties broken by the lower movie index;
* ``recall@K`` = hits in the list / number of the user's relevant (test) movies;
* ``ndcg@K`` = DCG of the list / DCG of an ideal list of ``min(K, relevant)`` hits, with gain
  ``1 / log2(rank + 1)``;
* ``hit@K`` = 1 if any relevant movie is in the list; ``mrr@K`` = 1 / rank of the first one (0 if
  none);
* each is averaged over the users who have at least one relevant movie; users without any are
  skipped and counted (``users_skipped``), so are users with no candidate left
  (``users_without_candidates``).

The liked-only variant (``liked_ndcg@10`` ...) counts as relevant only the test ratings >= 4.
`ranking_score` turns a model's per-task predictions into the one score that orders the list:
P(rate) x P(like | rate) for the ESMM-style task mix (Ma et al. 2018, "Entire Space Multi-Task
Model"), else the like-probability (else the first binary task, else the first task).

P(rate) is learned on sampled negatives (``negatives`` unrated movies per rating), so the network
estimates it under a prior of 1 / (1 + negatives) per user, far above the catalogue's. Before the
product it is mapped back to the whole catalogue with the prior correction for sampled negatives
(King & Zeng 2001, "Logistic Regression in Rare Events Data"): the odds are divided by
``r_u = (I - n_u) / (negatives * n_u)``, n_u the user's fit ratings (`sampling_odds_ratio`). The
order by P(rate) alone is unchanged; the product is not: uncorrected, a near-1 P(rate) leaves the
order to P(like | rate), which lifts movies that their few raters liked.

Shapes: U users (a chunk), I movies (the catalogue), K list length, T tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from moe_apps.datasets import Ratings
from moe_apps.recsys.data import Features, candidate_batch

KS = (10, 20)
METRICS = ("recall", "ndcg", "hit", "mrr")
LIKE_THRESHOLD = 4.0
RATE_TARGET = "rated"  # the implicit "did the user rate this movie" target


def interaction_matrix(ratings: Ratings, num_users: int, num_items: int,
                       min_rating: float | None = None) -> Tensor:
    """(num_users, num_items) bool: True where the user rated the movie (at least ``min_rating``)."""
    keep = np.ones(len(ratings), dtype=bool) if min_rating is None else ratings.rating >= min_rating
    matrix = torch.zeros(num_users, num_items, dtype=torch.bool)
    matrix[torch.as_tensor(ratings.user[keep]), torch.as_tensor(ratings.item[keep])] = True
    return matrix


def check_k(ks: Sequence[int], num_items: int) -> tuple[int, ...]:
    """``ks`` as a sorted tuple; ValueError if one is < 1 or larger than the catalogue."""
    ks = tuple(sorted({int(k) for k in ks}))
    if not ks or ks[0] < 1:
        raise ValueError(f"K must be >= 1, got {list(ks)}")
    if ks[-1] > num_items:
        raise ValueError(
            f"K={ks[-1]} is larger than the catalogue of {num_items} movies; choose K <= {num_items}"
        )
    return ks


def topk_hits(scores_UI: Tensor, seen_UI: Tensor, relevant_UI: Tensor, k: int) -> Tensor:
    """(U, k) bool: whether the r-th best candidate is relevant. Seen movies are never listed
    (a user with fewer than k candidates has a shorter list, the rest counts as misses); ties go
    to the lower movie index (a stable sort)."""
    masked_UI = scores_UI.float().masked_fill(seen_UI, float("-inf"))
    order_UK = torch.sort(masked_UI, dim=1, descending=True, stable=True).indices[:, :k]
    return relevant_UI.gather(1, order_UK) & ~seen_UI.gather(1, order_UK)


def user_metrics(hits_UK: Tensor, num_relevant_U: Tensor, ks: Sequence[int]) -> dict[str, Tensor]:
    """Per user ``{metric@K: (U,) float64}`` from the hit pattern of the top ``max(ks)`` list."""
    hits = hits_UK.double()
    ranks = torch.arange(1, hits.shape[1] + 1, dtype=torch.float64)
    gain_K = 1.0 / torch.log2(ranks + 1.0)
    ideal_K = torch.cumsum(gain_K, 0)  # ideal DCG of n hits, n = 1..K
    relevant = num_relevant_U.double()
    out: dict[str, Tensor] = {}
    for k in ks:
        h = hits[:, :k]
        count = h.sum(1)
        dcg = (h * gain_K[:k]).sum(1)
        n_ideal = torch.clamp(num_relevant_U, 1, k).long() - 1
        first = torch.where(h.any(1), h.argmax(1).double() + 1.0, torch.full_like(count, np.inf))
        out[f"recall@{k}"] = count / relevant.clamp(min=1)
        out[f"ndcg@{k}"] = dcg / ideal_K[n_ideal]
        out[f"hit@{k}"] = (count > 0).double()
        out[f"mrr@{k}"] = 1.0 / first
    return out


@dataclass(frozen=True)
class RankingResult:
    """Mean metrics over the evaluated users and how many users were skipped, per relevance kind."""

    metrics: dict[str, float]


class _Sums:
    def __init__(self, prefix: str) -> None:
        self.prefix, self.sums, self.users, self.skipped = prefix, {}, 0, 0

    def add(self, hits_UK: Tensor, relevant_U: Tensor, ks: Sequence[int]) -> None:
        has = relevant_U > 0
        self.skipped += int((~has).sum())
        self.users += int(has.sum())
        for name, values in user_metrics(hits_UK[has], relevant_U[has], ks).items():
            self.sums[name] = self.sums.get(name, 0.0) + float(values.sum())

    def result(self, ks: Sequence[int]) -> dict[str, float]:
        names = [f"{m}@{k}" for k in ks for m in METRICS]
        out = {f"{self.prefix}{n}": self.sums.get(n, 0.0) / self.users if self.users else float("nan")
               for n in names}
        out[f"{self.prefix}users_evaluated"] = float(self.users)
        out[f"{self.prefix}users_skipped"] = float(self.skipped)
        return out


def full_ranking(score_users: Callable[[Tensor], Tensor], seen_UI: Tensor, relevant_UI: Tensor,
                 liked_UI: Tensor | None = None, ks: Sequence[int] = KS,
                 chunk_users: int = 64) -> RankingResult:
    """Rank every unseen movie for every user with a relevant one; average the metrics.

    Args:
        score_users: user indices ``(U,)`` -> scores ``(U, I)`` of every movie (higher = better).
        seen_UI: movies rated in the training part (never candidates).
        relevant_UI: the test movies of each user.
        liked_UI: the liked test movies (rating >= 4); adds the ``liked_`` metrics.
        ks: list lengths; each must be <= I.

    Users without a relevant movie are skipped and counted; users who have rated every movie in
    training have no candidate and are counted in ``users_without_candidates`` (they are also
    skipped, because none of their movies can be relevant).
    """
    if seen_UI.shape != relevant_UI.shape or (liked_UI is not None and liked_UI.shape != seen_UI.shape):
        raise ValueError(f"seen {tuple(seen_UI.shape)}, relevant {tuple(relevant_UI.shape)} and liked "
                         "masks must all be (users, movies)")
    num_users, num_items = seen_UI.shape
    ks = check_k(ks, num_items)
    relevant_UI = relevant_UI & ~seen_UI  # a seen movie is not a candidate (overlapping splits)
    liked_UI = None if liked_UI is None else liked_UI & ~seen_UI
    no_candidates = int(seen_UI.all(1).sum())
    wanted = relevant_UI.any(1) if liked_UI is None else relevant_UI.any(1) | liked_UI.any(1)
    users = torch.arange(num_users)[wanted]
    sums = [_Sums("")] + ([_Sums("liked_")] if liked_UI is not None else [])
    sums[0].skipped += num_users - len(users)
    if liked_UI is not None:
        sums[1].skipped += num_users - len(users)
    for start in range(0, len(users), chunk_users):
        user_U = users[start:start + chunk_users]
        scores_UI = score_users(user_U)
        if scores_UI.shape != (len(user_U), num_items):
            raise ValueError(f"score_users returned {tuple(scores_UI.shape)}, expected "
                             f"({len(user_U)}, {num_items})")
        seen = seen_UI[user_U]
        for acc, relevant in zip(sums, (relevant_UI, liked_UI), strict=False):
            rel = relevant[user_U]
            hits_UK = topk_hits(scores_UI, seen, rel, ks[-1])
            acc.add(hits_UK, rel.sum(1), ks)
    metrics: dict[str, float] = {}
    for acc in sums:
        metrics.update(acc.result(ks))
    metrics["users_without_candidates"] = float(no_candidates)
    return RankingResult(metrics)


def sampling_odds_ratio(fit: Ratings, num_users: int, num_items: int, negatives: int) -> Tensor:
    """(U,) float: by how much training on ``negatives`` sampled unrated movies per rating of
    ``fit`` inflates each user's odds of having rated a movie: the sampled odds are 1 / negatives,
    the catalogue's n_u / (I - n_u), so ``r_u = (I - n_u) / (negatives * n_u)`` (n_u = the user's
    ratings in ``fit``; a user without any counts as one). All ones when ``negatives`` is 0."""
    if negatives == 0:
        return torch.ones(num_users)
    rated_U = torch.as_tensor(np.bincount(fit.user, minlength=num_users)).double().clamp(min=1.0)
    return ((num_items - rated_U).clamp(min=0.0) / (negatives * rated_U)).float()


def catalogue_rate_probability(p_rate_B: Tensor, odds_ratio_B: Tensor | float) -> Tensor:
    """P(rate) learned on sampled negatives -> P(rate) over the whole catalogue: the odds divided
    by the user's `sampling_odds_ratio` (prior correction, King & Zeng 2001)."""
    return p_rate_B / (p_rate_B + (1.0 - p_rate_B) * odds_ratio_B)


def ranking_score(predictions_BT: Tensor, tasks: Sequence, odds_ratio_B: Tensor | float = 1.0) -> Tensor:
    """The score that orders a top-K list, from per-task predictions (tasks: `TaskSpec`s).

    P(rate) x P(like | rate) when the tasks hold an implicit ``rated`` task and a ``like`` one
    (ESMM's pCTCVR = pCTR x pCVR; P(rate) corrected to the whole catalogue with each row's user's
    ``odds_ratio_B``, see `sampling_odds_ratio`; 1 = as learned), else P(like), else the first
    binary task, else the first task."""
    targets = [t.target for t in tasks]
    binary = [i for i, t in enumerate(tasks) if t.kind == "binary"]
    if RATE_TARGET in targets and "like" in targets:
        p_rate_B = catalogue_rate_probability(predictions_BT[:, targets.index(RATE_TARGET)], odds_ratio_B)
        return p_rate_B * predictions_BT[:, targets.index("like")]
    if "like" in targets:
        return predictions_BT[:, targets.index("like")]
    return predictions_BT[:, binary[0] if binary else 0]


def ranking_score_name(tasks: Sequence) -> str:
    """What `ranking_score` ranks by, in words (for reports)."""
    targets = [t.target for t in tasks]
    if RATE_TARGET in targets and "like" in targets:
        return "P(rate) x P(like | rate), P(rate) corrected for sampled negatives"
    if "like" in targets:
        return "P(like)"
    binary = [t.name for t in tasks if t.kind == "binary"]
    return f"P({binary[0]})" if binary else tasks[0].name


@torch.no_grad()
def predict_catalogue(model: torch.nn.Module, features: Features, user_U: Tensor, num_items: int,
                      device: torch.device | str | None = None, max_pairs: int = 32768) -> Tensor:
    """``(U, I, T)`` per-task predictions of every movie for users ``user_U``, computed on
    `CandidateBatch`es of at most ``max_pairs`` pairs (the model in eval mode)."""
    items_I = torch.arange(num_items)
    users_per_chunk = max(1, max_pairs // num_items)
    chunks = []
    for start in range(0, len(user_U), users_per_chunk):
        batch = candidate_batch(features, user_U[start:start + users_per_chunk], items_I)
        if device is not None:
            batch = batch.to(device)
        predictions_BT = model(batch).predictions_BT.float().cpu()
        chunks.append(predictions_BT.view(-1, num_items, predictions_BT.shape[1]))
    if not chunks:
        return torch.zeros(0, num_items, 0)
    return torch.cat(chunks)


def evaluate_ranking(model: torch.nn.Module, features: Features, tasks: Sequence, seen: Ratings,
                     relevant: Ratings, num_users: int, num_items: int, ks: Sequence[int] = KS,
                     device: torch.device | str | None = None,
                     odds_ratio_U: Tensor | None = None) -> dict[str, float]:
    """Full-ranking metrics of ``model`` by its `ranking_score`: candidates = movies not in
    ``seen`` (the training part), relevant = ``relevant`` (the test or validation ratings), liked
    = those rated >= 4. A model with an implicit ``rated`` task and others also reports the list
    ranked by P(rate) alone, under the prefix ``by_rate_`` (from the same predictions).
    ``odds_ratio_U``: each user's `sampling_odds_ratio` (None = 1, P(rate) as learned).

    The documented answer for a catalogue smaller than a K of ``ks``: that K is left out (a
    catalogue of fewer than ``min(ks)`` movies gives no ranking metrics); `full_ranking` itself
    refuses such a K with a one-line error."""
    ks = tuple(k for k in ks if k <= num_items)
    if not ks:
        return {}
    seen_UI = interaction_matrix(seen, num_users, num_items)
    relevant_UI = interaction_matrix(relevant, num_users, num_items)
    liked_UI = interaction_matrix(relevant, num_users, num_items, min_rating=LIKE_THRESHOLD)
    needed_U = torch.nonzero((relevant_UI & ~seen_UI).any(1)).flatten()
    row_of = torch.full((num_users,), -1, dtype=torch.int64)
    row_of[needed_U] = torch.arange(len(needed_U))
    was_training = model.training
    model.eval()
    try:
        predictions_UIT = predict_catalogue(model, features, needed_U, num_items, device)
    finally:
        model.train(was_training)
    targets = [t.target for t in tasks]
    odds_ratio_U = torch.ones(num_users) if odds_ratio_U is None else odds_ratio_U.float()
    scores: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"": lambda p, r: ranking_score(p, tasks, r)}
    if RATE_TARGET in targets and len(tasks) > 1:
        scores["by_rate_"] = lambda p, r: p[:, targets.index(RATE_TARGET)]
    metrics: dict[str, float] = {}
    for prefix, score in scores.items():
        def score_users(user_U: Tensor, score=score) -> Tensor:
            p_UIT = predictions_UIT[row_of[user_U]]
            odds_ratio_B = odds_ratio_U[user_U].repeat_interleave(num_items)
            return score(p_UIT.reshape(-1, p_UIT.shape[-1]), odds_ratio_B).view(len(user_U), num_items)

        result = full_ranking(score_users, seen_UI, relevant_UI, liked_UI, ks)
        metrics.update({f"{prefix}{k}": v for k, v in result.metrics.items()
                        if not (prefix and "users" in k)})
    return metrics
