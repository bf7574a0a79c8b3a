"""Routing diagnostics: per-step `RoutingStats`, and a `StatsAccumulator` for a logging window.

What is measured (for load balance see Fedus et al. 2021; dead experts / entropy are the usual
router-collapse signals):

* ``tokens_per_expert_E``: int64 count of the *kept* assignments each expert received (after
  capacity dropping, without padding tokens);
* ``fraction_per_expert_E``: the same counts divided by their total (sums to 1; all 0 if none
  kept);
* ``dropped_fraction``: token choice -- the fraction of real-token assignments dropped by capacity;
  expert choice (Zhou et al. 2022) -- the fraction of real tokens that no expert took;
* ``entropy``: mean over real tokens of the entropy of ``probs_TE`` in nats (``log E`` = uniform,
  0 = one-hot);
* ``load_cv``: ``std / mean`` of ``tokens_per_expert_E`` with the population std (0 = balanced);
* ``dead_experts``: number of experts that kept no token.

`routing_stats` does all the arithmetic on the routing's device and copies one small tensor to the
CPU (a single device sync), so it is cheap enough to call every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moe_core.checks import check_mask
from moe_core.routing import Routing


@dataclass(frozen=True)
class RoutingStats:
    """Load statistics of one routing decision (tensors on the CPU, detached)."""

    tokens_per_expert_E: Tensor
    fraction_per_expert_E: Tensor
    dropped_fraction: float
    entropy: float
    load_cv: float
    dead_experts: int


def _load_cv(counts_E: Tensor) -> float:
    counts = counts_E.double()
    mean = counts.mean()
    if counts.numel() == 0 or mean.item() == 0.0:
        return 0.0
    return float(counts.std(unbiased=False) / mean)


@torch.no_grad()
def routing_stats(
    routing: Routing, kept_S: Tensor | None = None, mask_T: Tensor | None = None
) -> RoutingStats:
    """Statistics of ``routing``.

    Args:
        routing: what the router decided.
        kept_S: bool per assignment slot, in the order of ``routing.assignments()``; False = dropped
            by capacity. None = every assignment kept.
        mask_T: bool per token, True = real token; padding tokens are left out of every number.
    """
    if not isinstance(routing, Routing):
        raise ValueError(f"routing_stats: routing must be a Routing, got {type(routing).__name__}")
    token_S, expert_S, _ = routing.assignments()
    T, E = routing.probs_TE.shape
    device = routing.probs_TE.device
    where = "routing_stats"
    check_mask(kept_S, token_S.shape[0], "kept_S", where, dims="S", true_for="kept assignments")
    check_mask(mask_T, T, "mask_T", where, dims="T")

    real_T = torch.ones(T, dtype=torch.bool, device=device) if mask_T is None else mask_T.to(device)
    real_S = real_T[token_S]
    kept_real_S = real_S if kept_S is None else real_S & kept_S.to(device)
    counts_E = torch.zeros(E, dtype=torch.int64, device=device).scatter_add_(
        0, expert_S, kept_real_S.long()
    )

    n_real = real_T.sum()
    if routing.is_expert_choice:
        taken_T = torch.zeros(T, dtype=torch.int64, device=device).scatter_add_(
            0, token_S, kept_real_S.long()
        )
        dropped = (real_T & (taken_T == 0)).sum()
        dropped_of = n_real
    else:
        dropped = (real_S & ~kept_real_S).sum()
        dropped_of = real_S.sum()

    probs_TE = routing.probs_TE.detach().float()
    entropy_T = -torch.special.xlogy(probs_TE, probs_TE).sum(-1)
    entropy_sum = (entropy_T * real_T).sum()

    scalars = torch.stack(
        [dropped.double(), dropped_of.double(), entropy_sum.double(), n_real.double()]
    )
    host = torch.cat([counts_E.double(), scalars]).cpu()  # the one device -> host copy
    counts_E = host[:E].long()
    dropped_f, dropped_of_f, entropy_sum_f, n_real_f = host[E:].tolist()
    total = int(counts_E.sum())
    return RoutingStats(
        tokens_per_expert_E=counts_E,
        fraction_per_expert_E=counts_E.float() / total if total else torch.zeros(E),
        dropped_fraction=dropped_f / dropped_of_f if dropped_of_f else 0.0,
        entropy=entropy_sum_f / n_real_f if n_real_f else 0.0,
        load_cv=_load_cv(counts_E),
        dead_experts=int((counts_E == 0).sum()),
    )


class StatsAccumulator:
    """Accumulates `RoutingStats` over steps (e.g. one logging interval) and summarizes them.

    ``summary()`` gives:
        steps: number of updates;
        tokens_per_expert: summed kept counts per expert (list of int);
        fraction_per_expert: those summed counts as fractions of their total (list of float);
        dropped_fraction / entropy / step_load_cv: means of the per-step values;
        load_cv: ``std / mean`` (population std) of the summed counts;
        dead_experts: experts that kept no token in the whole window.
    An accumulator with no updates summarizes to ``{"steps": 0}``.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self._counts_E: Tensor | None = None
        self._dropped_sum = 0.0
        self._entropy_sum = 0.0
        self._load_cv_sum = 0.0

    def update(self, stats: RoutingStats) -> None:
        if not isinstance(stats, RoutingStats):
            raise ValueError(
                f"StatsAccumulator.update: expected RoutingStats, got {type(stats).__name__}"
            )
        counts_E = stats.tokens_per_expert_E.detach().to("cpu", torch.int64)
        if self._counts_E is None:
            self._counts_E = counts_E.clone()
        elif self._counts_E.shape != counts_E.shape:
            raise ValueError(
                f"StatsAccumulator.update: stats over {counts_E.numel()} experts, but this "
                f"accumulator holds {self._counts_E.numel()}; use one accumulator per MoE layer "
                f"or call reset()"
            )
        else:
            self._counts_E += counts_E
        self.steps += 1
        self._dropped_sum += stats.dropped_fraction
        self._entropy_sum += stats.entropy
        self._load_cv_sum += stats.load_cv

    def state_dict(self) -> dict[str, object]:
        """Plain-Python state for a checkpoint (restore with `load_state_dict`)."""
        counts = None if self._counts_E is None else self._counts_E.tolist()
        return {
            "steps": self.steps,
            "tokens_per_expert": counts,
            "dropped_sum": self._dropped_sum,
            "entropy_sum": self._entropy_sum,
            "load_cv_sum": self._load_cv_sum,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        missing = {"steps", "tokens_per_expert", "dropped_sum", "entropy_sum", "load_cv_sum"}
        missing -= set(state)
        if missing:
            raise ValueError(
                f"StatsAccumulator.load_state_dict: missing keys {sorted(missing)}; pass what "
                f"state_dict() returned"
            )
        counts = state["tokens_per_expert"]
        self.steps = int(state["steps"])
        self._counts_E = None if counts is None else torch.tensor(counts, dtype=torch.int64)
        self._dropped_sum = float(state["dropped_sum"])
        self._entropy_sum = float(state["entropy_sum"])
        self._load_cv_sum = float(state["load_cv_sum"])

    def summary(self) -> dict[str, float | list]:
        if self._counts_E is None:
            return {"steps": 0}
        counts = self._counts_E
        total = int(counts.sum())
        fractions = (counts.double() / total).tolist() if total else [0.0] * counts.numel()
        return {
            "steps": self.steps,
            "tokens_per_expert": counts.tolist(),
            "fraction_per_expert": fractions,
            "dropped_fraction": self._dropped_sum / self.steps,
            "entropy": self._entropy_sum / self.steps,
            "step_load_cv": self._load_cv_sum / self.steps,
            "load_cv": _load_cv(counts),
            "dead_experts": int((counts == 0).sum()),
        }
