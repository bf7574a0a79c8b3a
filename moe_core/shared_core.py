"""Experts that share a core: each expert's weight reads ``core + residual_e``.

Residual Mixture of Experts (RMoE, Wu et al. 2022) observes that the weights of an MoE layer factor
into an input-independent *core*, common to all experts, and an input-dependent *residual* per
expert. `SharedCore` builds that factorisation into E same-shaped expert modules: the named
parameters of every expert are re-parametrised (``torch.nn.utils.parametrize``) as one shared core
plus the expert's own residual. The core starts as expert 0's initial value and every residual at
zero, so the experts start identical (as in sparse upcycling, Komatsuzaki et al. 2023) and
specialise only as far as their residuals grow.

Why: a routed expert learns from its share of the tokens only (about k / E of them). When data, not
capacity, limits the model (a small dataset, a short schedule), the core learns from every token
while the residuals keep the experts' capacity to differ. The compute per token is unchanged: an
expert adds its residual to the core once per call, then runs as before. Weight decay on a
residual pulls that expert toward the core rather than toward zero.

The core belongs to the `SharedCore` module (register it beside the experts, outside them, so an
optimizer can treat it as a dense weight); each expert's former parameter becomes its residual
(``<module>.parametrizations.<name>.original``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize


class _AddCore(nn.Module):
    """The parametrization ``residual -> core + residual``. The core is held in a list so that it
    is a parameter of the owning `SharedCore` only, not of every expert."""

    def __init__(self, core: nn.Parameter) -> None:
        super().__init__()
        self._core = [core]

    def forward(self, residual: Tensor) -> Tensor:
        return self._core[0] + residual


class SharedCore(nn.Module):
    """Ties parameter ``names`` (dotted paths such as ``"conv1.weight"``) of ``experts`` to shared cores.

    Args:
        experts: E >= 2 modules with the same parameter shapes at ``names`` (e.g. the modules of a
            `moe_core.ModuleExperts`); they are modified in place.
        names: parameters to share; each must be a plain parameter of every expert, same shape.

    After construction each expert's ``names`` read ``core + residual`` (residual zero at first);
    ``cores[i]`` is the core of ``names[i]``.
    """

    def __init__(self, experts: Sequence[nn.Module], names: Sequence[str]) -> None:
        super().__init__()
        experts, names = list(experts), list(names)
        if len(experts) < 2:
            raise ValueError(f"SharedCore needs at least 2 experts to share a core, got {len(experts)}")
        if not names or len(set(names)) != len(names):
            raise ValueError(f"names must be distinct parameter paths, got {names!r}")
        self.names = tuple(names)
        self.cores = nn.ParameterList()
        for name in names:
            owners = [_owner(expert, name) for expert in experts]
            attr = name.rsplit(".", 1)[-1]
            values = [getattr(owner, attr) for owner in owners]
            if len({tuple(v.shape) for v in values}) != 1:
                raise ValueError(f"parameter {name!r} differs in shape between experts: "
                                 f"{[tuple(v.shape) for v in values]}")
            core = nn.Parameter(values[0].detach().clone())
            self.cores.append(core)
            for owner in owners:
                with torch.no_grad():
                    getattr(owner, attr).zero_()
                parametrize.register_parametrization(owner, attr, _AddCore(core))

    def extra_repr(self) -> str:
        return f"names={self.names}"


def _owner(expert: nn.Module, name: str) -> nn.Module:
    """The submodule whose own plain (not yet re-parametrised) parameter ``name`` points to."""
    path, _, attr = name.rpartition(".")
    try:
        owner = expert.get_submodule(path) if path else expert
    except AttributeError:
        raise ValueError(f"expert {type(expert).__name__} has no submodule {path!r} (from {name!r})") from None
    if parametrize.is_parametrized(owner, attr):
        raise ValueError(f"parameter {name!r} is already re-parametrised")
    if attr not in dict(owner.named_parameters(recurse=False)):
        raise ValueError(f"expert {type(expert).__name__} has no parameter {name!r}")
    return owner
