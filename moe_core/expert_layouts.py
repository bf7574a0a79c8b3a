"""Row layouts the fused expert FFN runs on: padded ``bmm``, tiered padding, grouped GEMM.

`moe_core.kernels.expert_ffn_combine` gathers the expert-sorted slots into rows, runs every
expert's FFN on its rows and combines them back; a layout says where each slot's row lives and how
the per-expert GEMMs (forward, and the weight/bias gradients of the hand-written backward) run:

- `_Padded`: every expert's rows padded to the largest count, ``(E, C, .)``, one ``bmm``
  (the capacity-padded expert batch of GShard, Lepikhin et al. 2020).
- `_Bucketed`: experts padded in a few tiers of rows (`tier_plan`, an exact dynamic program over
  the sorted counts), one ``bmm`` per tier -- less padding when routing is uneven.
- `_Grouped`: ``torch._grouped_mm`` over the sorted rows themselves, no padding and no host sync:
  the grouped (block-sparse) GEMM of dropless MoE, MegaBlocks (Gale et al. 2022).

Every layout exposes ``token_R``, ``weight_R``, ``row_S`` (slot -> row), ``valid_R1`` and the
same GEMM methods (``mm``, ``mm_flat``, ``wgrad``, ``bgrad``, ...). Which one runs is chosen by
`moe_core.kernels.choose_kernel`, by measurement (docs/BENCHMARKS.md). Imports only torch and the
stdlib.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def gather_with_spare_row(src: Tensor, token_R: Tensor) -> Tensor:
    """``src[token_R]`` followed by one zero row (the target of padding / dropped rows)."""
    buf = src.new_empty(token_R.shape[0] + 1, src.shape[-1])
    buf[-1].zero_()
    torch.index_select(src, 0, token_R, out=buf[:-1])
    return buf


def _place_slots(
    row_S: Tensor, token_S: Tensor, weight_S: Tensor, spare: int, num_tokens: int
) -> tuple[Tensor, Tensor]:
    """``(token_R, weight_R)`` of a padded layout with ``spare`` rows: slot s lands on row
    ``row_S[s]`` (the spare row ``spare`` for dropped slots); padding rows read distinct tokens
    with weight 0."""
    filler_R = torch.arange(spare + 1, device=token_S.device) % max(num_tokens, 1)
    token_R = filler_R.index_copy_(0, row_S, token_S)[:spare]
    weight_R = weight_S.new_zeros(spare + 1).index_copy_(0, row_S, weight_S)[:spare]
    return token_R, weight_R


class _Padded:
    """``bmm`` layout: expert e's rows padded to C = max count, ``(E, C, .)``, plus one spare row
    that stays zero (dropped slots point there). Padding rows read distinct tokens, weight 0."""

    def __init__(self, counts_E: Tensor, token_S: Tensor, weight_S: Tensor, capacity: int, num_tokens: int) -> None:
        E, S = counts_E.shape[0], token_S.shape[0]
        ends_E = torch.cumsum(counts_E, 0)
        rows_S = torch.arange(S, device=token_S.device)
        expert_S = torch.bucketize(rows_S, ends_E, right=True)  # E for dropped slots
        starts_E = torch.cat([ends_E.new_zeros(1), ends_E])
        spare = E * capacity
        self.row_S = torch.where(expert_S < E, expert_S * capacity + rows_S - starts_E[expert_S], spare)
        self.token_R, self.weight_R = _place_slots(self.row_S, token_S, weight_S, spare, num_tokens)
        self.shape = (E, capacity)
        self.valid_R1 = None

    def rows(self, flat: Tensor) -> Tensor:
        return flat.view(*self.shape, flat.shape[-1])

    def flat(self, rows: Tensor) -> Tensor:
        return rows.reshape(-1, rows.shape[-1])

    def mm(self, a: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
        return torch.bmm(a, w) if b is None else torch.baddbmm(b.unsqueeze(1), a, w)

    def gather_flat(self, src: Tensor) -> Tensor:
        """``src[token_R]`` in ``(E * C + 1, .)`` rows whose last (spare) row is zero."""
        return gather_with_spare_row(src, self.token_R)

    def mm_flat(self, a: Tensor, w: Tensor, buf: Tensor | None = None) -> Tensor:
        """``mm`` written into ``(E * C + 1, .)`` rows (``buf``, reused if given) whose last (spare)
        row is zero."""
        if buf is None:
            buf = a.new_empty(self.shape[0] * self.shape[1] + 1, w.shape[-1])
        buf[-1].zero_()
        torch.bmm(a, w, out=buf[:-1].view(*self.shape, w.shape[-1]))
        return buf

    def wgrad(self, a: Tensor, g: Tensor) -> Tensor:
        return torch.bmm(a.transpose(1, 2), g)

    def bgrad(self, g: Tensor) -> Tensor:
        return g.sum(1)

    def expert_rows(self, b: Tensor) -> Tensor:
        return b.unsqueeze(1)


TIER_LEVEL_ROWS = 16
"""`tier_plan`: cost of one expert in one tier (its weights read again, one more GEMM), in rows."""
TIER_COPY_ROWS = 32
"""`tier_plan`: cost of copying one expert's weights (and adding its gradient back), in rows."""
TIER_FIXED_ROWS = 512
"""`tier_plan`: fixed cost of a tier above the first (about ten more kernel launches), in rows."""
MAX_TIERS = 4


