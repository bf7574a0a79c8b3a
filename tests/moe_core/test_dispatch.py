"""Sorted dispatch, capacity and combine vs plain Python loops; every kernel of the fused path."""

from __future__ import annotations

import itertools

import pytest
import torch
from moe_core_references import reference_activation
from torch import nn

from moe_core import dispatch, expert_layouts
from moe_core.dispatch import (
    dispatch_combine,
    expert_capacity,
    expert_ffn_combine,
    sort_slots,
)
from moe_core.expert_choice import ExpertChoiceRouter
from moe_core.expert_layouts import tier_plan
from moe_core.experts import ExpertBank, ModuleExperts
from moe_core.layer import MoE
from moe_core.routers import TopKRouter


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


def _ffn(w_in, w_out, b_in, b_out, e, x, activation):
    h = x @ w_in[e] + (0 if b_in is None else b_in[e])
    return reference_activation(h, activation) @ w_out[e] + (0 if b_out is None else b_out[e])


def _reference(x_TD, token_S, expert_S, weight_S, keep_S, params, activation):
    out = torch.zeros(x_TD.shape[0], params[1].shape[-1])
    rows = [[] for _ in range(x_TD.shape[0])]
    for s in range(token_S.shape[0]):
        if keep_S[s]:
            t, e = int(token_S[s]), int(expert_S[s])
            rows[t].append(weight_S[s] * _ffn(*params, e, x_TD[t], activation))
    return torch.stack([sum(r, torch.zeros_like(out[0])) for r in rows])


def _many_tiers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Free tiers, so that ``bucketed`` splits even these few rows into several."""
    monkeypatch.setattr(expert_layouts, "TIER_LEVEL_ROWS", 0)
    monkeypatch.setattr(expert_layouts, "TIER_COPY_ROWS", 0)
    monkeypatch.setattr(expert_layouts, "TIER_FIXED_ROWS", 0)


@pytest.mark.parametrize("method", ["auto", "padded", "bucketed", "grouped", "loop"])
@pytest.mark.parametrize("capacity", [None, 3])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("gather_plan", [False, True])
def test_fused_expert_ffn_combine_matches_loop(
    method: str, capacity: int | None, activation: str, bias: bool, gather_plan: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _many_tiers(monkeypatch)
    torch.manual_seed(0)
    T, E_, D_, H_ = 9, 4, 8, 4
    width = 2 * H_ if activation == "swiglu" else H_
    w_in = torch.randn(E_, D_, width, requires_grad=True)
    w_out = torch.randn(E_, H_, D_, requires_grad=True)
    b_in = torch.randn(E_, width, requires_grad=True) if bias else None
    b_out = torch.randn(E_, D_, requires_grad=True) if bias else None
    x = torch.randn(T, D_, requires_grad=True)
    token_S = torch.arange(T).repeat(2)
    expert_S = torch.randint(0, E_ - 1, (2 * T,))  # the last expert gets nothing
    weight_S = torch.rand(2 * T, requires_grad=True)
    slots = sort_slots(expert_S, E_, capacity)
    slot_KT = None
    if gather_plan:  # token t's slots are t and T + t; where did the sort put them?
        slot_KT = torch.argsort(slots.order_S).view(2, T)
    out = expert_ffn_combine(
        x, token_S[slots.order_S], weight_S[slots.order_S], slots.counts_E,
        w_in, w_out, b_in, b_out, activation, method, slot_KT,
    )
    params = (w_in, w_out, b_in, b_out)
    ref = _reference(x, token_S, expert_S, weight_S, slots.kept_S, params, activation)
    torch.testing.assert_close(out, ref)
    inputs = [x, weight_S, *(p for p in params if p is not None)]
    gy = torch.randn(out.shape)
    got = torch.autograd.grad(out, inputs, gy, retain_graph=True)
    want = torch.autograd.grad(ref, inputs, gy, retain_graph=True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # a zero-stride incoming gradient (from .sum()) is fine too
    got, want = torch.autograd.grad(out.sum(), inputs), torch.autograd.grad(ref.sum(), inputs)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


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


def _record_kernels(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Patch the dispatch so that every fused call appends its kernel: "loop" or the layout."""
    used: list[str] = []
    loop, fused = dispatch.expert_loop_ffn_combine, dispatch._ExpertFFNCombine.apply
    monkeypatch.setattr(dispatch, "expert_loop_ffn_combine",
                        lambda *a: used.append("loop") or loop(*a))
    monkeypatch.setattr(dispatch._ExpertFFNCombine, "apply",
                        lambda *a: used.append(type(a[6]).__name__) or fused(*a))
    return used


