"""Recsys models (every kind through the one build_model) and the task's losses and metrics."""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from recsys_synthetic import hand_data

from moe_apps.recsys.config import (
    DISLIKE,
    LIKE,
    MODELS,
    RATING,
    ModelConfig,
    RecsysConfig,
    TaskSpec,
    get_preset,
    with_vocab,
)
from moe_apps.recsys.data import RatingBatches, build_features
from moe_apps.recsys.model import (
    MultiTaskRecommender,
    RecsysOutput,
    build_model,
    count_parameters,
    gate_labels,
)
from moe_apps.recsys.task import RecsysTask, task_losses, task_metrics


def _setup(model: str, tasks=(LIKE, RATING), num_experts: int = 4):
    data = hand_data()
    train, _ = data.folds["u1"]
    features = build_features(data, train)
    config = with_vocab(RecsysConfig(monitor="loss", model=ModelConfig(
        model=model, tasks=tasks, embedding_dim=4, num_experts=num_experts, expert_dim=6,
        tower_dim=3, dropout=0.0)), features.vocab)
    batch = next(iter(RatingBatches(features, tasks, train, 16, in_fit=True)))
    return config, build_model(config.model), batch


@pytest.mark.parametrize("model", MODELS)
def test_forward_shapes_every_model(model: str) -> None:
    config, net, batch = _setup(model)
    out = net(batch)
    B = len(batch)
    assert out.logits_BT.shape == out.predictions_BT.shape == (B, 2)
    assert torch.all((out.predictions_BT[:, 0] > 0) & (out.predictions_BT[:, 0] < 1))
    assert torch.all((out.predictions_BT[:, 1] > 1) & (out.predictions_BT[:, 1] < 5))
    assert out.embedding_sq.dim() == 0 and out.embedding_sq > 0
    labels = gate_labels(config.model)
    if model in ("mmoe", "ple"):
        assert [tuple(g.shape) for g in out.gate_weights] == [(B, len(n)) for n in labels]
        for g in out.gate_weights:
            torch.testing.assert_close(g.sum(1), torch.ones(B))
    else:
        assert out.gate_weights is None and labels is None
    loss, logs = RecsysTask(config.model.tasks, 0.01).training_loss(net, batch)
    loss.backward()
    assert set(logs) == {"like_loss", "rating_loss"}
    user_tables = [p for n, p in net.named_parameters() if "t_user" in n]
    assert user_tables and all(p.grad is not None for p in user_tables)


def test_ple_gates_see_task_and_shared_experts() -> None:
    config, net, batch = _setup("ple", tasks=(LIKE, RATING, DISLIKE), num_experts=5)
    assert config.model.num_shared_experts == 2
    assert gate_labels(config.model) == [["like0", "shared0", "shared1"],
                                         ["rating0", "shared0", "shared1"],
                                         ["dislike0", "shared0", "shared1"]]
    assert net(batch).predictions_BT.shape == (len(batch), 3)
    with pytest.raises(ValueError, match="shared expert"):
        ModelConfig(model="ple", num_experts=2, num_task_experts=1)


def test_single_model_has_one_network_per_task_and_budgets_compare() -> None:
    _, single, batch = _setup("single")
    assert len(single.nets) == 2
    assert single.nets[0].encoder is not single.nets[1].encoder
    out_like = single.nets[0](batch)
    torch.testing.assert_close(single(batch).logits_BT[:, :1], out_like.logits_BT)
    dense = {m: count_parameters(_setup(m)[1])["dense"] for m in ("shared-bottom", "mmoe", "ple")}
    assert max(dense.values()) < 2 * min(dense.values())


def test_heads_map_logits_to_probability_and_range() -> None:
    _, net, batch = _setup("mmoe", tasks=(LIKE, TaskSpec("stars", "regression", "rating", 1.0, 0, 10)))
    assert isinstance(net, MultiTaskRecommender)
    out = net(batch)
    torch.testing.assert_close(out.predictions_BT[:, 0], torch.sigmoid(out.logits_BT[:, 0]))
    torch.testing.assert_close(out.predictions_BT[:, 1], 10 * torch.sigmoid(out.logits_BT[:, 1]))


def _auc_by_pairs(y: list[int], p: list[float]) -> float:
    pos = [s for s, t in zip(p, y, strict=True) if t == 1]
    neg = [s for s, t in zip(p, y, strict=True) if t == 0]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def test_task_metrics_match_hand_computations() -> None:
    like = [1, 0, 1, 1, 0, 0]
    p_like = [0.9, 0.3, 0.4, 0.7, 0.4, 0.1]
    rating = [5.0, 2.0, 4.0, 4.0, 3.0, 1.0]
    p_rating = [4.5, 2.5, 3.0, 4.2, 3.6, 1.9]
    tasks = (LIKE, RATING)
    targets = np.array([like, rating], dtype=np.float32).T
    preds = np.array([p_like, p_rating], dtype=np.float32).T
    metrics = task_metrics(tasks, targets, preds)
    logloss = -sum(t * math.log(q) + (1 - t) * math.log(1 - q) for t, q in zip(like, p_like, strict=True)) / 6
    errors = [a - b for a, b in zip(p_rating, rating, strict=True)]
    rmse = math.sqrt(sum(e * e for e in errors) / 6)
    assert metrics["like_auc"] == pytest.approx(_auc_by_pairs(like, p_like))
    assert metrics["like_logloss"] == pytest.approx(logloss, rel=1e-5)
    assert metrics["rating_rmse"] == pytest.approx(rmse, rel=1e-5)
    assert metrics["rating_mae"] == pytest.approx(sum(abs(e) for e in errors) / 6, rel=1e-5)
    assert metrics["loss"] == pytest.approx(logloss + rmse**2, rel=1e-5)
    one_class = task_metrics((LIKE,), np.ones((3, 1)), np.full((3, 1), 0.5))
    assert math.isnan(one_class["like_auc"])
    with pytest.raises(ValueError, match="empty"):
        task_metrics(tasks, np.zeros((0, 2)), np.zeros((0, 2)))