def tier_plan(counts: list[int]) -> list[tuple[list[int], int, int]]:
    """Tiers ``(experts, lo, hi)`` of the ``bucketed`` layout, bottom tier first.

    Tier 1 holds every expert (in order, so its weights need no copy) and rows ``[0, hi_1)`` of
    each; tier l holds only the experts with more than ``hi_{l-1}`` rows and their rows
    ``[hi_{l-1}, hi_l)``; the top tier ends at the largest count. Every expert is thus padded to
    the first tier end at or above its count, as if the experts sorted by count were split into
    buckets each padded to its own largest count. The tier ends minimise (exact dynamic program
    over the sorted counts, at most `MAX_TIERS` tiers) the padded rows plus `TIER_LEVEL_ROWS` per
    expert per tier plus, per tier above the first, `TIER_FIXED_ROWS` and `TIER_COPY_ROWS` per
    expert whose weights it copies. One tier is the ``padded`` layout.
    """
    E = len(counts)
    order = sorted(range(E), key=lambda e: -counts[e])
    c = [counts[e] for e in order]
    c_I = torch.tensor(c, dtype=torch.float64)
    i_I1 = torch.arange(E, dtype=torch.float64).unsqueeze(1)
    j_1J = torch.arange(E + 1, dtype=torch.float64).unsqueeze(0)
    # bucket [i, j) of the sorted experts: (j - i) * c[i] padded rows, plus the per-expert costs
    # of the tier it ends (which holds the busiest j experts); a bucket starts where a count drops
    tier_J = TIER_LEVEL_ROWS * j_1J + (TIER_COPY_ROWS * j_1J + TIER_FIXED_ROWS) * (j_1J < E)
    start_ok_I1 = torch.ones(E, 1, dtype=torch.bool)
    start_ok_I1[1:, 0] = c_I[1:] < c_I[:-1]
    cost_IJ = (j_1J - i_I1) * c_I.unsqueeze(1) + tier_J
    cost_IJ.masked_fill_(~start_ok_I1 | (j_1J <= i_I1), math.inf)
    best_J = torch.full((E + 1,), math.inf, dtype=torch.float64)
    best_J[0] = 0.0
    backs, totals = [], []
    for _ in range(MAX_TIERS):  # best_J[j]: the busiest j experts in (one more) bucket(s)
        best_J, back_J = (best_J[:E].unsqueeze(1) + cost_IJ).min(0)
        backs.append(back_J.tolist())
        totals.append(float(best_J[E]))
    m = min(range(MAX_TIERS), key=lambda m: totals[m])
    bounds, j = [E], E
    for k in range(m, -1, -1):
        j = backs[k][j]
        bounds.append(j)
    bounds.reverse()  # 0 = b_0 < b_1 < ... < b_m = E; bucket k is sorted experts [b_k, b_k+1)
    tiers, lo = [], 0
    for k in range(len(bounds) - 2, -1, -1):
        hi = c[bounds[k]]
        experts = list(range(E)) if k == len(bounds) - 2 else sorted(order[: bounds[k + 1]])
        tiers.append((experts, lo, hi))
        lo = hi
    return tiers