def test_auto_pads_within_pad_limit_else_loops(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where grouped GEMM is unsupported (bf16 rows of 12 bytes, not 16-byte aligned), ``auto``
    pads only while the padded rows stay within PAD_LIMIT x the real rows."""
    used = _record_kernels(monkeypatch)
    torch.manual_seed(2)
    bank = ExpertBank(8, 6, 16).to(torch.bfloat16)
    x = torch.randn(32, 6, dtype=torch.bfloat16)
    even = torch.arange(32) % 8  # 4 rows per expert: no padding at all
    skewed = torch.full((32,), 3)  # one expert: padding to 32 rows would be 8x the real rows
    for expert_S in (even, skewed):
        weight_S = torch.rand(32)
        got = dispatch_combine(x, torch.arange(32), expert_S, weight_S, bank).output
        want = torch.stack([
            weight_S[t] * (torch.nn.functional.gelu(x[t].float() @ bank.w_in[e].float())
                           @ bank.w_out[e].float())
            for t, e in enumerate(expert_S.tolist())
        ])
        torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.05)
    assert used == ["_Padded", "loop"]


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


def test_bf16_kernels() -> None:
    torch.manual_seed(3)
    bank32 = ExpertBank(4, 16, 32)
    x = torch.randn(20, 16)
    token_S, expert_S, weight_S = torch.arange(20).repeat(2), torch.randint(0, 4, (40,)), torch.rand(40)
    want = dispatch_combine(x, token_S, expert_S, weight_S, bank32).output
    for method in ("padded", "bucketed", "grouped", "loop"):
        bank = ExpertBank(4, 16, 32, method=method).to(torch.bfloat16)
        bank.load_state_dict(bank32.state_dict())
        got = dispatch_combine(x.bfloat16(), token_S, expert_S, weight_S, bank).output
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.05)


def _brute_force_tier_cost(counts: list[int]) -> float:
    """Cheapest split of the experts sorted by count into at most MAX_TIERS buckets, each padded
    to its own largest count, every split tried; tier costs as `tier_plan` documents them."""
    c, E, best = sorted(counts, reverse=True), len(counts), float("inf")
    for m in range(1, expert_layouts.MAX_TIERS + 1):
        for cuts in itertools.combinations(range(1, E), m - 1):
            bounds = [0, *cuts, E]
            cost = 0.0
            for i, j in itertools.pairwise(bounds):  # bucket [i, j) ends the tier of the first j
                cost += (j - i) * c[i] + expert_layouts.TIER_LEVEL_ROWS * j
                tier = expert_layouts.TIER_COPY_ROWS * j + expert_layouts.TIER_FIXED_ROWS
                cost += tier if j < E else 0
            best = min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_tier_plan_is_the_cheapest_split(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    E = int(torch.randint(1, 8, (1,), generator=gen))
    counts = torch.randint(0, 120, (E,), generator=gen).tolist()
    if seed == 0:
        counts = [100, 3, 3, 90, 40, 0, 41]  # ties and an empty expert
        E = len(counts)
    tiers = tier_plan(counts)
    # shape: tier 1 is every expert from row 0; each tier starts where the last ended and holds
    # at least the experts with rows there; the top tier ends at the largest count
    assert tiers[0][0] == list(range(E)) and tiers[0][1] == 0
    assert tiers[-1][2] == max(counts)
    cost = 0.0
    for k, (experts, lo, hi) in enumerate(tiers):
        if k > 0:
            assert lo == tiers[k - 1][2] and hi > lo
        assert {e for e in range(E) if counts[e] > lo} <= set(experts)
        cost += len(experts) * (hi - lo + expert_layouts.TIER_LEVEL_ROWS)
        tier = expert_layouts.TIER_COPY_ROWS * len(experts) + expert_layouts.TIER_FIXED_ROWS
        cost += tier if k > 0 else 0
    assert cost == _brute_force_tier_cost(counts)


def test_auto_on_cpu_loops_over_uneven_blocks_and_batches_expert_choice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Token choice (uneven blocks) takes the per-expert kernel; expert choice (every expert the
    same C rows) takes one batched ``bmm`` per matrix, with no Python loop over the experts."""
    used = _record_kernels(monkeypatch)
    torch.manual_seed(4)
    x = torch.randn(64, 16)
    MoE(TopKRouter(16, 8, top_k=2), ExpertBank(8, 16, 32))(x).output.sum().backward()
    MoE(ExpertChoiceRouter(16, 8, capacity_factor=1.0), ExpertBank(8, 16, 32))(x).output.sum().backward()
    assert used == ["loop", "_Padded"]
