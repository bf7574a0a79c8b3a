"""Expert parallelism on torch.distributed: the experts of one MoE layer split over a process group.

The GShard layout (Lepikhin et al. 2020), as in Switch Transformer (Fedus et al. 2021) and
DeepSpeed-MoE (Rajbhandari et al. 2022): the router and the shared experts are replicated, the E
experts of an `ExpertBank` are split into equal contiguous blocks over the G ranks of a group (rank
g holds the global experts ``g * E/G ... (g+1) * E/G - 1``), and every token slot travels to the
rank of its expert and back with two all-to-alls. One forward:

1. route the rank's own tokens; all-gather every rank's per-expert slot counts and token count
   (one small collective, so uneven batches, empty ones included, never hang: every rank knows
   exactly how many rows it sends and receives before it sends any);
2. all-to-all the token rows to their experts' ranks (autograd: the backward is the reverse
   all-to-all), run the local experts on the rows grouped by expert, all-to-all the outputs back;
3. weight by the combine weights and sum per token on the token's own rank (router gradients stay
   local).

Capacity is computed from the group's token count, ``C = max(min_capacity, ceil(capacity_factor
* T_group * K / E))`` with ``T_group`` the real tokens of all ranks, and applied on each expert's
rank with the one-process priority (a token's first choice beats any second choice; within a
choice, tokens in rank order, then in order within a rank), so the group computes exactly what one
process computes on the ranks' batches concatenated in rank order.

The aux losses are the group's: ``load_balance``, ``z_loss`` and ``importance`` of the one-process
layer over the concatenated batch, from one all-reduce of the per-expert probability sums, the
z-loss sum and the per-expert gate sums (differentiable) plus the all-gathered assignment counts.
Autograd through every collective here is the exact gradient of the SUM of the ranks' losses; a
term every rank adds (the aux losses are the same value on every rank) therefore counts G times:
with DDP-style averaged gradients (`moe_core.expert_parallel_state.average_gradients`) add the aux
losses as they are; for per-rank shares of one global sum, add ``aux / G``. ``stats`` are the
group's too (one plain all-reduce).

Expert choice (Zhou et al. 2022) is per rank: each expert takes its top ``ceil(cf * T_rank / E)``
tokens of every rank's batch (so G times that many in all), which equals the one-process layer on
each rank's batch alone; a top-C over the whole group would need every rank's scores.

Only `ExpertBank` (FFN experts) is split; conv and module experts stay single-process. gloo (CPU)
is tested; NCCL runs the same calls on CUDA tensors and is untested (no multi-GPU machine yet).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moe_core.diagnostics import RoutingStats
from moe_core.dispatch import combine_rows, expert_capacity, sort_slots
from moe_core.experts import ExpertBank
from moe_core.layer import MoE, MoEOutput
from moe_core.losses import dense_gates, importance_loss
from moe_core.routing import Routing


def local_expert_range(num_experts: int, group_size: int, group_rank: int) -> range:
    """The global indices of the experts rank ``group_rank`` of a ``group_size`` group holds."""
    if group_size < 1 or not 0 <= group_rank < group_size:
        raise ValueError(f"group_rank must be in [0, {group_size}), got {group_rank}")
    if num_experts % group_size:
        divisors = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
        raise ValueError(
            f"expert parallelism: num_experts={num_experts} is not divisible by the process "
            f"group size {group_size}; run on a group whose size divides it ({divisors}) or "
            f"change num_experts"
        )
    per_rank = num_experts // group_size
    return range(group_rank * per_rank, (group_rank + 1) * per_rank)


def _require_process_group(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "expert parallelism needs an initialised torch.distributed process group: call "
            "torch.distributed.init_process_group('gloo' on CPU, 'nccl' on GPUs) first, e.g. "
            "under torchrun"
        )
    return dist.get_world_size(group), dist.get_rank(group)


class _AllToAll(torch.autograd.Function):
    """``dist.all_to_all_single`` with per-rank row counts; the backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, send_sizes, recv_sizes, group, timer):  # type: ignore[override]
        ctx.send_sizes, ctx.recv_sizes, ctx.group, ctx.timer = send_sizes, recv_sizes, group, timer
        return _all_to_all(x, send_sizes, recv_sizes, group, timer)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _all_to_all(grad, ctx.recv_sizes, ctx.send_sizes, ctx.group, ctx.timer), None, None, None, None


