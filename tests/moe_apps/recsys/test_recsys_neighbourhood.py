"""The EASE neighbourhood feature: closed-form weights against per-movie ridge regressions,
cross-fitting against scores refitted without each part, and how batches and models carry it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_recsys_protocols import _random_data

from moe_apps.recsys.config import LIKE, RATING, ModelConfig, RecsysConfig, with_vocab
from moe_apps.recsys.data import build_features, make_batch
from moe_apps.recsys.model import build_model
from moe_apps.recsys.neighbourhood import FOLDS, crossfit_folds, ease_weights, neighbourhood_scores
from moe_apps.recsys.splits import protocol_parts
from moe_apps.recsys.train import model_config_dict


def _ridge_columns(x: np.ndarray, lam: float) -> np.ndarray:
    """EASE column by column: movie i's weights are a ridge regression of its column on the
    others' (the zero-diagonal constraint just leaves movie i out), solved with lstsq."""
    num_items = x.shape[1]
    b = np.zeros((num_items, num_items))
    for i in range(num_items):
        others = [j for j in range(num_items) if j != i]
        design = np.vstack([x[:, others], np.sqrt(lam) * np.eye(len(others))])
        target = np.concatenate([x[:, i], np.zeros(len(others))])
        b[others, i] = np.linalg.lstsq(design, target, rcond=None)[0]
    return b


def test_ease_weights_equal_per_movie_ridge_regressions() -> None:
    x = (np.random.default_rng(0).random((30, 12)) < 0.3).astype(float)
    got = ease_weights(torch.as_tensor(x), 2.5).numpy()
    np.testing.assert_allclose(got, _ridge_columns(x, 2.5), atol=1e-9)
    assert np.all(np.diag(got) == 0)


def test_fit_ratings_read_scores_fitted_without_their_part() -> None:
    data = _random_data(num_users=20, num_items=15, per_user=6)
    fit = data.ratings
    lam = 3.0
    scores = neighbourhood_scores(fit, 20, 15, lam, seed=4)
    x = np.zeros((20, 15))
    x[fit.user, fit.item] = 1.0
    fold = crossfit_folds(len(fit), 4).numpy()
    raw_fit = np.zeros(len(fit))
    raw_held_out = np.zeros((20, 15))
    for k in range(FOLDS):
        x_k = x.copy()
        x_k[fit.user[fold == k], fit.item[fold == k]] = 0.0  # part k refitted without its ratings
        s_k = x @ _ridge_columns(x_k, lam)
        raw_fit[fold == k] = s_k[fit.user[fold == k], fit.item[fold == k]]
        raw_held_out += s_k / FOLDS
    scale = raw_held_out.std(ddof=1)
    np.testing.assert_allclose(scores.held_out_UI.numpy(), raw_held_out / scale, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(scores.fit_UI[fit.user, fit.item].numpy(), raw_fit / scale, rtol=1e-4, atol=1e-5)
    unrated = x == 0
    assert torch.equal(scores.fit_UI[unrated], scores.held_out_UI[unrated])


def test_cross_fitting_removes_the_in_sample_optimism() -> None:
    """Fitted on themselves, the fit ratings score far above held-out ratings; cross-fitted, not."""
    data = _random_data(num_users=60, num_items=40, per_user=12, seed=3)
    parts = protocol_parts(data, "random", seed=0, val_fraction=0.1)
    scores = neighbourhood_scores(parts.fit, 60, 40, 5.0, seed=0)
    x = torch.zeros(60, 40, dtype=torch.float64)
    x[parts.fit.user, parts.fit.item] = 1.0
    in_sample = (x @ ease_weights(x, 5.0))[parts.fit.user, parts.fit.item].mean()
    crossfit = scores.fit_UI[parts.fit.user, parts.fit.item].double().mean()
    held_out = scores.held_out_UI[parts.test.user, parts.test.item].double().mean()
    scale = float((x @ ease_weights(x, 5.0)).std())  # roughly the standardisation of the tables
    assert in_sample / scale > held_out + 0.3
    assert abs(crossfit - held_out) < 0.3


def test_batches_carry_the_score_as_a_third_dense_feature() -> None:
    data = _random_data()
    parts = protocol_parts(data, "random", seed=0, val_fraction=0.1)
    features = build_features(data, parts.fit, 5.0, seed=1)
    plain = build_features(data, parts.fit)
    user, item = torch.as_tensor(parts.fit.user[:8]), torch.as_tensor(parts.fit.item[:8])
    in_fit = torch.tensor([True, False] * 4)
    batch = make_batch(features, (LIKE, RATING), user, item, None, in_fit_B=in_fit)
    expected = torch.where(in_fit, features.neighbourhood.fit_UI[user, item],
                           features.neighbourhood.held_out_UI[user, item])
    assert torch.equal(batch.dense_BF[:, 2], expected)
    assert torch.equal(batch.dense_BF[:, :2],
                       make_batch(plain, (LIKE, RATING), user, item, None, in_fit_B=in_fit).dense_BF)
    config = with_vocab(RecsysConfig(model=ModelConfig(embedding_dim=4, num_experts=2, expert_dim=4,
                                                        tower_dim=3, neighbourhood=5.0)), features.vocab)
    assert build_model(config.model)(batch).predictions_BT.shape == (8, 2)


def test_the_option_is_validated_and_recorded_only_when_on() -> None:
    for bad in (-1.0, float("inf"), "250"):
        with pytest.raises(ValueError, match="neighbourhood"):
            ModelConfig(neighbourhood=bad)
    assert "neighbourhood" not in model_config_dict(RecsysConfig())  # old run folders still match
    on = RecsysConfig(model=ModelConfig(neighbourhood=250.0))
    assert model_config_dict(on)["neighbourhood"] == 250.0
    with pytest.raises(ValueError, match="must be > 0"):
        neighbourhood_scores(_random_data().ratings, 40, 60, 0.0, seed=0)


def test_the_score_joins_each_task_logit_with_a_learned_weight() -> None:
    from dataclasses import replace

    data = _random_data()
    parts = protocol_parts(data, "random", seed=0, val_fraction=0.1)
    features = build_features(data, parts.fit, 5.0)
    for kind in ("mmoe", "single"):
        config = with_vocab(RecsysConfig(model=ModelConfig(model=kind, embedding_dim=4, num_experts=2,
                                                            expert_dim=4, tower_dim=3, neighbourhood=5.0)),
                            features.vocab)
        model = build_model(config.model).eval()
        weights = [p for name, p in model.named_parameters() if name.endswith("neighbourhood_weight")]
        assert weights and all(bool((w == 0).all()) for w in weights)  # starts as the plain network
        with torch.no_grad():
            for w in weights:
                w.copy_(torch.linspace(0.7, -0.3, len(w)))
        batch = make_batch(features, (LIKE, RATING), torch.as_tensor(parts.fit.user[:16]),
                           torch.as_tensor(parts.fit.item[:16]), None)
        without = replace(batch, dense_BF=torch.cat([batch.dense_BF[:, :2], torch.zeros(16, 1)], 1))
        with torch.no_grad():
            delta = model(batch).logits_BT - model(without).logits_BT
        w_T = torch.cat([w for w in weights]) if kind == "single" else weights[0]
        torch.testing.assert_close(delta, batch.dense_BF[:, 2:] * w_T)
