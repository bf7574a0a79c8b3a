"""The `Routing` record every router returns and the router gate conventions (`new_gate`,
`gate_logits`) every router uses. The input checks routers and layers share are in
`moe_core.checks`.

Shape legend used across moe_core: B batch, N sequence length, T tokens (all leading dims of the
input flattened), D model width, H expert hidden width, E experts, K experts per token (top-k),
C tokens per expert (capacity, or the expert-choice bucket size), S assignment slots.

A `Routing` describes *who goes where with what weight*, in one of two forms:

* token choice (softmax/dense, Gumbel, top-k, Switch, hierarchical, hash routers): every token picks
  K experts, ``expert_indices_TK`` / ``combine_weights_TK``;
* expert choice (Zhou et al. 2022): every expert picks C tokens, ``token_indices_EC`` /
  ``combine_weights_EC``.

Both flatten to the same list of (token, expert, weight) assignment slots (`assignments()`), which is
what the dispatch in `moe_core.dispatch` consumes. For token choice the slots are ordered k-major
(slot ``s = k * T + t``), so that a stable sort by expert keeps every token's first choice ahead of
any second choice: capacity dropping then drops second choices first (GShard's priority).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GATE_INIT_STD = 0.02
"""Std of the normal gate init of every router (`new_gate`): small, but no tied logits."""


@dataclass(frozen=True)
class Routing:
    """What a router decided for T tokens over E experts.

    Attributes:
        probs_TE: router probabilities over all experts (rows sum to 1 for softmax routers; one-hot
            for hash routing). Used by the balance losses and the diagnostics.
        logits_TE: raw router logits before any softmax (for the z-loss); None if the router has none.
        expert_indices_TK: token choice, the K experts each token goes to (int64).
        combine_weights_TK: token choice, the weight of each of those experts in the token's output.
        token_indices_EC: expert choice, the C tokens each expert takes (int64).
        combine_weights_EC: expert choice, the weight of each taken token in its output.
        num_experts: E.
    """

    probs_TE: Tensor
    logits_TE: Tensor | None = None
    expert_indices_TK: Tensor | None = None
    combine_weights_TK: Tensor | None = None
    token_indices_EC: Tensor | None = None
    combine_weights_EC: Tensor | None = None

    def __post_init__(self) -> None:
        token_choice = self.expert_indices_TK is not None
        expert_choice = self.token_indices_EC is not None
        if token_choice == expert_choice:
            raise ValueError(
                "Routing needs exactly one of expert_indices_TK (token choice) or "
                "token_indices_EC (expert choice)"
            )
        if token_choice and (
            self.combine_weights_TK is None
            or self.combine_weights_TK.shape != self.expert_indices_TK.shape
        ):
            raise ValueError("combine_weights_TK must be given with the shape of expert_indices_TK")
        if expert_choice and (
            self.combine_weights_EC is None
            or self.combine_weights_EC.shape != self.token_indices_EC.shape
        ):
            raise ValueError("combine_weights_EC must be given with the shape of token_indices_EC")

    @property
    def num_tokens(self) -> int:
        return self.probs_TE.shape[0]

    @property
    def num_experts(self) -> int:
        return self.probs_TE.shape[1]

    @property
    def is_expert_choice(self) -> bool:
        return self.token_indices_EC is not None

    @property
    def top_k(self) -> int:
        """K for token choice; for expert choice, the average number of experts per token."""
        if self.expert_indices_TK is not None:
            return self.expert_indices_TK.shape[1]
        return max(1, round(self.token_indices_EC.numel() / max(self.num_tokens, 1)))

    def assignments(self) -> tuple[Tensor, Tensor, Tensor]:
        """Flatten to slots: ``(token_S, expert_S, weight_S)``.

        Token choice is k-major (slot ``k * T + t``); expert choice is expert-major (slot ``e * C + c``).
        """
        if self.expert_indices_TK is not None:
            T, K = self.expert_indices_TK.shape
            token_S = torch.arange(T, device=self.probs_TE.device).repeat(K)
            return token_S, self.expert_indices_TK.t().reshape(-1), self.combine_weights_TK.t().reshape(-1)
        E, C = self.token_indices_EC.shape
        expert_S = torch.arange(E, device=self.probs_TE.device).repeat_interleave(C)
        return self.token_indices_EC.reshape(-1), expert_S, self.combine_weights_EC.reshape(-1)


def new_gate(d_model: int, n_out: int) -> nn.Linear:
    """A router gate ``x W`` (no bias), normal init with std `GATE_INIT_STD`."""
    gate = nn.Linear(d_model, n_out, bias=False)
    nn.init.normal_(gate.weight, std=GATE_INIT_STD)
    return gate


def gate_logits(gate: nn.Linear, x_TD: Tensor) -> Tensor:
    """Gate logits in float32 whatever the input and gate dtypes (both cast), ``(T, n_out)``."""
    return F.linear(x_TD.float(), gate.weight.float())
