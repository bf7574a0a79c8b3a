"""`Routing`: the two forms of a routing decision and their assignment slots."""

from __future__ import annotations

import pytest
import torch

from moe_core.routing import Routing


def test_token_choice_assignments_are_k_major() -> None:
    indices = torch.tensor([[2, 0], [1, 2], [0, 1]])
    weights = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.9, 0.1]])
    routing = Routing(torch.full((3, 3), 1 / 3), expert_indices_TK=indices, combine_weights_TK=weights)
    token_S, expert_S, weight_S = routing.assignments()
    assert token_S.tolist() == [0, 1, 2, 0, 1, 2]
    assert expert_S.tolist() == [2, 1, 0, 0, 2, 1]
    assert weight_S.tolist() == pytest.approx([0.7, 0.6, 0.9, 0.3, 0.4, 0.1])
    assert routing.top_k == 2 and routing.num_tokens == 3 and routing.num_experts == 3


def test_expert_choice_assignments_are_expert_major() -> None:
    tokens = torch.tensor([[3, 0], [1, 2]])
    weights = torch.tensor([[0.5, 0.4], [0.3, 0.2]])
    routing = Routing(torch.full((4, 2), 0.5), token_indices_EC=tokens, combine_weights_EC=weights)
    token_S, expert_S, _ = routing.assignments()
    assert token_S.tolist() == [3, 0, 1, 2]
    assert expert_S.tolist() == [0, 0, 1, 1]
    assert routing.is_expert_choice and routing.top_k == 1


def test_routing_needs_exactly_one_form() -> None:
    probs = torch.full((2, 2), 0.5)
    with pytest.raises(ValueError, match="exactly one"):
        Routing(probs)
    with pytest.raises(ValueError, match="combine_weights_TK"):
        Routing(probs, expert_indices_TK=torch.zeros(2, 1, dtype=torch.long))
