"""Sort-by-expert dispatch, capacity dropping and weighted combine: the fast path of every MoE layer.

The sorted ("dropless" without capacity) dispatch of MegaBlocks (Gale et al. 2022): flatten a
`Routing` to slots ``(token_S, expert_S, weight_S)``, stable-sort the slots by expert, count them
per expert, keep at most C per expert (capacity, GShard: Lepikhin et al. 2020), run every expert
once on its block of rows, scale by the combine weights and sum back per token. Memory is
O(S * D): no ``(T, E, C)`` or ``(T, K, E)`` one-hot anywhere, and no host sync in the sort.

For `ExpertBank` the gather, the expert FFN and the combine are one autograd node
(`expert_ffn_combine`) with a hand-written backward, computed by one of four kernels chosen by
measurement (docs/BENCHMARKS.md): one expert block at a time with every temporary the size of one
block (`moe_core.expert_loop`; the ``auto`` choice for fp32 on the CPU), or on one of the row
layouts of `moe_core.expert_layouts`: rows padded to the largest expert and ``bmm`` (``auto`` for
equal blocks, as expert choice gives), experts padded in a few tiers of rows with one ``bmm`` per
tier (less padding when routing is uneven), or ``torch._grouped_mm`` over the sorted rows (no
padding; no host sync off the CPU or under ``torch.compile``; the ``auto`` choice for 16-bit
floats and on CUDA wherever grouped GEMM is supported). On the
layouts, token-choice slots are k-major, so the combine is K row gathers (deterministic) rather
than an ``index_add_``.

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

from moe_core.activations import activation_backward, apply_activation
from moe_core.expert_layouts import _Bucketed, _Grouped, _Padded, tier_plan
from moe_core.expert_loop import expert_loop_ffn_combine
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


METHODS = ("auto", "padded", "bucketed", "grouped", "loop")
PAD_LIMIT = 1.5
"""Where grouped GEMM is unsupported, ``auto`` pads experts (to one row count or in tiers) only
while padded rows <= PAD_LIMIT x real, else it loops over the experts."""


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


class _ExpertFFNCombine(torch.autograd.Function):
    """``out[t] = sum_s weight_S[s] * ffn_{e(s)}(x[token_S[s]])`` as one autograd node.

    Forward keeps the gathered input and the pre-activation only (the activation is recomputed in
    backward, as a fused MLP would). The combine-weight gradient ``<g_t, y_s>`` is taken as
    ``<g_t @ w_out^T, a_s> + <g_t, b_out>``, so expert outputs are never stored.
    """

    @staticmethod
    def forward(ctx, x_TD, weight_R, w_in, w_out, b_in, b_out, layout, activation, rows_KT):  # type: ignore[override]
        x_R = layout.rows(x_TD.index_select(0, layout.token_R))
        h = layout.mm(x_R, w_in, b_in)
        y_flat = layout.mm_flat(apply_activation(h, activation), w_out)
        R = weight_R.shape[0]
        if b_out is not None:
            y_flat[:R].add_(layout.flat(layout.expert_rows(b_out).expand(*h.shape[:-1], -1)))
            if layout.valid_R1 is not None:
                y_flat.masked_fill_(~layout.valid_R1, 0)
        y_flat[:R].mul_(weight_R.unsqueeze(1))
        out = combine_rows(y_flat, layout.token_R, rows_KT, x_TD.shape[0])
        ctx.save_for_backward(x_R, h, weight_R, w_in, w_out, b_out)
        ctx.layout, ctx.activation, ctx.rows_KT = layout, activation, rows_KT
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x_R, h, weight_R, w_in, w_out, b_out = ctx.saved_tensors
        layout, activation = ctx.layout, ctx.activation
        need_x, need_weight, need_w_in, need_w_out, need_b_in, need_b_out = ctx.needs_input_grad[:6]
        R = weight_R.shape[0]
        g_flat = layout.gather_flat(grad_out)  # dL/dy per row, before the combine weight
        g = layout.rows(g_flat[:R])
        grad_a = layout.mm(g, w_out.transpose(1, 2))
        a = apply_activation(h, activation)
        bias_dot = None
        if need_weight and b_out is not None:
            bias_dot = torch.linalg.vecdot(g, layout.expert_rows(b_out))
        g.mul_(layout.rows(weight_R.unsqueeze(1)))
        grad_w_out = layout.wgrad(a, g) if need_w_out else None
        grad_b_out = layout.bgrad(g) if need_b_out else None
        del g
        grad_weight = None
        if need_weight:
            grad_weight_R = a.mul_(grad_a).sum(-1)  # a is not needed any more
            if bias_dot is not None:
                grad_weight_R += bias_dot
            grad_weight = grad_weight_R.reshape(-1)
            if layout.valid_R1 is not None:
                grad_weight = grad_weight.masked_fill(~layout.valid_R1.squeeze(1), 0)
        grad_a.mul_(layout.rows(weight_R.unsqueeze(1)))
        grad_h = activation_backward(grad_a, h, activation, out=a if activation != "swiglu" else None)
        del a, grad_a
        grad_w_in = layout.wgrad(x_R, grad_h) if need_w_in else None
        grad_b_in = layout.bgrad(grad_h) if need_b_in else None
        grad_x = None
        if need_x:
            grad_x_flat = layout.mm_flat(grad_h, w_in.transpose(1, 2), buf=g_flat)
            grad_x = combine_rows(grad_x_flat, layout.token_R, ctx.rows_KT, grad_out.shape[0])
        return grad_x, grad_weight, grad_w_in, grad_w_out, grad_b_in, grad_b_out, None, None, None


def grouped_mm_supported(x: Tensor, *widths: int) -> bool:
    """Whether ``torch._grouped_mm`` takes rows of these widths on this device and dtype."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    aligned = all((w * x.element_size()) % 16 == 0 for w in widths)
    if x.device.type == "cpu":  # the fake-tensor (compile) rule of torch 2.14 wants 16-bit floats
        return aligned and (x.dtype != torch.float32 or not torch.compiler.is_compiling())
    if x.device.type == "cuda":
        capability = torch.cuda.get_device_capability(x.device)
        return aligned and x.dtype == torch.bfloat16 and capability >= (9, 0)
    return False


