"""Sort-by-expert dispatch, capacity dropping and weighted combine: the fast path of every MoE layer.

The sorted ("dropless" without capacity) dispatch of MegaBlocks (Gale et al. 2022): flatten a
`Routing` to slots ``(token_S, expert_S, weight_S)``, stable-sort the slots by expert, count them
per expert, keep at most C per expert (capacity, GShard: Lepikhin et al. 2020), run every expert
once on its block of rows, scale by the combine weights and sum back per token. Memory is
O(S * D): no ``(T, E, C)`` or ``(T, K, E)`` one-hot anywhere, and no host sync in the sort.

Experts with a ``forward_sorted`` (`ExpertBank`) take the sorted slots whole: gather, expert FFN
and combine are one fused autograd node, computed by the kernel `moe_core.kernels.choose_kernel`
picks. Other experts get their rows grouped by expert, and the combine happens here
(`combine_rows`): for token-choice slots (k-major) it is K row gathers (deterministic) rather than
an ``index_add_``.

Priority when dropping: within each expert, slots are kept in `Routing.assignments()` order. Token
choice is k-major, so every token's first choice beats any second choice, and earlier tokens win
within a choice (GShard's priority). Dropped slots go after the kept ones (shapes stay static) and
contribute 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from moe_core.routing import Routing


@dataclass(frozen=True)
class SortedSlots:
    """Slots sorted by expert, kept ones first.

    Attributes:
        order_S: slot index (into the ``assignments()`` order) of each sorted row; the first
            ``counts_E.sum()`` rows are the kept slots grouped by expert, then the dropped ones.
        counts_E: kept rows per expert (int64).
        kept_S: bool per slot in the ``assignments()`` order, False = dropped by capacity.
    """

    order_S: Tensor
    counts_E: Tensor
    kept_S: Tensor


@dataclass(frozen=True)
class DispatchResult:
    """What `dispatch_combine` returns.

    Attributes:
        output: ``(T, *out_features)`` routed output (0 for tokens whose every slot was dropped).
        kept_S: bool per slot in the ``assignments()`` order, False = dropped by capacity.
        counts_E: rows each expert computed (int64, after capacity).
    """

    output: Tensor
    kept_S: Tensor
    counts_E: Tensor


def expert_capacity(
    num_tokens: int, top_k: int, num_experts: int, capacity_factor: float | None, min_capacity: int = 1
) -> int | None:
    """``C = max(min_capacity, ceil(capacity_factor * T * K / E))``; None (dropless) for no factor."""
    if capacity_factor is None:
        return None
    return max(min_capacity, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def sort_slots(expert_S: Tensor, num_experts: int, capacity: int | None = None) -> SortedSlots:
    """Stable sort of slots by expert; with a capacity, the first C slots of each expert are kept.

    Kept slots go first (grouped by expert, in slot order), dropped slots after them, so the shape
    does not depend on how many were dropped.
    """
    S = expert_S.shape[0]
    order_S = torch.argsort(expert_S, stable=True)
    # scatter_add_, not bincount: a static output shape, so torch.compile needs no graph break
    counts_E = expert_S.new_zeros(num_experts).scatter_add_(0, expert_S, torch.ones_like(expert_S))
    if capacity is None:
        return SortedSlots(order_S, counts_E, torch.ones(S, dtype=torch.bool, device=expert_S.device))
    expert_sorted_S = expert_S[order_S]
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    position_S = torch.arange(S, device=expert_S.device) - starts_E[expert_sorted_S]
    keep_sorted_S = position_S < capacity
    kept_counts_E = counts_E.clamp(max=capacity)
    kept_starts_E = torch.cumsum(kept_counts_E, 0) - kept_counts_E
    dropped_rank_S = torch.cumsum(~keep_sorted_S, 0) - 1
    destination_S = torch.where(
        keep_sorted_S,
        kept_starts_E[expert_sorted_S] + position_S,
        kept_counts_E.sum() + dropped_rank_S,
    )
    final_order_S = torch.empty_like(order_S).scatter_(0, destination_S, order_S)
    kept_S = torch.empty_like(keep_sorted_S).scatter_(0, order_S, keep_sorted_S)
    return SortedSlots(final_order_S, kept_counts_E, kept_S)


def combine_rows(y_R: Tensor, token_R: Tensor, rows_KT: Tensor | None, num_out: int) -> Tensor:
    """``out[t] = sum of the rows of y_R that belong to token t``.

    With ``rows_KT`` (token t's rows are ``rows_KT[:, t]``, K of them, e.g. k-major token choice)
    this is K gathers (``index_select``, parallel and deterministic); otherwise one ``index_add_``
    over ``token_R`` (any number of rows per token, e.g. expert choice).
    """
    if rows_KT is None:
        return y_R.new_zeros((num_out, *y_R.shape[1:])).index_add_(0, token_R, y_R[: token_R.shape[0]])
    out = y_R.index_select(0, rows_KT[0])
    for k in range(1, rows_KT.shape[0]):
        out.add_(y_R.index_select(0, rows_KT[k]))
    return out


def dispatch_combine(
    x_T: Tensor,
    token_S: Tensor,
    expert_S: Tensor,
    weight_S: Tensor,
    experts,
    capacity: int | None = None,
    top_k: int | None = None,
) -> DispatchResult:
    """Route the rows of ``x_T`` (``(T, *features)``) through ``experts`` and combine.

    ``output[t] = sum over kept slots s of token t: weight_S[s] * experts[expert_S[s]](x_T[t])``.
    ``top_k``: the slots are token choice, k-major (slot ``k * T + t`` is token t's k-th choice),
    which lets the combine gather instead of scatter.
    """
    T, S = x_T.shape[0], token_S.shape[0]
    if top_k is not None and S != top_k * T:
        raise ValueError(f"top_k={top_k} needs top_k * T = {top_k * T} k-major slots, got {S}")
    slots = sort_slots(expert_S, experts.num_experts, capacity)
    token_sorted_S = token_S[slots.order_S]
    weight_sorted_S = weight_S[slots.order_S]
    slot_KT = None
    if top_k is not None:  # sorted position of every (k, t) slot
        rank_S = torch.empty_like(slots.order_S)
        rank_S[slots.order_S] = torch.arange(S, device=token_S.device)
        slot_KT = rank_S.view(top_k, T)
    if hasattr(experts, "forward_sorted"):  # fused gather -> experts -> weighted combine
        output = experts.forward_sorted(x_T, token_sorted_S, weight_sorted_S, slots.counts_E, slot_KT)
        return DispatchResult(output, slots.kept_S, slots.counts_E)
    y_S = experts(x_T.index_select(0, token_sorted_S), slots.counts_E)
    weighted_S = y_S * weight_sorted_S.to(y_S.dtype).view(-1, *([1] * (y_S.dim() - 1)))
    output = combine_rows(weighted_S, token_sorted_S, slot_KT, T)
    return DispatchResult(output, slots.kept_S, slots.counts_E)


def dispatch_routing(
    x_T: Tensor, routing: Routing, experts, capacity: int | None = None
) -> DispatchResult:
    """`dispatch_combine` on the slots of a `Routing` (token choice or expert choice)."""
    token_S, expert_S, weight_S = routing.assignments()
    top_k = None if routing.is_expert_choice else routing.top_k
    return dispatch_combine(x_T, token_S, expert_S, weight_S, experts, capacity, top_k)
