"""The sparse MoE layer: router + experts (+ shared experts) + sorted dispatch; `MoEOutput`.

A token-choice layer is the sparsely-gated MoE of Shazeer et al. 2017 as used by GShard (Lepikhin et
al. 2020) and Switch Transformer (Fedus et al. 2021): capacity ``C = max(min_capacity,
ceil(capacity_factor * T * K / E))`` per expert, or dropless (MegaBlocks, Gale et al. 2022) when
``capacity_factor`` is None. An expert-choice router (Zhou et al. 2022) goes through the same
sorted dispatch. Shared experts that see every token are DeepSeekMoE's (Dai et al. 2024).

Causal stacks (``causal=True``, decoders): token-choice routing with dropless dispatch decides
each token on its own, so a position's output never depends on later positions. Expert-choice
routing (each expert picks among all tokens) and capacity dropping (whether a token's slot is kept
depends on the other tokens sent to that expert, and C on the number of tokens) mix information
across the tokens of a batch and leak later positions into earlier ones, so the layer refuses them
(Soft-MoE likewise, `moe_core.soft_moe`).

`MoETensor` wraps a layer for code that wants a plain tensor back (a Transformer block's FFN slot):
the layer is its child, so `collect_aux_losses` still finds its ``last_aux_losses``.

Every forward computes the auxiliary losses ``"load_balance"`` (Switch; token choice only),
``"z_loss"`` (ST-MoE, Zoph et al. 2022; when the router has logits) and ``"importance"`` (CV^2 of
the combine weights, Shazeer et al. 2017), keeps them in ``self.last_aux_losses`` (for
`moe_core.losses.collect_aux_losses`) and the `RoutingStats` in ``self.last_stats``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moe_core.checks import check_float, check_positive_int, describe_tensor
from moe_core.diagnostics import RoutingStats, routing_stats
from moe_core.dispatch import dispatch_routing, expert_capacity
from moe_core.losses import dense_gates, importance_loss, load_balancing_loss, router_z_loss
from moe_core.routing import Routing


@dataclass(frozen=True)
class MoEOutput:
    """What an MoE layer returns.

    Attributes:
        output: same leading shape as the input, routed (+ shared) expert output.
        aux_losses: ``{"load_balance", "z_loss", "importance"}`` scalars (those that apply).
        stats: routing statistics of this call (None when the layer was built with
            ``track_stats=False``).
        routing: the router's decision over the real tokens, in flattened order (with a
            ``token_mask``, only the rows where it is True).
    """

    output: Tensor
    aux_losses: dict[str, Tensor]
    stats: RoutingStats | None
    routing: Routing | None


class MoE(nn.Module):
    """``router`` picks experts for each token, ``experts`` compute them, outputs are combined.

    Args:
        router: a module ``router(x_TD, *, token_ids_T=None) -> Routing`` (see `moe_core.routers`).
        experts: an experts module (`ExpertBank`, `ModuleExperts`, `ConvExperts`).
        shared_experts: optional module ``(T, *features) -> (T, *out_features)`` applied to every
            token and added (DeepSeekMoE), e.g. ``FFN(d_model, n_shared * d_hidden)``.
        capacity_factor: None = dropless; else tokens per expert
            ``C = max(min_capacity, ceil(capacity_factor * T * K / E))``.
        min_capacity: lower bound of C.
        track_stats: compute `RoutingStats` each call (one small device -> host copy; turn it off
            for a graph-break-free ``torch.compile`` of the layer).
        causal: the layer sits in a causal stack (a decoder): a position's output must not depend
            on later positions. Expert-choice routers and a ``capacity_factor`` are then refused
            with a ValueError (both mix the tokens of a batch); token-choice dropless routing is
            causal.
    """

    def __init__(
        self,
        router: nn.Module,
        experts: nn.Module,
        shared_experts: nn.Module | None = None,
        capacity_factor: float | None = None,
        min_capacity: int = 1,
        track_stats: bool = True,
        causal: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(causal, bool):
            raise ValueError(f"causal must be True or False, got {causal!r}")
        if causal and getattr(router, "is_expert_choice", False):
            raise ValueError(
                f"MoE(causal=True) cannot use {type(router).__name__}: expert-choice routing picks "
                "each expert's tokens among the whole batch, so later positions change earlier "
                "outputs; use a token-choice router (TopKRouter, SwitchRouter, HashRouter, ...)"
            )
        if causal and capacity_factor is not None:
            raise ValueError(
                f"MoE(causal=True) needs capacity_factor=None (dropless), got {capacity_factor!r}: "
                "with a capacity, whether a token is dropped depends on the other tokens of the "
                "batch, later positions included"
            )
        if not isinstance(router, nn.Module):
            raise ValueError(f"router must be an nn.Module returning Routing, got {type(router).__name__}")
        if not isinstance(experts, nn.Module) or not all(
            hasattr(experts, attr) for attr in ("num_experts", "feature_dims")
        ):
            raise ValueError(
                f"experts must be an experts module with num_experts and feature_dims "
                f"(ExpertBank, ModuleExperts, ConvExperts), got {type(experts).__name__}"
            )
        router_e = getattr(router, "num_experts", None)
        if router_e is not None and router_e != experts.num_experts:
            raise ValueError(
                f"router.num_experts={router_e} must equal experts.num_experts={experts.num_experts}"
            )
        experts_d = getattr(experts, "d_model", None)
        router_d = getattr(router, "d_model", None)
        if experts.feature_dims == 1 and None not in (experts_d, router_d) and experts_d != router_d:
            raise ValueError(
                f"d_model mismatch: router.d_model={router_d} but experts.d_model={experts_d}"
            )
        if shared_experts is not None:
            if not isinstance(shared_experts, nn.Module):
                raise ValueError(
                    f"shared_experts must be an nn.Module or None, got {type(shared_experts).__name__}"
                )
            shared_d = getattr(shared_experts, "d_model", None)
            if None not in (shared_d, experts_d) and shared_d != experts_d:
                raise ValueError(
                    f"d_model mismatch: shared_experts.d_model={shared_d} but experts.d_model={experts_d}"
                )
        if capacity_factor is not None:
            check_float(capacity_factor, "capacity_factor", hint=", or None for dropless")
        check_positive_int(min_capacity, "min_capacity")
        self.router, self.experts, self.shared_experts = router, experts, shared_experts
        self.capacity_factor, self.min_capacity = capacity_factor, min_capacity
        self.track_stats, self.causal = track_stats, causal
        self.num_experts = experts.num_experts
        self.last_aux_losses: dict[str, Tensor] | None = None
        self.last_stats: RoutingStats | None = None

    def extra_repr(self) -> str:
        causal = ", causal=True" if self.causal else ""
        return f"capacity_factor={self.capacity_factor}, min_capacity={self.min_capacity}{causal}"

    def capacity(self, num_tokens: int, top_k: int) -> int | None:
        """Tokens per expert for ``num_tokens`` tokens with ``top_k`` choices (None = dropless)."""
        return expert_capacity(num_tokens, top_k, self.num_experts, self.capacity_factor, self.min_capacity)

    def _split(self, x: Tensor) -> tuple[tuple[int, ...], Tensor]:
        fd = self.experts.feature_dims
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < fd:
            raise ValueError(
                f"MoE: x must be a float tensor with >= {fd} feature dims, got {describe_tensor(x)}"
            )
        d = getattr(self.experts, "d_model", None)
        if d is not None and x.shape[-fd] != d:
            layout = "(..., D)" if fd == 1 else "(..., C, H, W)"
            raise ValueError(
                f"MoE: x must have shape {layout} with {'D' if fd == 1 else 'C'}={d}, got {tuple(x.shape)}"
            )
        lead = tuple(x.shape[: x.dim() - fd])
        return lead, x.reshape(-1, *x.shape[x.dim() - fd :])

    def _flat_extra(self, value: Tensor | None, lead: tuple[int, ...], name: str, trailing: int) -> Tensor | None:
        if value is None:
            return None
        if not isinstance(value, Tensor) or tuple(value.shape[: len(lead)]) != lead or value.dim() != len(lead) + trailing:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            tail = ", F" if trailing else ""
            raise ValueError(f"MoE: {name} must have shape {lead + (('F',) if trailing else ())} "
                             f"(the token dims of x{tail}), got {got}")
        return value.reshape(-1, *value.shape[len(lead):])

    def forward(
        self,
        x: Tensor,
        *,
        router_input: Tensor | None = None,
        token_ids: Tensor | None = None,
        token_mask: Tensor | None = None,
    ) -> MoEOutput:
        """Route ``x`` (``(..., D)``, or ``(..., C, H, W)`` for conv experts) through the experts.

        Args:
            router_input: what the router sees, ``(..., D_r)`` (default: ``x``, or for conv experts
                its spatial mean).
            token_ids: ``(...)`` int token ids (hash routing).
            token_mask: ``(...)`` bool, True = real token; padding tokens are not routed (routed
                output 0), and are left out of losses and stats.
        """
        lead, x_T = self._split(x)
        r_T = self._flat_extra(router_input, lead, "router_input", 1)
        if r_T is None:
            r_T = x_T if self.experts.feature_dims == 1 else x_T.mean(dim=(-2, -1))
        ids_T = self._flat_extra(token_ids, lead, "token_ids", 0)
        mask_T = self._flat_extra(token_mask, lead, "token_mask", 0)
        if mask_T is not None and mask_T.dtype != torch.bool:
            raise ValueError(f"MoE: token_mask must be a bool tensor (True = real token), got {mask_T.dtype}")

        real_T = None if mask_T is None else mask_T.nonzero().squeeze(1)
        xr_T = x_T
        if real_T is not None:
            xr_T = x_T.index_select(0, real_T)
            r_T = r_T.index_select(0, real_T)
            ids_T = None if ids_T is None else ids_T.index_select(0, real_T)

        routing = self.router(r_T, token_ids_T=ids_T)
        if not isinstance(routing, Routing):
            raise ValueError(f"MoE: the router must return a Routing, got {type(routing).__name__}")
        if self.causal and routing.is_expert_choice:
            raise ValueError(
                f"MoE(causal=True): {type(self.router).__name__} returned an expert-choice Routing, "
                "which mixes the tokens of a batch; use a token-choice router"
            )
        if routing.num_experts != self.num_experts:
            raise ValueError(
                f"MoE: the router produced probs over {routing.num_experts} experts, the layer has "
                f"{self.num_experts}"
            )
        capacity = self.capacity(xr_T.shape[0], routing.top_k)
        result = dispatch_routing(xr_T, routing, self.experts, capacity)
        routed = result.output
        if real_T is not None:
            routed = routed.new_zeros((x_T.shape[0], *routed.shape[1:])).index_copy_(0, real_T, routed)
        if self.shared_experts is not None:
            shared = self.shared_experts(x_T)
            if shared.shape != routed.shape:
                raise ValueError(
                    f"MoE: shared_experts output {tuple(shared.shape)} does not match the routed "
                    f"experts' output {tuple(routed.shape)}"
                )
            routed = routed + shared

        aux = self._aux_losses(routing)
        stats = routing_stats(routing, kept_S=result.kept_S) if self.track_stats else None
        self.last_aux_losses, self.last_stats = aux, stats
        return MoEOutput(routed.reshape(*lead, *routed.shape[1:]), aux, stats, routing)

    @staticmethod
    def _aux_losses(routing: Routing) -> dict[str, Tensor]:
        aux: dict[str, Tensor] = {}
        if not routing.is_expert_choice:
            aux["load_balance"] = load_balancing_loss(routing.probs_TE, routing.expert_indices_TK)
        if routing.logits_TE is not None:
            aux["z_loss"] = router_z_loss(routing.logits_TE)
        aux["importance"] = importance_loss(dense_gates(routing))
        return aux


class MoETensor(nn.Module):
    """``MoETensor(layer)(x, **kwargs) -> layer(x, **kwargs).output``: an MoE layer (`MoE`,
    `SoftMoE`) where code wants a plain tensor, e.g. the FFN of a Transformer block.

    The wrapped layer is a child module, so `moe_core.losses.collect_aux_losses` on the model still
    sums its ``last_aux_losses``, and ``layer.last_stats`` holds its routing statistics.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        if not isinstance(layer, nn.Module) or not hasattr(layer, "last_aux_losses"):
            raise ValueError(
                f"MoETensor: layer must be an MoE layer returning MoEOutput (MoE, SoftMoE), "
                f"got {type(layer).__name__}"
            )
        self.layer = layer

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        out = self.layer(x, **kwargs)
        if not isinstance(out, MoEOutput):
            raise ValueError(
                f"MoETensor: {type(self.layer).__name__} returned {type(out).__name__}, not MoEOutput"
            )
        return out.output
