"""Soft-MoE (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts").

Instead of sending discrete tokens to experts, every expert processes S *slots*, and every slot is
a weighted average of all the tokens of one sequence:

* logits ``L = X Phi`` ``(B, N, E*S)`` with learnable slot parameters ``Phi (D, E*S)``;
* dispatch weights ``softmax_N(L)`` (per slot, over the N tokens): slot inputs
  ``X~ = D^T X`` ``(B, E*S, D)``; slot ``e * S + s`` belongs to expert e;
* the slots are run expert-major as ``(E, B*S, D)`` through ``experts.forward_batched`` (one
  batched call, no Python loop over experts or slots);
* combine weights ``softmax_{E*S}(L)`` (per token, over all slots): ``Y = C Y~`` ``(B, N, D)``.

Everything is differentiable, no token is dropped and no balance loss is needed (``aux_losses`` is
``{}``). Soft-MoE mixes the tokens *within* a sequence (never across the batch), so it is not
causal: use it in encoders (ViT, a translation encoder), not in an autoregressive decoder
(``SoftMoE(..., causal=True)`` raises a ValueError that says so).

Normalization (``normalize=True``, Sec. 2.3 of the paper, for large D): the logits become
``scale * <x / ||x||, phi / ||phi||>`` with the L2 norms over D and a learned scalar ``scale``
initialised to 1. ``Phi`` is initialised normal with std ``1 / sqrt(D)`` (LeCun normal).

Padding: ``token_mask (B, N)`` (True = real token) gives padding tokens no dispatch weight (a slot
of an all-padding sequence is all zeros) and a zero output.

The `MoEOutput` it returns has ``aux_losses = {}`` and, as ``routing``, the *combine* view over the
real tokens: a dense token-choice `Routing` whose ``probs_TE`` = ``combine_weights_TK`` = each
token's combine weight summed over every expert's slots (rows sum to 1), so `routing_stats` reports
the entropy of how tokens spread over experts (every expert gets every token, so the counts are
flat by construction).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_core.checks import check_features, check_mask, check_positive_int
from moe_core.diagnostics import RoutingStats, routing_stats
from moe_core.layer import MoEOutput
from moe_core.routing import Routing


class SoftMoE(nn.Module):
    """Soft-MoE ``(B, N, D) -> (B, N, D_out)`` over ``experts``, ``slots_per_expert`` slots each.

    Args:
        d_model: D, the token width.
        experts: an experts module with ``num_experts`` and ``forward_batched((E, C, D)) ->
            (E, C, D_out)`` (`ExpertBank`, `ModuleExperts`).
        slots_per_expert: S.
        normalize: the paper's L2 normalization of tokens and slot parameters with a learned scale.
        track_stats: compute `RoutingStats` every call (one small device -> host copy).
        causal: must stay False: every slot averages all the tokens of a sequence, so a position's
            output depends on later positions; True raises a ValueError (the same flag as
            ``MoE(causal=...)``, so a model builder can pass it to either layer). In a decoder use
            ``MoE(token-choice router, capacity_factor=None, causal=True)``.
    """

    def __init__(
        self,
        d_model: int,
        experts: nn.Module,
        slots_per_expert: int = 1,
        normalize: bool = False,
        track_stats: bool = True,
        causal: bool = False,
    ) -> None:
        super().__init__()
        if causal is not False:
            raise ValueError(
                f"SoftMoE cannot be causal (got causal={causal!r}): every slot is a weighted "
                "average over all the tokens of a sequence, so later positions change earlier "
                "outputs; use MoE(router=TopKRouter(...), ..., capacity_factor=None, causal=True) "
                "in a decoder"
            )
        check_positive_int(d_model, "d_model")
        check_positive_int(slots_per_expert, "slots_per_expert")
        num_experts = getattr(experts, "num_experts", None)
        if (
            not isinstance(experts, nn.Module)
            or not isinstance(num_experts, int)
            or not callable(getattr(experts, "forward_batched", None))
        ):
            raise ValueError(
                "SoftMoE: experts must be an nn.Module with num_experts and forward_batched() "
                f"(ExpertBank, ModuleExperts), got {type(experts).__name__}"
            )
        if getattr(experts, "feature_dims", 1) != 1:
            raise ValueError(
                f"SoftMoE: experts must work on feature vectors (feature_dims=1), got "
                f"feature_dims={experts.feature_dims}"
            )
        experts_d = getattr(experts, "d_model", None)
        if experts_d is not None and experts_d != d_model:
            raise ValueError(f"SoftMoE: d_model={d_model} but experts.d_model={experts_d}")
        self.d_model, self.num_experts, self.slots_per_expert = (
            d_model,
            num_experts,
            slots_per_expert,
        )
        self.num_slots = num_experts * slots_per_expert
        self.experts = experts
        self.normalize, self.track_stats = normalize, track_stats
        self.phi = nn.Parameter(torch.randn(d_model, self.num_slots) / math.sqrt(d_model))
        if normalize:
            self.scale = nn.Parameter(torch.ones(()))
        else:
            self.register_parameter("scale", None)
        self.last_aux_losses: dict[str, Tensor] | None = None
        self.last_stats: RoutingStats | None = None

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, "
            f"slots_per_expert={self.slots_per_expert}, normalize={self.normalize}"
        )

    def _check(self, x: Tensor, token_mask: Tensor | None) -> None:
        check_features(x, self.d_model, where="SoftMoE")
        if x.dim() != 3:
            raise ValueError(
                f"SoftMoE: x must have shape (B, N, d_model={self.d_model}) (a batch of "
                f"sequences), got {tuple(x.shape)}; add a batch dim with x[None] for one sequence"
            )
        check_mask(token_mask, tuple(x.shape[:2]), "token_mask", "SoftMoE", dims="B, N")

    def logits(self, x_BND: Tensor) -> Tensor:
        """Slot logits ``(B, N, E*S)`` in at least float32."""
        dtype = torch.promote_types(x_BND.dtype, torch.float32)
        x, phi = x_BND.to(dtype), self.phi.to(dtype)
        if self.normalize:
            x = F.normalize(x, dim=-1)
            phi = self.scale.to(dtype) * F.normalize(phi, dim=0)
        return x @ phi

    def forward(self, x: Tensor, *, token_mask: Tensor | None = None) -> MoEOutput:
        """``x (B, N, D)`` -> `MoEOutput` with ``output (B, N, D_out)`` (module docstring)."""
        self._check(x, token_mask)
        B, N, _ = x.shape
        E, S = self.num_experts, self.slots_per_expert
        logits_BNM = self.logits(x)
        if token_mask is None:
            dispatch_BNM = logits_BNM.softmax(dim=1)
        else:
            keep_BN1 = token_mask[..., None]
            filled = logits_BNM.masked_fill(~keep_BN1, torch.finfo(logits_BNM.dtype).min)
            dispatch_BNM = filled.softmax(dim=1) * keep_BN1  # all-padding sequence -> zero slots
        combine_BNM = logits_BNM.softmax(dim=2)

        slots_BMD = torch.einsum("bnm,bnd->bmd", dispatch_BNM.to(x.dtype), x)
        slots_ECD = slots_BMD.reshape(B, E, S, -1).transpose(0, 1).reshape(E, B * S, -1)
        y_ECD = self.experts.forward_batched(slots_ECD)
        if y_ECD.dim() != 3 or y_ECD.shape[:2] != (E, B * S):
            raise ValueError(
                f"SoftMoE: experts.forward_batched must return (E={E}, C={B * S}, D_out), got "
                f"{tuple(y_ECD.shape)}"
            )
        y_BMD = y_ECD.reshape(E, B, S, -1).transpose(0, 1).reshape(B, E * S, -1)
        output = torch.einsum("bnm,bmd->bnd", combine_BNM.to(y_BMD.dtype), y_BMD)
        if token_mask is not None:
            output = output * token_mask[..., None].to(output.dtype)

        routing = self._combine_routing(combine_BNM, token_mask)
        stats = routing_stats(routing) if self.track_stats else None
        aux: dict[str, Tensor] = {}
        self.last_aux_losses, self.last_stats = aux, stats
        return MoEOutput(output, aux, stats, routing)

    def _combine_routing(self, combine_BNM: Tensor, token_mask: Tensor | None) -> Routing:
        """The dense token-choice view: per real token, its combine weight per expert."""
        B, N, _ = combine_BNM.shape
        combine_TE = combine_BNM.reshape(B * N, self.num_experts, self.slots_per_expert).sum(-1)
        if token_mask is not None:
            combine_TE = combine_TE[token_mask.reshape(-1)]
        T, E = combine_TE.shape
        experts_TE = torch.arange(E, device=combine_TE.device).expand(T, E).contiguous()
        return Routing(
            probs_TE=combine_TE, expert_indices_TK=experts_TE, combine_weights_TK=combine_TE
        )