class _Bucketed:
    """``bmm`` per tier (`tier_plan`): tier l is ``(E_l, hi_l - lo_l, .)`` rows, the tiers one
    after another in flat rows, plus one spare row that stays zero (dropped slots point there).
    Tier 1 uses the weights as they are, the others a copy of their experts' weights (made once,
    reused in backward); their weight gradients are added back. Padding rows read distinct tokens,
    weight 0."""

    def __init__(self, counts_E: Tensor, token_S: Tensor, weight_S: Tensor,
                 tiers: list[tuple[list[int], int, int]], num_tokens: int) -> None:
        E, S, device = counts_E.shape[0], token_S.shape[0], token_S.device
        ends_E = torch.cumsum(counts_E, 0)
        rows_S = torch.arange(S, device=device)
        expert_S = torch.bucketize(rows_S, ends_E, right=True)  # E for dropped slots
        rank_S = rows_S - torch.cat([ends_E.new_zeros(1), ends_E])[expert_S]
        self.tiers: list[tuple[Tensor | None, int, int, int]] = []  # (experts, offset, n, width)
        expert_parts, offset = [], 0
        row_S = torch.full_like(rows_S, -1)
        for k, (experts, lo, hi) in enumerate(tiers):
            width, n = hi - lo, len(experts)
            if k > 0 and width == 0:
                continue
            idx = torch.tensor(experts, dtype=torch.long, device=device)
            position_E = torch.full((E + 1,), -1, dtype=torch.long, device=device)
            position_E[idx] = torch.arange(n, device=device)
            here_S = (rank_S >= lo) & (rank_S < hi) & (expert_S < E)
            row_S = torch.where(here_S, offset + position_E[expert_S] * width + rank_S - lo, row_S)
            self.tiers.append((None if k == 0 else idx, offset, n, width))
            expert_parts.append(idx.repeat_interleave(width))
            offset += n * width
        spare = offset
        self.row_S = torch.where(row_S < 0, spare, row_S)
        self.expert_R = torch.cat(expert_parts)
        self.num_experts = E
        self._copies: dict[tuple, Tensor] = {}
        self.token_R, self.weight_R = _place_slots(self.row_S, token_S, weight_S, spare, num_tokens)
        self.valid_R1 = None

    def _views(self, flat: Tensor) -> list[Tensor]:
        """Per tier: its rows ``(n, width, .)`` of ``flat``."""
        return [flat[offset : offset + n * width].view(n, width, flat.shape[-1])
                for _, offset, n, width in self.tiers]

    def _weights(self, w: Tensor, b: Tensor | None = None):
        """Per tier: its experts' weights ``(n, ., .)`` and bias rows ``(n, 1, .)`` (or None)."""
        transposed = not w.is_contiguous() and w.transpose(1, 2).is_contiguous()
        stored = w.transpose(1, 2) if transposed else w
        for k, (idx, _, _, _) in enumerate(self.tiers):
            if idx is None:
                yield w, None if b is None else b.unsqueeze(1)
                continue
            # backward reuses the forward's copies (same storage, unchanged version)
            key = (k, stored.data_ptr(), stored._version, stored.shape)
            if key not in self._copies:
                self._copies[key] = stored[idx]  # measured faster than index_select on CPU
            w_l = self._copies[key].transpose(1, 2) if transposed else self._copies[key]
            yield w_l, None if b is None else b.index_select(0, idx).unsqueeze(1)

    def rows(self, flat: Tensor) -> Tensor:
        return flat.contiguous()

    def flat(self, rows: Tensor) -> Tensor:
        return rows

    def mm(self, a: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
        out = a.new_empty(a.shape[0], w.shape[-1])
        pieces = zip(self._views(a), self._weights(w, b), self._views(out), strict=True)
        for a_l, (w_l, b_l), o_l in pieces:
            if b_l is None:
                torch.bmm(a_l, w_l, out=o_l)
            else:
                torch.baddbmm(b_l, a_l, w_l, out=o_l)
        return out

    def gather_flat(self, src: Tensor) -> Tensor:
        """``src[token_R]`` in ``(R + 1, .)`` rows whose last (spare) row is zero."""
        return gather_with_spare_row(src, self.token_R)

    def mm_flat(self, a: Tensor, w: Tensor, buf: Tensor | None = None) -> Tensor:
        """``mm`` written into ``(R + 1, .)`` rows (``buf``, reused if given) whose last (spare)
        row is zero."""
        if buf is None:
            buf = a.new_empty(a.shape[0] + 1, w.shape[-1])
        buf[-1].zero_()
        pieces = zip(self._views(a), self._weights(w), self._views(buf[:-1]), strict=True)
        for a_l, (w_l, _), o_l in pieces:
            torch.bmm(a_l, w_l, out=o_l)
        return buf

    def wgrad(self, a: Tensor, g: Tensor) -> Tensor:
        grad = a.new_empty(0)
        tiers = zip(self.tiers, self._views(a), self._views(g), strict=True)
        for (idx, _, _, _), a_l, g_l in tiers:
            if idx is None:
                grad = torch.bmm(a_l.transpose(1, 2), g_l)
            else:
                grad.index_put_((idx,), torch.bmm(a_l.transpose(1, 2), g_l), accumulate=True)
        return grad

    def bgrad(self, g: Tensor) -> Tensor:
        return g.new_zeros(self.num_experts, g.shape[-1]).index_add_(0, self.expert_R, g)

    def expert_rows(self, b: Tensor) -> Tensor:
        return b.index_select(0, self.expert_R)


class _Grouped:
    """``torch._grouped_mm`` layout: the sorted slots themselves (no host sync); rows after
    ``counts_E.sum()`` (dropped) are not computed and are zeroed."""

    def __init__(self, counts_E: Tensor, token_S: Tensor, weight_S: Tensor) -> None:
        ends_E = torch.cumsum(counts_E, 0)
        self.offs = ends_E.to(torch.int32)
        self.row_S = torch.arange(token_S.shape[0], device=token_S.device)
        self.valid_R1 = (self.row_S < ends_E[-1]).unsqueeze(1)
        self.expert_R = torch.bucketize(self.row_S, ends_E, right=True).clamp(max=counts_E.shape[0] - 1)
        self.token_R = token_S
        self.weight_R = weight_S.masked_fill(~self.valid_R1.squeeze(1), 0)

    def rows(self, flat: Tensor) -> Tensor:
        return flat.contiguous()

    def flat(self, rows: Tensor) -> Tensor:
        return rows

    def mm(self, a: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
        out = torch._grouped_mm(a, w, offs=self.offs)
        return out if b is None else out.add_(self.expert_rows(b))

    def gather_flat(self, src: Tensor) -> Tensor:
        return src.index_select(0, self.token_R)

    def mm_flat(self, a: Tensor, w: Tensor, buf: Tensor | None = None) -> Tensor:
        return torch._grouped_mm(a, w, offs=self.offs).masked_fill_(~self.valid_R1, 0)

    def wgrad(self, a: Tensor, g: Tensor) -> Tensor:
        return torch._grouped_mm(a.t(), g, offs=self.offs)

    def bgrad(self, g: Tensor) -> Tensor:
        g = g.masked_fill(~self.valid_R1, 0)
        return g.new_zeros(self.offs.shape[0], g.shape[1]).index_add_(0, self.expert_R, g)

    def expert_rows(self, b: Tensor) -> Tensor:
        return b.index_select(0, self.expert_R)
