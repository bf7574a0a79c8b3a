"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing").

Instead of every token picking K experts, every expert picks its C favourite tokens:
``scores_TE = softmax_E(x W)``; expert e takes the C tokens with the highest ``scores_TE[:, e]``,
with ``C = min(T, ceil(capacity_factor * T / E))``, and combines them with those scores. Load is
perfectly balanced by construction (every expert gets exactly C tokens); a token may be taken by
several experts or by none. The result is a `Routing` in expert-choice form: ``token_indices_EC``
(int64) and ``combine_weights_EC``. Note that a token's pick depends on the other tokens of the
batch (the top-C is over T), as in the paper; padding tokens should be masked by the caller.

The gate follows the conventions of `moe_core.routers` (shared helpers of `moe_core.routing`):
float32 logits whatever the input dtype, no bias, normal init with std 0.02 (small, but no ties).
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from moe_core.checks import check_float, check_positive_int, flatten_tokens
from moe_core.routing import (
    GATE_INIT_STD,  # noqa: F401  (still importable from here, where it used to live)
    Routing,
    gate_logits,
    new_gate,
)


class ExpertChoiceRouter(nn.Module):
    """Each expert takes its top-C tokens by softmax score (Zhou et al. 2022).

    The choice is made over all the tokens of a call, so a token's output depends on the others
    (later positions of a sequence included): ``is_expert_choice`` lets ``MoE(causal=True)``
    refuse it."""

    is_expert_choice = True

    def __init__(self, d_model: int, num_experts: int, capacity_factor: float = 1.0) -> None:
        super().__init__()
        check_positive_int(d_model, "d_model")
        check_positive_int(num_experts, "num_experts")
        check_float(
            capacity_factor, "capacity_factor",
            hint=" (tokens per expert = ceil(capacity_factor * T / E))",
        )
        self.d_model, self.num_experts = d_model, num_experts
        self.capacity_factor = float(capacity_factor)
        self.gate = new_gate(d_model, num_experts)

    def capacity(self, num_tokens: int) -> int:
        """C = min(T, ceil(capacity_factor * T / E))."""
        return min(num_tokens, math.ceil(self.capacity_factor * num_tokens / self.num_experts))

    def forward(self, x: Tensor, *, token_ids_T: Tensor | None = None) -> Routing:
        x_TD = flatten_tokens(x, self.d_model, "ExpertChoiceRouter")
        logits_TE = gate_logits(self.gate, x_TD)
        scores_TE = logits_TE.softmax(-1)
        C = self.capacity(x_TD.shape[0])
        weight_EC, token_EC = scores_TE.t().topk(C, dim=-1, sorted=True)
        return Routing(
            scores_TE, logits_TE, token_indices_EC=token_EC, combine_weights_EC=weight_EC
        )