def test_task_losses_and_weights() -> None:
    logits = torch.tensor([[2.0, 0.0], [-1.0, 1.0]])
    preds = torch.stack([torch.sigmoid(logits[:, 0]), 1 + 4 * torch.sigmoid(logits[:, 1])], 1)
    targets = torch.tensor([[1.0, 4.0], [0.0, 2.0]])
    bce, mse = task_losses((LIKE, RATING), logits, preds, targets)
    by_hand_bce = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-1.0))) / 2
    by_hand_mse = ((3.0 - 4.0) ** 2 + (1 + 4 / (1 + math.exp(-1.0)) - 2.0) ** 2) / 2
    assert float(bce) == pytest.approx(by_hand_bce, rel=1e-6)
    assert float(mse) == pytest.approx(by_hand_mse, rel=1e-6)
    # RecsysTask weights them: sum_t w_t * L_t + embedding_l2 * embedding_sq
    out = RecsysOutput(logits, preds, None, torch.tensor(3.0))
    tasks = (replace(LIKE, loss_weight=2.0), replace(RATING, loss_weight=0.5))
    loss, logs = RecsysTask(tasks, 0.1).training_loss(lambda batch: out, SimpleNamespace(targets_BT=targets, mask_BT=None))
    assert float(loss) == pytest.approx(2.0 * by_hand_bce + 0.5 * by_hand_mse + 0.1 * 3.0, rel=1e-6)
    assert {k: float(v) for k, v in logs.items()} == pytest.approx(
        {"like_loss": by_hand_bce, "rating_loss": by_hand_mse}, rel=1e-6)


def test_config_validation_and_presets() -> None:
    with pytest.raises(ValueError, match="model must be one of"):
        ModelConfig(model="moe")
    with pytest.raises(ValueError, match="TaskSpec.target"):
        TaskSpec("x", "binary", "nope")
    with pytest.raises(ValueError, match="official ML-100K fold"):
        RecsysConfig(dataset="movielens-1m", split="u1")
    with pytest.raises(ValueError, match="monitor must be one of"):
        RecsysConfig(monitor="dislike_auc")
    with pytest.raises(ValueError, match="preset must be one of"):
        get_preset("huge")
    with pytest.raises(ValueError, match="vocab"):
        build_model(ModelConfig())
    config = replace(get_preset("three-tasks"), seed=3)
    assert RecsysConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown RecsysConfig keys"):
        RecsysConfig.from_dict({**config.to_dict(), "colour": 1})


def test_task_mix_trains_like_over_the_entire_space() -> None:
    from moe_apps.recsys.task import entire_space_bce

    rate = SimpleNamespace(name="rate", kind="binary", target="rated", loss_weight=1.0)
    logits = torch.tensor([[1.0, 0.5, 0.0], [-2.0, 2.0, 0.0], [0.3, -1.0, 0.0]])
    preds = torch.cat([torch.sigmoid(logits[:, :2]), torch.full((3, 1), 3.0)], 1)
    targets = torch.tensor([[1.0, 1.0, 4.0], [0.0, 0.0, 0.0], [1.0, 0.0, 2.0]])  # row 1: unrated
    mask = torch.tensor([[True, True, True], [True, False, False], [True, True, True]])
    rate_loss, like_loss, rating_loss = task_losses((rate, LIKE, RATING), logits, preds, targets, mask)
    p = [1 / (1 + math.exp(-a)) / (1 + math.exp(-b)) for a, b in logits[:, :2].tolist()]
    by_hand = -(math.log(p[0]) + math.log(1 - p[1]) + math.log(1 - p[2])) / 3  # every row counts
    assert float(like_loss) == pytest.approx(by_hand, rel=1e-5)
    assert float(entire_space_bce(logits[:, 0], logits[:, 1], targets[:, 1]).mean()) == pytest.approx(by_hand, rel=1e-5)
    assert float(rating_loss) == pytest.approx(((3.0 - 4.0) ** 2 + (3.0 - 2.0) ** 2) / 2)  # rated rows only


def test_ranking_metrics_can_be_monitored() -> None:
    from moe_apps.recsys import ranking
    from moe_apps.recsys.config import RANKING_MONITORS

    assert set(RANKING_MONITORS) == {f"{m}@{k}" for m in ranking.METRICS for k in ranking.KS}
    assert RecsysConfig(monitor="ndcg@10", monitor_mode="max").monitor == "ndcg@10"
    with pytest.raises(ValueError, match="monitor_mode='max'"):
        RecsysConfig(monitor="ndcg@10")  # the default mode is min
    with pytest.raises(ValueError, match="monitor must be one of"):
        RecsysConfig(monitor="ndcg@5", monitor_mode="max")
    config, net, batch = _setup("shared-bottom")
    calls = []

    def by_hand(model):
        calls.append(model)
        return {"ndcg@10": 0.25}

    metrics = RecsysTask(config.model.tasks, 0.0, ranking=by_hand).evaluate(net.eval(), [batch])
    assert calls == [net] and metrics["ndcg@10"] == 0.25 and "like_auc" in metrics
