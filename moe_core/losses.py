"""Auxiliary router losses as pure functions of tensors, and the one place coefficients apply.

* `load_balancing_loss`: the Switch Transformer balance loss ``E * sum_e f_e * P_e`` (Fedus et al.
  2021), with ``f_e`` the fraction of the T*K assignments that go to expert e and ``P_e`` the mean
  router probability of e. It is 1.0 for a perfectly uniform router and E for a collapsed one.
* `router_z_loss`: ``mean_t logsumexp(logits_t)^2`` (ST-MoE, Zoph et al. 2022), keeps router logits
  small so the fp32 softmax stays stable.
* `importance_loss`: ``CV(sum_t gates_t)^2`` (Shazeer et al. 2017, "importance" loss), with the
  *population* standard deviation (divide by E), so that one expert gives 0 instead of NaN.
* `dense_gates`: the combine weights of a `Routing` scattered to ``(T, E)``, the input of
  `importance_loss`.
* `collect_aux_losses(model)`: sums the ``last_aux_losses`` dict of every MoE layer of a model.
* `weighted_aux_loss(aux, coefficients)`: multiplies by the coefficients and adds up -- the only
  place a coefficient is applied.

Every loss takes an optional boolean ``mask_T`` (True = real token): masked-out tokens contribute
nothing, and an all-masked input gives 0 (not NaN). Losses are computed in float32.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from moe_core.checks import check_float, check_mask, describe_tensor
from moe_core.routing import Routing

AUX_LOSS_NAMES: tuple[str, ...] = ("load_balance", "z_loss", "importance")
"""The loss names MoE layers put in ``last_aux_losses``; `weighted_aux_loss` accepts only these."""


def _check_2d(x: Tensor, name: str, where: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{where}: {name} must be a 2-d tensor (T, E), got {got}")


def _token_weights(
    mask_T: Tensor | None, num_tokens: int, like: Tensor, where: str
) -> Tensor | None:
    """The mask as float32 weights ``(T,)`` (1 = real token), or None when there is no mask."""
    if mask_T is None:
        return None
    check_mask(mask_T, num_tokens, "mask_T", where, dims="T")
    return mask_T.to(device=like.device, dtype=torch.float32)


def load_balancing_loss(
    probs_TE: Tensor, expert_indices_TK: Tensor, mask_T: Tensor | None = None
) -> Tensor:
    """Switch balance loss ``E * sum_e f_e * P_e`` (Fedus et al. 2021), a float32 scalar.

    ``f_e`` (no gradient) counts assignments with a scatter-add, never a ``(T, K, E)`` one-hot;
    the gradient flows through ``P_e`` only.
    """
    where = "load_balancing_loss"
    _check_2d(probs_TE, "probs_TE", where)
    T, E = probs_TE.shape
    if (
        not isinstance(expert_indices_TK, Tensor)
        or expert_indices_TK.dim() != 2
        or expert_indices_TK.shape[0] != T
        or expert_indices_TK.dtype != torch.int64
    ):
        raise ValueError(
            f"{where}: expert_indices_TK must be an int64 tensor (T={T}, K), "
            f"got {describe_tensor(expert_indices_TK)}"
        )
    K = expert_indices_TK.shape[1]
    probs_TE = probs_TE.float()
    w_T = _token_weights(mask_T, T, probs_TE, where)
    if w_T is None:
        w_T = torch.ones(T, device=probs_TE.device)
    n_tokens = w_T.sum()
    counts_E = torch.zeros(E, device=probs_TE.device).scatter_add_(
        0, expert_indices_TK.reshape(-1), w_T.repeat_interleave(K)
    )
    f_E = counts_E / (n_tokens * K).clamp_min(1.0)
    P_E = (probs_TE * w_T[:, None]).sum(0) / n_tokens.clamp_min(1.0)
    return E * (f_E * P_E).sum()


def router_z_loss(logits_TE: Tensor, mask_T: Tensor | None = None) -> Tensor:
    """ST-MoE router z-loss ``mean_t logsumexp(logits_t)^2`` (Zoph et al. 2022), float32 scalar."""
    where = "router_z_loss"
    _check_2d(logits_TE, "logits_TE", where)
    z_T = torch.logsumexp(logits_TE.float(), dim=-1).square()
    w_T = _token_weights(mask_T, logits_TE.shape[0], logits_TE, where)
    if w_T is None:
        return z_T.mean() if z_T.numel() else z_T.sum()
    return (z_T * w_T).sum() / w_T.sum().clamp_min(1.0)


def importance_loss(gates_TE: Tensor, mask_T: Tensor | None = None) -> Tensor:
    """Shazeer et al. 2017 importance loss ``CV(sum_t gates_t)^2``, a float32 scalar.

    CV is ``std / mean`` over the E expert importances with the population std (``/ E``); an
    all-zero importance (e.g. everything masked) gives 0.
    """
    where = "importance_loss"
    _check_2d(gates_TE, "gates_TE", where)
    gates_TE = gates_TE.float()
    w_T = _token_weights(mask_T, gates_TE.shape[0], gates_TE, where)
    importance_E = gates_TE.sum(0) if w_T is None else (gates_TE * w_T[:, None]).sum(0)
    mean = importance_E.mean()
    var = (importance_E - mean).square().mean()
    return var / mean.square().clamp_min(torch.finfo(torch.float32).tiny)


def dense_gates(routing: Routing) -> Tensor:
    """The combine weights of ``routing`` scattered to ``gates_TE`` (float32, 0 = not routed)."""
    token_S, expert_S, weight_S = routing.assignments()
    T, E = routing.probs_TE.shape
    flat = torch.zeros(T * E, device=routing.probs_TE.device, dtype=torch.float32)
    flat = flat.index_add(0, token_S * E + expert_S, weight_S.float())
    return flat.view(T, E)


def collect_aux_losses(model: nn.Module) -> dict[str, Tensor]:
    """Sum, per loss name, the ``last_aux_losses`` dicts of every module of ``model`` that has one.

    Modules without the attribute, or with it set to None, are skipped; an empty dict means no layer
    produced a loss (e.g. before the first forward).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"collect_aux_losses: model must be a torch.nn.Module, got {type(model).__name__}"
        )
    total: dict[str, Tensor] = {}
    for module in model.modules():
        aux = getattr(module, "last_aux_losses", None)
        if aux is None:
            continue
        if not isinstance(aux, Mapping):
            raise ValueError(
                f"collect_aux_losses: {type(module).__name__}.last_aux_losses must be a dict of "
                f"name -> scalar tensor or None, got {type(aux).__name__}"
            )
        for name, value in aux.items():
            total[name] = total[name] + value if name in total else value
    return total


def weighted_aux_loss(aux: Mapping[str, Tensor], coefficients: Mapping[str, float]) -> Tensor:
    """``sum_name coefficients[name] * aux[name]`` -- the one place coefficients are applied.

    A coefficient for a loss no layer produced contributes 0; a loss without a coefficient is not
    added. A coefficient name outside `AUX_LOSS_NAMES`, or a negative / non-finite coefficient,
    raises ValueError (so a typo such as ``"zloss"`` cannot silently switch a loss off).
    """
    for name, value in coefficients.items():
        if name not in AUX_LOSS_NAMES:
            raise ValueError(
                f"weighted_aux_loss: unknown coefficient name {name!r}; allowed names are "
                f"{list(AUX_LOSS_NAMES)}"
            )
        check_float(value, f"weighted_aux_loss: coefficient {name!r}", low_open=False)
    terms = [
        float(coefficients[name]) * aux[name]
        for name in AUX_LOSS_NAMES
        if name in coefficients and name in aux
    ]
    if not terms:
        device = next(
            (v.device for v in aux.values() if isinstance(v, Tensor)), torch.device("cpu")
        )
        return torch.zeros((), device=device)
    return torch.stack([t.float() for t in terms]).sum()
