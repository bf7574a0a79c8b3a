"""Sort-by-expert dispatch, capacity dropping and weighted combine: the fast path of every MoE layer.

The sorted ("dropless" when no capacity) dispatch of MegaBlocks (Gale et al. 2022): flatten a
`Routing` to assignment slots ``(token_S, expert_S, weight_S)``, stable-sort the slots by expert,
count them per expert (``bincount``), keep at most C per expert (capacity, GShard: Lepikhin et al.
2020), gather the kept tokens' rows, run every expert once on its contiguous block of rows
(``experts.forward(x_SD, counts_E)``), scale by the combine weights and add back into the token
outputs with one ``index_add_``. Memory is O(S * D); there is no ``(T, E, C)`` or ``(T, K, E)``
one-hot anywhere, and no host sync (so it traces under ``torch.compile``) except what the experts
module itself needs.

Priority when dropping: slots are taken in their `Routing.assignments()` order within each expert.
Token-choice slots are k-major, so every token's first choice beats any second choice, and within a
choice rank earlier tokens win (GShard's priority). Dropped slots stay at the end of the sorted
rows (shapes stay static), the experts module skips them and they contribute 0.
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
    counts_E = torch.bincount(expert_S, minlength=num_experts)
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


def dispatch_combine(
    x_T: Tensor,
    token_S: Tensor,
    expert_S: Tensor,
    weight_S: Tensor,
    experts,
    capacity: int | None = None,
) -> DispatchResult:
    """Route the rows of ``x_T`` (``(T, *features)``) through ``experts`` and combine.

    ``output[t] = sum over kept slots s of token t: weight_S[s] * experts[expert_S[s]](x_T[t])``.
    """
    slots = sort_slots(expert_S, experts.num_experts, capacity)
    token_sorted_S = token_S[slots.order_S]
    y_S = experts(x_T.index_select(0, token_sorted_S), slots.counts_E)
    weight_sorted_S = weight_S[slots.order_S].to(y_S.dtype)
    weighted_S = y_S * weight_sorted_S.view(-1, *([1] * (y_S.dim() - 1)))
    output = y_S.new_zeros((x_T.shape[0], *y_S.shape[1:])).index_add_(0, token_sorted_S, weighted_S)
    return DispatchResult(output, slots.kept_S, slots.counts_E)


def dispatch_routing(
    x_T: Tensor, routing: Routing, experts, capacity: int | None = None
) -> DispatchResult:
    """`dispatch_combine` on the slots of a `Routing` (token choice or expert choice)."""
    token_S, expert_S, weight_S = routing.assignments()
    return dispatch_combine(x_T, token_S, expert_S, weight_S, experts, capacity)
