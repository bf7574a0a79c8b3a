"""Sorted dispatch, capacity and combine vs plain Python loops."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moe_core.dispatch import dispatch_combine, expert_capacity, sort_slots
from moe_core.experts import ExpertBank, ModuleExperts


def _loop_sort(expert_S: list[int], num_experts: int, capacity: int | None):
    """Kept slots grouped by expert in slot order, then dropped slots in (expert, slot) order."""
    per_expert: list[list[int]] = [[] for _ in range(num_experts)]
    for s, e in enumerate(expert_S):
        per_expert[e].append(s)
    kept, dropped = [], []
    for slots in per_expert:
        cut = len(slots) if capacity is None else capacity
        kept += slots[:cut]
        dropped += slots[cut:]
    counts = [min(len(s), capacity) if capacity is not None else len(s) for s in per_expert]
    return kept + dropped, counts, sorted(kept)


@pytest.mark.parametrize("capacity", [None, 1, 2, 5, 100])
def test_sort_slots_matches_loop(capacity: int | None) -> None:
    g = torch.Generator().manual_seed(0)
    expert_S = torch.randint(0, 5, (40,), generator=g)
    slots = sort_slots(expert_S, 6, capacity)  # expert 5 gets nothing
    order, counts, kept = _loop_sort(expert_S.tolist(), 6, capacity)
    assert slots.order_S.tolist() == order
    assert slots.counts_E.tolist() == counts
    assert slots.kept_S.nonzero().squeeze(1).tolist() == kept


def test_expert_capacity() -> None:
    assert expert_capacity(100, 2, 8, None) is None
    assert expert_capacity(100, 2, 8, 1.0) == 25
    assert expert_capacity(100, 2, 8, 1.01) == 26
    assert expert_capacity(3, 1, 8, 0.1, min_capacity=4) == 4


@pytest.mark.parametrize("capacity", [None, 2])
@pytest.mark.parametrize("top_k", [None, 2])
def test_generic_dispatch_for_module_experts(capacity: int | None, top_k: int | None) -> None:
    torch.manual_seed(1)
    modules = [nn.Linear(5, 3) for _ in range(3)]
    experts = ModuleExperts(modules)
    x = torch.randn(7, 5, requires_grad=True)
    token_S = torch.arange(7).repeat(2)
    expert_S = torch.randint(0, 3, (14,))
    weight_S = torch.rand(14)
    result = dispatch_combine(x, token_S, expert_S, weight_S, experts, capacity, top_k)
    assert result.output.shape == (7, 3)
    ref = torch.zeros(7, 3)
    counts = [0, 0, 0]
    for s in range(14):
        e = int(expert_S[s])
        if capacity is None or counts[e] < capacity:
            counts[e] += 1
            ref[int(token_S[s])] += weight_S[s] * modules[e](x[int(token_S[s])])
    torch.testing.assert_close(result.output, ref)
    assert result.counts_E.tolist() == counts
    assert int(result.kept_S.sum()) == sum(counts)


def test_padding_waste_and_empty_inputs() -> None:
    torch.manual_seed(2)
    bank = ExpertBank(8, 8, 16)
    x = torch.randn(30, 8, requires_grad=True)
    # every slot to expert 3: the other experts' blocks are empty
    token_S, expert_S, weight_S = torch.arange(30), torch.full((30,), 3), torch.rand(30)
    out = dispatch_combine(x, token_S, expert_S, weight_S, bank).output
    ref = weight_S[:, None] * (torch.nn.functional.gelu(x @ bank.w_in[3]) @ bank.w_out[3])
    torch.testing.assert_close(out, ref)
    # no slots at all
    empty = torch.zeros(0, dtype=torch.long)
    for method in ("padded", "bucketed", "grouped", "loop", "auto"):
        bank.method = method
        result = dispatch_combine(x, empty, empty, torch.zeros(0), bank)
        assert result.output.shape == (30, 8) and result.output.abs().max() == 0
        result.output.sum().backward()
    with pytest.raises(ValueError, match="top_k"):
        dispatch_combine(x, token_S, expert_S, weight_S, bank, top_k=2)