def expert_ffn_combine(
    x_TD: Tensor, token_S: Tensor, weight_S: Tensor, counts_E: Tensor,
    w_in: Tensor, w_out: Tensor, b_in: Tensor | None, b_out: Tensor | None,
    activation: str, method: str = "auto", slot_KT: Tensor | None = None,
) -> Tensor:
    """``out[t] = sum_s weight_S[s] * ffn_{e(s)}(x_TD[token_S[s]])``, ``(T, D)``.

    Slots are sorted by expert: the first ``counts_E[0]`` go to expert 0, and so on; slots after
    ``counts_E.sum()`` (dropped) are skipped. ``slot_KT`` (optional): token t's slots are exactly
    ``slot_KT[:, t]`` (positions in the sorted order) -- the combine is then K gathers instead of an
    ``index_add_``. ``ffn_e(x) = act(x @ w_in[e] + b_in[e]) @ w_out[e] + b_out[e]``.

    Methods: ``loop`` -- the fused per-expert kernel of `moe_core.expert_loop` (one host sync for
    the counts; every temporary the size of one expert's block); ``padded`` -- rows padded to the
    largest count and ``bmm`` (one host sync for that count); ``bucketed`` -- the experts padded in
    tiers (`tier_plan`), one ``bmm`` per tier, less padding when routing is uneven (one host sync);
    ``grouped`` -- ``torch._grouped_mm`` (no host sync off the CPU or under ``torch.compile``, so it
    traces without a graph break; eager CPU syncs once to check the counts; needs 16-byte aligned
    widths). ``auto``, chosen by measurement (docs/BENCHMARKS.md): fp32 on the CPU in eager mode
    runs ``loop`` (2 cores, k=2: 0.97-1.0 / 0.85-0.91 / 0.55-0.68x the dense-equivalent FFN at
    E = 8 / 32 / 128, against 0.92 / 0.84 / 0.69x for ``grouped`` in the same run), except that
    equal blocks (expert choice: no padding) run ``padded``, one ``bmm`` per matrix; elsewhere
    ``grouped`` where grouped GEMM is supported (CPU 16-bit floats, where it beat ``loop`` in bf16;
    CUDA bf16 on sm90+), else
    ``bucketed`` on CPU (``padded`` where `tier_plan` finds one tier best, and off CPU) while the
    padding stays within `PAD_LIMIT` x the real rows, else ``loop``.
    """
    S, E = token_S.shape[0], w_in.shape[0]
    if counts_E.shape != (E,):
        raise ValueError(f"counts_E must have shape (num_experts={E},), got {tuple(counts_E.shape)}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    # measured (docs/BENCHMARKS.md): fp32 on the CPU -> per-expert kernel; 16-bit -> grouped GEMM
    cpu_fp32 = x_TD.device.type == "cpu" and x_TD.element_size() >= 4
    if method == "auto" and cpu_fp32 and torch.compiler.is_compiling():  # one opaque call, eager
        return _expert_ffn_combine_eager(
            x_TD, token_S, weight_S, counts_E, w_in, w_out, b_in, b_out, activation, method, slot_KT
        )
    if method == "grouped" or (method == "auto" and not cpu_fp32):
        grouped_ok = grouped_mm_supported(
            x_TD, x_TD.shape[1], w_in.shape[2], w_out.shape[1], w_out.shape[2]
        )
        if method == "grouped" and not grouped_ok:
            raise ValueError(
                "method='grouped' needs torch._grouped_mm with 16-byte aligned rows on this device "
                f"(d_model/d_hidden multiples of {16 // x_TD.element_size()}); use 'padded' or 'loop'"
            )
        if grouped_ok:
            method = "grouped"
    counts, largest, total = [], 0, S
    no_sync = torch.compiler.is_compiling() or x_TD.device.type != "cpu"
    if method != "grouped" or not no_sync:  # one host sync: check the counts, size the padding
        counts = counts_E.tolist()
        total, largest = sum(counts), max(counts)
        if total > S:
            raise ValueError(f"counts_E sums to {total} but there are only {S} slots")
    if method == "auto" and cpu_fp32:  # equal blocks (expert choice): one bmm per matrix, no padding
        method = "padded" if largest * E == total else "loop"
    tiers = tier_plan(counts) if method == "bucketed" else []
    if method == "auto":  # tiers measured on CPU only (docs/BENCHMARKS.md); one tier = padded
        tiers = tier_plan(counts) if x_TD.device.type == "cpu" else [(list(range(E)), 0, largest)]
        padded_rows = sum(len(experts) * (hi - lo) for experts, lo, hi in tiers)
        # grouped GEMM is unsupported here (widths, dtype or device): pad within the limit, else loop
        if padded_rows <= PAD_LIMIT * max(total, 1):
            method = "padded" if len(tiers) == 1 else "bucketed"
        else:
            method = "loop"
    weight_S = weight_S.to(x_TD.dtype)
    if method == "loop":
        return expert_loop_ffn_combine(x_TD, token_S, weight_S, counts, w_in, w_out, b_in, b_out, activation)
    if method == "bucketed":
        layout = _Bucketed(counts_E, token_S, weight_S, tiers, x_TD.shape[0])
    elif method == "grouped":
        layout = _Grouped(counts_E, token_S, weight_S)
    else:
        layout = _Padded(counts_E, token_S, weight_S, largest, x_TD.shape[0])
    rows_KT = None if slot_KT is None else layout.row_S[slot_KT]
    return _ExpertFFNCombine.apply(
        x_TD, layout.weight_R, w_in, w_out, b_in, b_out, layout, activation, rows_KT
    )


@torch.compiler.disable
def _expert_ffn_combine_eager(*args) -> Tensor:
    """`expert_ffn_combine` outside the compiled graph: fp32 on the CPU has no traceable kernel
    (``torch._grouped_mm`` takes 16-bit floats only there), and the eager choice reads the counts
    on the host; one graph break here instead of a recompile for every new count."""
    return expert_ffn_combine(*args)


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