def _all_to_all(x: Tensor, send_sizes: list[int], recv_sizes: list[int], group, timer) -> Tensor:
    out = x.new_empty((sum(recv_sizes), *x.shape[1:]))
    with timer or contextlib.nullcontext():
        dist.all_to_all_single(out, x.contiguous(), recv_sizes, send_sizes, group=group)
    return out


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group; the backward sums the gradients over the group (exact for the sum of
    the ranks' losses)."""

    @staticmethod
    def forward(ctx, x, group, timer):  # type: ignore[override]
        ctx.group, ctx.timer = group, timer
        x = x.clone()
        with timer or contextlib.nullcontext():
            dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        grad = grad.clone()
        with ctx.timer or contextlib.nullcontext():
            dist.all_reduce(grad, group=ctx.group)
        return grad, None, None


def shard_expert_bank(bank: ExpertBank, experts: range) -> ExpertBank:
    """A new `ExpertBank` holding a copy of the weights of ``bank``'s experts ``experts``."""
    if not isinstance(bank, ExpertBank):
        raise ValueError(
            f"expert parallelism splits ExpertBank (FFN) experts only, got {type(bank).__name__}; "
            f"conv and module experts run in one process (moe_core.MoE)"
        )
    part = ExpertBank(
        len(experts), bank.d_model, bank.d_hidden, bank.activation, bank.b_in is not None, bank.method
    )
    with torch.no_grad():
        for name, param in part.named_parameters():
            param.copy_(getattr(bank, name)[experts.start : experts.stop])
    return part.to(device=bank.w_in.device, dtype=bank.w_in.dtype)


class ExpertParallelMoE(nn.Module):
    """`moe_core.MoE` with its experts split over the ranks of ``group`` (module docstring).

    Args:
        router: replicated router over all ``num_experts`` experts (same weights on every rank).
        experts: this rank's `ExpertBank`, ``num_experts / G`` experts: the global experts
            `local_expert_range` gives (`shard_expert_bank` cuts it from a full bank).
        num_experts: E, the experts of the whole layer.
        group: the process group the experts are split over (default: the whole world).
        shared_experts, capacity_factor, min_capacity, track_stats: as in `moe_core.MoE`; the
            capacity counts the tokens of the whole group.
        causal: the layer sits in a causal stack (as `moe_core.MoE`): a capacity and expert-choice
            routing are refused.
        replica_group: the ranks that hold the same experts (one from each expert-parallel group,
            when several groups run side by side); `average_gradients` averages expert gradients
            over it. None: no other rank holds these experts.

    ``comm_timer``: None, or a context manager entered around every collective of the layer (the
    all-to-alls forward and backward, the count exchange, the loss and stats all-reduces), for a
    benchmark's share of time in communication.
    """

    def __init__(
        self,
        router: nn.Module,
        experts: ExpertBank,
        *,
        num_experts: int,
        group: dist.ProcessGroup | None = None,
        shared_experts: nn.Module | None = None,
        capacity_factor: float | None = None,
        min_capacity: int = 1,
        track_stats: bool = True,
        replica_group: dist.ProcessGroup | None = None,
        causal: bool = False,
    ) -> None:
        super().__init__()
        if causal and capacity_factor is not None:
            raise ValueError(
                f"ExpertParallelMoE(causal=True) needs capacity_factor=None (dropless), got "
                f"{capacity_factor!r}: with a capacity, whether a token is dropped depends on the "
                f"other tokens of the group's batch, later positions included"
            )
        size, rank = _require_process_group(group)
        owned = local_expert_range(num_experts, size, rank)
        if not isinstance(experts, ExpertBank):
            raise ValueError(
                f"expert parallelism splits ExpertBank (FFN) experts only, got "
                f"{type(experts).__name__}; conv and module experts run in one process (moe_core.MoE)"
            )
        if experts.num_experts != len(owned):
            raise ValueError(
                f"experts must hold this rank's {len(owned)} of num_experts={num_experts} experts "
                f"(group size {size}), got an ExpertBank of {experts.num_experts}; cut it with "
                f"shard_expert_bank(full_bank, local_expert_range(...))"
            )
        if getattr(router, "num_experts", num_experts) != num_experts:
            raise ValueError(f"router.num_experts={router.num_experts} must equal num_experts={num_experts}")
        if capacity_factor is not None and not (
            isinstance(capacity_factor, (int, float)) and 0 < capacity_factor < float("inf")
        ):
            raise ValueError(f"capacity_factor must be a finite number > 0, or None for dropless, got {capacity_factor!r}")
        if isinstance(min_capacity, bool) or not isinstance(min_capacity, int) or min_capacity < 1:
            raise ValueError(f"min_capacity must be an int >= 1, got {min_capacity!r}")
        self.router, self.experts, self.shared_experts = router, experts, shared_experts
        self.capacity_factor, self.min_capacity, self.track_stats = capacity_factor, min_capacity, track_stats
        self.num_experts, self.num_local_experts = num_experts, len(owned)
        self.group, self.group_size, self.group_rank = group, size, rank
        self.expert_range, self.replica_group, self.causal = owned, replica_group, causal
        self.comm_timer = None
        self.last_aux_losses: dict[str, Tensor] | None = None
        self.last_stats: RoutingStats | None = None

    @classmethod
    def from_moe(cls, layer: MoE, group=None, replica_group=None) -> ExpertParallelMoE:
        """This rank's part of a one-process `MoE` (same weights on every rank, e.g. same seed):
        the router and shared experts are shared with ``layer``, the experts are copied."""
        if not isinstance(layer, MoE):
            raise ValueError(f"from_moe takes a moe_core.MoE, got {type(layer).__name__}")
        size, rank = _require_process_group(group)
        owned = local_expert_range(layer.num_experts, size, rank)
        return cls(
            layer.router, shard_expert_bank(layer.experts, owned), num_experts=layer.num_experts,
            group=group, shared_experts=layer.shared_experts, capacity_factor=layer.capacity_factor,
            min_capacity=layer.min_capacity, track_stats=layer.track_stats, replica_group=replica_group,
            causal=getattr(layer, "causal", False),
        )

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, experts {self.expert_range.start}..{self.expert_range.stop - 1} "
            f"of group size {self.group_size}, capacity_factor={self.capacity_factor}"
        )

    def forward(
        self,
        x: Tensor,
        *,
        router_input: Tensor | None = None,
        token_ids: Tensor | None = None,
        token_mask: Tensor | None = None,
    ) -> MoEOutput:
        """Route this rank's ``x`` ``(..., D)`` (same options as `moe_core.MoE.forward`). Every rank
        of the group must call it (an empty batch included), and backward through its output."""
        D = self.experts.d_model
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1 or x.shape[-1] != D:
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"ExpertParallelMoE: x must be a float tensor (..., D={D}), got {got}")
        lead = tuple(x.shape[:-1])
        x_TD = x.reshape(-1, D)
        r_T = x_TD if router_input is None else router_input.reshape(x_TD.shape[0], -1)
        ids_T = None if token_ids is None else token_ids.reshape(-1)
        real_T = None
        if token_mask is not None:
            if token_mask.dtype != torch.bool or tuple(token_mask.shape) != lead:
                raise ValueError(f"ExpertParallelMoE: token_mask must be a bool tensor of shape {lead}")
            real_T = token_mask.reshape(-1).nonzero().squeeze(1)
            r_T = r_T.index_select(0, real_T)
            ids_T = None if ids_T is None else ids_T.index_select(0, real_T)
        xr_TD = x_TD if real_T is None else x_TD.index_select(0, real_T)

        routing = self.router(r_T, token_ids_T=ids_T)
        if not isinstance(routing, Routing) or routing.num_experts != self.num_experts:
            raise ValueError(
                f"ExpertParallelMoE: the router must return a Routing over {self.num_experts} experts"
            )
        if self.causal and routing.is_expert_choice:
            raise ValueError(
                "ExpertParallelMoE(causal=True): expert-choice routing mixes the tokens of a batch; "
                "use a token-choice router"
            )
        routed, kept_S, table = self._dispatch(xr_TD, routing)
        if real_T is not None:
            routed = routed.new_zeros((x_TD.shape[0], D)).index_copy_(0, real_T, routed)
        if self.shared_experts is not None:
            routed = routed + self.shared_experts(x_TD)
        aux = self._aux_losses(routing, table)
        stats = self._stats(routing, kept_S) if self.track_stats else None
        self.last_aux_losses, self.last_stats = aux, stats
        return MoEOutput(routed.reshape(*lead, D), aux, stats, routing)

    def _dispatch(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, Tensor | None, Tensor]:
        """Send slots to their experts' ranks, compute, send back, combine. Returns the routed
        output ``(T, D)``, the kept flags per slot (None: dropless) and the ``(G, E + 1)`` table of
        every rank's slot counts per expert and token count."""
        E, L, G, group = self.num_experts, self.num_local_experts, self.group_size, self.group
        T, device = x_TD.shape[0], x_TD.device
        token_S, expert_S, weight_S = routing.assignments()
        S = token_S.shape[0]
        counts_E = torch.zeros(E + 1, dtype=torch.int64, device=device)
        counts_E[:E].scatter_add_(0, expert_S, torch.ones_like(expert_S))
        counts_E[E] = T
        table_parts = [torch.empty_like(counts_E) for _ in range(G)]
        with self.comm_timer or contextlib.nullcontext():
            dist.all_gather(table_parts, counts_E, group=group)
        table = torch.stack(table_parts).cpu()  # the one host copy: every split size below
        T_group, offset = int(table[:, E].sum()), int(table[: self.group_rank, E].sum())
        top_k = None if routing.is_expert_choice else routing.top_k
        capacity = expert_capacity(T_group, routing.top_k, E, self.capacity_factor, self.min_capacity)
        send_sizes = table[self.group_rank, :E].view(G, L).sum(1).tolist()
        recv_WL = table[:, self.expert_range.start : self.expert_range.stop]
        recv_sizes = recv_WL.sum(1).tolist()

        order_S = torch.argsort(expert_S, stable=True)
        token_sorted_S = token_S[order_S]
        x_recv = _AllToAll.apply(x_TD.index_select(0, token_sorted_S), send_sizes, recv_sizes, group, self.comm_timer)
        local_R = torch.arange(L, device=device).repeat(G).repeat_interleave(recv_WL.reshape(-1).to(device))
        if capacity is None:
            slots = sort_slots(local_R, L)
            perm_R = slots.order_S
        else:  # the one-process priority: (choice, rank, token) for token choice
            slot_S = torch.arange(S, device=device)
            if top_k is not None:
                key_S = (slot_S // max(T, 1)) * T_group + offset + slot_S % max(T, 1)
            else:
                key_S = int(table[: self.group_rank, :E].sum()) + slot_S
            key_R = _all_to_all(key_S[order_S], send_sizes, recv_sizes, group, self.comm_timer)
            priority_R = torch.argsort(key_R)
            slots = sort_slots(local_R[priority_R], L, capacity)
            perm_R = priority_R[slots.order_S]
        y_sorted = self.experts(x_recv.index_select(0, perm_R), slots.counts_E.to(device))
        inverse_R = torch.empty_like(perm_R)
        inverse_R[perm_R] = torch.arange(perm_R.shape[0], device=device)
        y_back = _AllToAll.apply(y_sorted.index_select(0, inverse_R), recv_sizes, send_sizes, group, self.comm_timer)
        kept_S = None
        if capacity is not None:
            kept_R = torch.empty_like(slots.kept_S)
            kept_R[priority_R] = slots.kept_S
            kept_back = _all_to_all(kept_R.to(torch.uint8), recv_sizes, send_sizes, group, self.comm_timer)
            kept_S = torch.empty_like(kept_back).scatter_(0, order_S, kept_back).bool()
        weighted = y_back * weight_S[order_S].to(y_back.dtype).unsqueeze(1)
        rows_KT = None
        if top_k is not None:  # token t's rows in the sorted order: K gathers, no scatter
            rank_S = torch.empty_like(order_S)
            rank_S[order_S] = torch.arange(S, device=device)
            rows_KT = rank_S.view(top_k, T)
        return combine_rows(weighted, token_sorted_S, rows_KT, T), kept_S, table

    def _aux_losses(self, routing: Routing, table: Tensor) -> dict[str, Tensor]:
        """The one-process losses over the group's tokens (`moe_core.losses` formulas)."""
        E = self.num_experts
        probs_TE = routing.probs_TE.float()
        parts = [probs_TE.sum(0), dense_gates(routing).sum(0)]
        if routing.logits_TE is not None:
            parts.append(torch.logsumexp(routing.logits_TE.float(), dim=-1).square().sum().reshape(1))
        sums = _AllReduceSum.apply(torch.cat(parts), self.group, self.comm_timer)
        n = max(int(table[:, E].sum()), 1)
        aux: dict[str, Tensor] = {}
        if not routing.is_expert_choice:  # Switch: E * sum_e f_e * P_e
            f_E = table[:, :E].sum(0).to(sums.device, torch.float32) / (n * routing.top_k)
            aux["load_balance"] = E * (f_E * sums[:E] / n).sum()
        if routing.logits_TE is not None:
            aux["z_loss"] = sums[2 * E] / n
        aux["importance"] = importance_loss(sums[E : 2 * E].unsqueeze(0))
        return aux

    @torch.no_grad()
    def _stats(self, routing: Routing, kept_S: Tensor | None) -> RoutingStats:
        """`moe_core.routing_stats` of the group's tokens: local sums, one all-reduce."""
        token_S, expert_S, _ = routing.assignments()
        T, E = routing.probs_TE.shape
        device = routing.probs_TE.device
        kept_S = torch.ones_like(expert_S, dtype=torch.bool) if kept_S is None else kept_S
        counts_E = torch.zeros(E, dtype=torch.float64, device=device).scatter_add_(0, expert_S, kept_S.double())
        if routing.is_expert_choice:  # tokens no expert took
            taken_T = torch.zeros(T, dtype=torch.int64, device=device).scatter_add_(0, token_S, kept_S.long())
            dropped, dropped_of = (taken_T == 0).sum(), T
        else:
            dropped, dropped_of = (~kept_S).sum(), token_S.shape[0]
        probs_TE = routing.probs_TE.detach().float()
        entropy = -torch.special.xlogy(probs_TE, probs_TE).sum()
        local = torch.cat([counts_E, torch.stack([dropped.double(), entropy.double()]),
                           torch.tensor([dropped_of, T], dtype=torch.float64, device=device)])
        with self.comm_timer or contextlib.nullcontext():
            dist.all_reduce(local, group=self.group)
        host = local.cpu()
        counts = host[:E].round().long()
        dropped_f, entropy_sum, dropped_of_f, n_real = host[E:].tolist()
        total = int(counts.sum())
        mean = counts.double().mean()
        return RoutingStats(
            tokens_per_expert_E=counts,
            fraction_per_expert_E=counts.float() / total if total else torch.zeros(E),
            dropped_fraction=dropped_f / dropped_of_f if dropped_of_f else 0.0,
            entropy=entropy_sum / n_real if n_real else 0.0,
            load_cv=float(counts.double().std(unbiased=False) / mean) if mean > 0 else 0.0,
            dead_experts=int((counts == 0).sum()),
        )


def to_expert_parallel(model: nn.Module, group=None, replica_group=None) -> nn.Module:
    """Replace, in place, every `moe_core.MoE` of ``model`` with an ExpertBank by its
    `ExpertParallelMoE` part on this rank; returns ``model`` (a bare `MoE` is returned converted).
    Build ``model`` with the same seed on every rank first."""
    if isinstance(model, MoE):
        return ExpertParallelMoE.from_moe(model, group, replica_group)
    for name, child in list(model.named_children()):
        if isinstance(child, MoE) and isinstance(child.experts, ExpertBank):
            setattr(model, name, ExpertParallelMoE.from_moe(child, group, replica_group))
        else:
            to_expert_parallel(child, group, replica_group)
    return model
