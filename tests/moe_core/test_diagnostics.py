"""Tests for moe_core.diagnostics: RoutingStats on hand-built routings, StatsAccumulator sums."""

from __future__ import annotations

import math

import pytest
import torch

from moe_core.diagnostics import RoutingStats, StatsAccumulator, routing_stats
from moe_core.routing import Routing

THIRD = 1.0 / 3.0


def _token_choice() -> Routing:
    """T = 4 tokens, E = 3 experts, K = 2. Slots are k-major: s = k * T + t."""
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [THIRD, THIRD, THIRD], [0.0, 0.0, 1.0]])
    indices = torch.tensor([[0, 1], [0, 1], [2, 0], [2, 0]])
    return Routing(probs_TE=probs, expert_indices_TK=indices, combine_weights_TK=torch.ones(4, 2))


# slot experts: k=0 -> [0, 0, 2, 2], k=1 -> [1, 1, 0, 0]; slot 3 (token 3) and 4 (token 0) dropped
KEPT = torch.tensor([True, True, True, False, False, True, True, True])


def test_stats_all_kept() -> None:
    stats = routing_stats(_token_choice())
    assert stats.tokens_per_expert_E.tolist() == [4, 2, 2]
    assert stats.tokens_per_expert_E.dtype == torch.int64
    torch.testing.assert_close(stats.fraction_per_expert_E, torch.tensor([0.5, 0.25, 0.25]))
    assert stats.dropped_fraction == 0.0
    # entropies 0, ln 2, ln 3, 0 -> mean ln 6 / 4
    assert stats.entropy == pytest.approx(math.log(6.0) / 4, rel=1e-6)
    # counts [4, 2, 2]: mean 8/3, population var ((4/3)^2 + 2 (2/3)^2) / 3 = 24/27
    assert stats.load_cv == pytest.approx(math.sqrt(24 / 27) / (8 / 3), rel=1e-6)
    assert stats.dead_experts == 0


def test_stats_with_drops() -> None:
    stats = routing_stats(_token_choice(), kept_S=KEPT)
    # kept slot experts: 0, 0, 2, 1, 0, 0 -> counts [4, 1, 1]
    assert stats.tokens_per_expert_E.tolist() == [4, 1, 1]
    torch.testing.assert_close(stats.fraction_per_expert_E, torch.tensor([4 / 6, 1 / 6, 1 / 6]))
    assert stats.dropped_fraction == pytest.approx(2 / 8)
    # counts mean 2, population var (4 + 1 + 1) / 3 = 2
    assert stats.load_cv == pytest.approx(math.sqrt(2.0) / 2.0, rel=1e-6)
    assert stats.dead_experts == 0


def test_stats_with_padding_mask() -> None:
    mask = torch.tensor([True, True, False, True])  # token 2 (slots 2 and 6) is padding
    stats = routing_stats(_token_choice(), kept_S=KEPT, mask_T=mask)
    # kept real slots: s0 e0, s1 e0, s5 e1, s7 e0 -> counts [3, 1, 0]
    assert stats.tokens_per_expert_E.tolist() == [3, 1, 0]
    assert stats.dead_experts == 1
    assert stats.dropped_fraction == pytest.approx(2 / 6)  # slots 3 and 4 of 6 real slots
    assert stats.entropy == pytest.approx(math.log(2.0) / 3, rel=1e-6)  # tokens 0, 1, 3
    # counts [3, 1, 0]: mean 4/3, population var ((5/3)^2 + (1/3)^2 + (4/3)^2) / 3 = 42/27
    assert stats.load_cv == pytest.approx(math.sqrt(42 / 27) / (4 / 3), rel=1e-6)


def test_stats_everything_masked_is_zero_not_nan() -> None:
    stats = routing_stats(_token_choice(), mask_T=torch.zeros(4, dtype=torch.bool))
    assert stats.tokens_per_expert_E.tolist() == [0, 0, 0]
    assert stats.fraction_per_expert_E.tolist() == [0.0, 0.0, 0.0]
    assert (stats.dropped_fraction, stats.entropy, stats.load_cv) == (0.0, 0.0, 0.0)
    assert stats.dead_experts == 3


