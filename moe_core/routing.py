"""The `Routing` record every router returns, the input checks routers and layers share, and the
router gate conventions (`new_gate`, `gate_logits`) every router uses.

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

import math
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


def check_features(x: Tensor, d_model: int, *, name: str = "x", where: str = "input") -> None:
    """Raise a ValueError that says what is wrong unless ``x`` is a float tensor ``(..., d_model)``."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{where}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(
            f"{where}: {name} must be a floating-point tensor (float32/bfloat16/float16), got {x.dtype}; "
            f"cast it with {name}.float()"
        )
    if x.dim() < 1 or x.shape[-1] != d_model:
        raise ValueError(
            f"{where}: {name} must have shape (..., d_model={d_model}), got {tuple(x.shape)}"
        )


def flatten_tokens(x: Tensor, d_model: int, where: str) -> Tensor:
    """Check ``x`` is a float tensor ``(..., d_model)`` (`check_features`) and flatten it to ``x_TD``."""
    check_features(x, d_model, where=where)
    return x.reshape(-1, d_model)


def new_gate(d_model: int, n_out: int) -> nn.Linear:
    """A router gate ``x W`` (no bias), normal init with std `GATE_INIT_STD`."""
    gate = nn.Linear(d_model, n_out, bias=False)
    nn.init.normal_(gate.weight, std=GATE_INIT_STD)
    return gate


def gate_logits(gate: nn.Linear, x_TD: Tensor) -> Tensor:
    """Gate logits in float32 whatever the input and gate dtypes (both cast), ``(T, n_out)``."""
    return F.linear(x_TD.float(), gate.weight.float())


def describe_tensor(value: object) -> str:
    """``"torch.int64 (4, 2)"`` for a tensor (dtype and shape), else the type name: the "got" part
    of an input-check error message."""
    if isinstance(value, Tensor):
        return f"{value.dtype} {tuple(value.shape)}"
    return type(value).__name__


def check_mask(
    mask: Tensor | None,
    length_or_shape: int | tuple[int, ...],
    name: str,
    where: str,
    *,
    dims: str | None = None,
    true_for: str = "real tokens",
) -> None:
    """Raise a ValueError that says what is wrong unless ``mask`` is None or a bool tensor of
    exactly ``length_or_shape``.

    Args:
        dims: the expected shape in legend letters for the message, e.g. ``"T"`` or ``"B, N"``.
        true_for: what a True entry means, for the message (``"real tokens"``, ``"kept slots"``).
    """
    if mask is None:
        return
    shape = (length_or_shape,) if isinstance(length_or_shape, int) else tuple(length_or_shape)
    if isinstance(mask, Tensor) and mask.dtype == torch.bool and tuple(mask.shape) == shape:
        return
    expected = str(shape)
    if dims:
        expected = f"({dims}{',' if len(shape) == 1 else ''}) = {shape}"
    fix = ""
    if isinstance(mask, Tensor) and tuple(mask.shape) == shape:
        fix = f"; convert it with {name}.bool()"
    raise ValueError(
        f"{where}: {name} must be a bool tensor of shape {expected} with True for {true_for}, "
        f"got {describe_tensor(mask)}{fix}"
    )


def check_positive_int(value: int, name: str, *, minimum: int = 1, maximum: int | None = None) -> None:
    """Raise a ValueError naming ``name`` unless ``minimum <= value <= maximum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {allowed}, got {value}")


def check_float(
    value: float,
    name: str,
    *,
    low: float = 0.0,
    low_open: bool = True,
    high: float | None = None,
    hint: str = "",
) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is a finite real number ``> low``
    (``>= low`` with ``low_open=False``) and, given ``high``, ``< high``. ``hint`` is appended to
    the requirement in the message (e.g. ``", or None for dropless"``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (high is None or value < high)
    if not ok:
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        allowed = bound if high is None else f"{bound} and < {high:g}"
        raise ValueError(f"{name} must be a finite number {allowed}{hint}, got {value!r}")