def test_stats_expert_choice_counts_untaken_tokens_as_dropped() -> None:
    routing = Routing(
        probs_TE=torch.full((3, 2), 0.5),
        token_indices_EC=torch.tensor([[0, 1], [1, 0]]),  # token 2 taken by no expert
        combine_weights_EC=torch.full((2, 2), 0.5),
    )
    stats = routing_stats(routing)
    assert stats.tokens_per_expert_E.tolist() == [2, 2]
    assert stats.dropped_fraction == pytest.approx(1 / 3)
    assert stats.entropy == pytest.approx(math.log(2.0), rel=1e-6)
    assert stats.load_cv == 0.0
    padded = Routing(
        probs_TE=torch.full((3, 2), 0.5),
        token_indices_EC=torch.tensor([[0, 2], [1, 2]]),  # token 2 is padding
        combine_weights_EC=torch.full((2, 2), 0.5),
    )
    stats = routing_stats(padded, mask_T=torch.tensor([True, True, False]))
    assert stats.tokens_per_expert_E.tolist() == [1, 1]
    assert stats.dropped_fraction == 0.0


def test_stats_are_detached_cpu_and_frozen() -> None:
    probs = torch.tensor([[0.6, 0.4]], requires_grad=True)
    routing = Routing(
        probs_TE=probs, expert_indices_TK=torch.tensor([[0]]), combine_weights_TK=probs[:, :1]
    )
    stats = routing_stats(routing)
    assert stats.tokens_per_expert_E.device.type == "cpu"
    assert not stats.fraction_per_expert_E.requires_grad
    assert isinstance(stats.entropy, float) and isinstance(stats.dead_experts, int)
    with pytest.raises(AttributeError):
        stats.entropy = 0.0  # type: ignore[misc]


def test_stats_bad_masks_raise() -> None:
    with pytest.raises(ValueError, match="kept_S"):
        routing_stats(_token_choice(), kept_S=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask_T"):
        routing_stats(_token_choice(), mask_T=torch.ones(4))


def _stats(counts: list[int], dropped: float, entropy: float, load_cv: float) -> RoutingStats:
    counts_E = torch.tensor(counts)
    return RoutingStats(
        tokens_per_expert_E=counts_E,
        fraction_per_expert_E=counts_E / counts_E.sum(),
        dropped_fraction=dropped,
        entropy=entropy,
        load_cv=load_cv,
        dead_experts=int((counts_E == 0).sum()),
    )


def test_accumulator_sums_and_means() -> None:
    acc = StatsAccumulator()
    assert acc.summary() == {"steps": 0}
    acc.update(_stats([3, 1, 0, 0], dropped=0.1, entropy=1.0, load_cv=0.5))
    acc.update(_stats([1, 1, 2, 0], dropped=0.3, entropy=0.5, load_cv=0.7))
    acc.update(_stats([0, 2, 2, 0], dropped=0.2, entropy=0.0, load_cv=0.9))
    summary = acc.summary()
    assert summary["steps"] == 3
    assert summary["tokens_per_expert"] == [4, 4, 4, 0]
    assert summary["fraction_per_expert"] == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0.0])
    assert summary["dropped_fraction"] == pytest.approx(0.2)
    assert summary["entropy"] == pytest.approx(0.5)
    assert summary["step_load_cv"] == pytest.approx(0.7)
    # summed counts [4, 4, 4, 0]: mean 3, population var (1 + 1 + 1 + 9) / 4 = 3
    assert summary["load_cv"] == pytest.approx(math.sqrt(3.0) / 3.0)
    assert summary["dead_experts"] == 1  # expert 3 never used; expert 2 was idle only in step 1
    acc.reset()
    assert acc.summary() == {"steps": 0}


def test_accumulator_works_with_routing_stats_and_rejects_other_expert_counts() -> None:
    acc = StatsAccumulator()
    acc.update(routing_stats(_token_choice()))
    acc.update(routing_stats(_token_choice(), kept_S=KEPT))
    summary = acc.summary()
    assert summary["tokens_per_expert"] == [8, 3, 3]
    assert summary["dropped_fraction"] == pytest.approx(0.125)
    with pytest.raises(ValueError, match="experts"):
        acc.update(_stats([1, 1], dropped=0.0, entropy=0.0, load_cv=0.0))


def test_accumulator_state_dict_round_trip() -> None:
    acc = StatsAccumulator()
    acc.update(_stats([3, 1, 0], dropped=0.1, entropy=1.0, load_cv=0.5))
    acc.update(_stats([1, 1, 0], dropped=0.3, entropy=0.5, load_cv=0.7))
    restored = StatsAccumulator()
    restored.load_state_dict(acc.state_dict())
    assert restored.summary() == acc.summary()
    restored.update(_stats([0, 0, 2], dropped=0.2, entropy=0.0, load_cv=0.9))
    assert restored.summary()["tokens_per_expert"] == [4, 2, 2]
    assert restored.summary()["steps"] == 3
    empty = StatsAccumulator()
    empty.load_state_dict(StatsAccumulator().state_dict())
    assert empty.summary() == {"steps": 0}
    with pytest.raises(ValueError, match="missing keys"):
        empty.load_state_dict({"steps": 1})
