"""Multi-gate mixtures of experts for multi-task learning: MMoE, CGC and PLE.

* `MMoE` -- Multi-gate Mixture-of-Experts (Ma et al. 2018, "Modeling Task Relationships in
  Multi-task Learning with Multi-gate Mixture-of-Experts"): E experts shared by all tasks, every
  expert runs on every input (dense), and each task t has its own softmax gate
  ``g_t(x) = softmax(W_t x)``; task t's output is ``sum_e g_t(x)[e] * expert_e(x)``.
* `CGC` -- one Customized Gate Control level (Tang et al. 2020, "Progressive Layered Extraction
  (PLE): A Novel Multi-Task Learning (MTL) Model for Personalized Recommendations"): every task owns
  ``num_task_experts`` experts, ``num_shared_experts`` experts are shared; task t's gate mixes its
  own experts and the shared ones; optionally a shared gate mixes *all* experts of the level.
* `PLE` -- stacked CGC levels. At level 1 every branch sees ``x``; afterwards task t's input is its
  gated output of the previous level and the shared branch's input is the previous shared-gate
  output. Every level but the last has a shared gate (when there are shared experts to feed).

Expert order inside a level (the columns of the gate weights):

* task t's gate: ``[task t's experts (num_task_experts), shared experts (num_shared_experts)]``;
* the shared gate: ``[task 0's experts, ..., task T-1's experts, shared experts]``.

The experts of `MMoE` are any experts module with ``num_experts`` and
``forward_dense(x_BD) -> y_BEH`` (`moe_core.experts.ExpertBank`, `ModuleExperts`). Multi-task
experts usually change the width (d_in -> d_expert, fed to per-task towers), which `ExpertBank`
(D -> D) does not, so `mlp_experts` builds `ModuleExperts` of small MLPs for `MMoE.from_sizes`,
`CGC` and `PLE`.

Auxiliary loss: every forward computes ``"importance"`` = the mean over the module's gates of the
Shazeer et al. 2017 importance loss ``CV(sum_b g_b)^2`` (`moe_core.losses.importance_loss`), kept
in ``last_aux_losses`` like the MoE layers, so `collect_aux_losses` sees it; it is added to the
training loss only when ``weighted_aux_loss`` is given an ``"importance"`` coefficient. It counters
the gate polarisation (a gate putting all its weight on one expert) reported for MMoE.
``last_gate_weights`` keeps the detached gate weights of the last forward for utilisation logs.

Shape legend: B batch (all leading dims flattened), D input width, H expert output width,
E experts, T tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_core.checks import check_features, check_positive_int, flatten_tokens
from moe_core.experts import ModuleExperts
from moe_core.losses import importance_loss

MLP_ACTIVATIONS = ("relu", "gelu")


@dataclass(frozen=True)
class MultiGateOutput:
    """What `MMoE` and `PLE` return.

    Attributes:
        task_outputs: one ``(..., H)`` tensor per task (the input's leading dims, expert width H).
        gate_weights: one ``(..., E_t)`` tensor per task, the softmax weights of task t's gate (for
            PLE the last level's, ``E_t = num_task_experts + num_shared_experts``, task experts
            first). Rows sum to 1.
        aux_losses: ``{"importance": scalar}`` (see the module docstring).
    """

    task_outputs: list[Tensor]
    gate_weights: list[Tensor]
    aux_losses: dict[str, Tensor]


@dataclass(frozen=True)
class CGCOutput:
    """What one `CGC` level returns (inputs flattened to ``(B, D)``).

    Attributes:
        task_outputs: one ``(B, H)`` tensor per task, task t's gated mixture.
        shared_output: ``(B, H)``, the shared gate's mixture over all experts; None without a
            shared gate.
        gate_weights: one ``(B, num_task_experts + num_shared_experts)`` tensor per task.
        shared_gate_weights: ``(B, num_tasks * num_task_experts + num_shared_experts)`` or None.
    """

    task_outputs: list[Tensor]
    shared_output: Tensor | None
    gate_weights: list[Tensor]
    shared_gate_weights: Tensor | None


def mlp_experts(
    num_experts: int, d_in: int, d_out: int, activation: str = "relu", d_hidden: int | None = None
) -> ModuleExperts:
    """E small MLP experts ``(n, d_in) -> (n, d_out)`` as `ModuleExperts`.

    Each expert is ``Linear(d_in, d_out) -> act`` (the experts of the MMoE / PLE papers), or with
    ``d_hidden`` ``Linear(d_in, d_hidden) -> act -> Linear(d_hidden, d_out) -> act``.
    """
    check_positive_int(num_experts, "num_experts")
    check_positive_int(d_in, "d_in")
    check_positive_int(d_out, "d_out")
    if d_hidden is not None:
        check_positive_int(d_hidden, "d_hidden")
    if activation not in MLP_ACTIVATIONS:
        raise ValueError(f"activation must be one of {MLP_ACTIVATIONS}, got {activation!r}")
    act = nn.ReLU if activation == "relu" else nn.GELU
    widths = [d_in, d_out] if d_hidden is None else [d_in, d_hidden, d_out]

    def expert() -> nn.Module:
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(a, b), act()]
        return nn.Sequential(*layers)

    return ModuleExperts([expert() for _ in range(num_experts)])


def _check_experts(experts: nn.Module, method: str, where: str) -> int:
    """The number of experts of ``experts``, after checking it is a vector experts module."""
    num = getattr(experts, "num_experts", None)
    if (
        not isinstance(experts, nn.Module)
        or not isinstance(num, int)
        or not callable(getattr(experts, method, None))
    ):
        raise ValueError(
            f"{where}: experts must be an nn.Module with num_experts and {method}() (ExpertBank, "
            f"ModuleExperts, or mlp_experts(...)), got {type(experts).__name__}"
        )
    if getattr(experts, "feature_dims", 1) != 1:
        raise ValueError(
            f"{where}: experts must work on feature vectors (feature_dims=1), got "
            f"feature_dims={experts.feature_dims}"
        )
    return num


def _gate(d_in: int, num_experts: int) -> nn.Linear:
    """A task gate ``W x`` (no bias, as in the MMoE paper), nn.Linear's default init."""
    return nn.Linear(d_in, num_experts, bias=False)


def _gate_probs(gate: nn.Linear, x_BD: Tensor) -> Tensor:
    """Softmax gate weights in at least float32 (input and weight cast), ``(B, E)``."""
    dtype = torch.promote_types(x_BD.dtype, torch.float32)
    return F.linear(x_BD.to(dtype), gate.weight.to(dtype)).softmax(-1)


def _finish(
    module: MMoE | PLE,
    lead: torch.Size,
    outputs_BH: Sequence[Tensor],
    gates_BE: Sequence[Tensor],
    loss_gates: Sequence[Tensor],
) -> MultiGateOutput:
    """The `MultiGateOutput` of ``module`` with the input's leading dims restored; records
    ``last_aux_losses`` (mean importance loss of ``loss_gates``) and ``last_gate_weights``."""
    aux = {"importance": torch.stack([importance_loss(g) for g in loss_gates]).mean()}
    module.last_aux_losses = aux
    module.last_gate_weights = [g.detach() for g in gates_BE]
    return MultiGateOutput(  # explicit widths: an empty batch has no -1 to infer
        task_outputs=[o.reshape(*lead, o.shape[-1]) for o in outputs_BH],
        gate_weights=[g.reshape(*lead, g.shape[-1]) for g in gates_BE],
        aux_losses=aux,
    )


class MMoE(nn.Module):
    """Multi-gate MoE (Ma et al. 2018): shared dense experts, one softmax gate per task.

    Args:
        d_in: input width D.
        experts: any experts module with ``num_experts`` and ``forward_dense((B, D)) -> (B, E, H)``.
        num_tasks: number of tasks (gates).
    """

    def __init__(self, d_in: int, experts: nn.Module, num_tasks: int) -> None:
        super().__init__()
        check_positive_int(d_in, "d_in")
        check_positive_int(num_tasks, "num_tasks")
        self.num_experts = _check_experts(experts, "forward_dense", "MMoE")
        self.d_in, self.num_tasks = d_in, num_tasks
        self.experts = experts
        self.gates = nn.ModuleList(_gate(d_in, self.num_experts) for _ in range(num_tasks))
        self.last_aux_losses: dict[str, Tensor] | None = None
        self.last_gate_weights: list[Tensor] | None = None

    @classmethod
    def from_sizes(
        cls,
        d_in: int,
        d_expert: int,
        num_experts: int,
        num_tasks: int,
        activation: str = "relu",
        d_hidden: int | None = None,
    ) -> MMoE:
        """MMoE of ``num_experts`` `mlp_experts` ``d_in -> d_expert``, outputs ``(B, d_expert)``."""
        return cls(d_in, mlp_experts(num_experts, d_in, d_expert, activation, d_hidden), num_tasks)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, num_experts={self.num_experts}, num_tasks={self.num_tasks}"

    def forward(self, x: Tensor) -> MultiGateOutput:
        """``x (..., d_in)`` -> one ``(..., H)`` output and one ``(..., E)`` gate per task."""
        x_BD = flatten_tokens(x, self.d_in, "MMoE")
        lead = x.shape[:-1]
        y_BEH = self.experts.forward_dense(x_BD)
        if y_BEH.dim() != 3 or y_BEH.shape[:2] != (x_BD.shape[0], self.num_experts):
            raise ValueError(
                f"MMoE: experts.forward_dense must return (B, E={self.num_experts}, H) for "
                f"B={x_BD.shape[0]} inputs, got {tuple(y_BEH.shape)}"
            )
        gates = [_gate_probs(gate, x_BD) for gate in self.gates]
        outputs = [torch.einsum("be,beh->bh", g.to(y_BEH.dtype), y_BEH) for g in gates]
        return _finish(self, lead, outputs, gates, gates)


class CGC(nn.Module):
    """One Customized Gate Control level of PLE (Tang et al. 2020); see the module docstring.

    Args:
        d_in: input width of every branch.
        d_expert: output width H of every expert.
        num_tasks: T.
        num_shared_experts, num_task_experts: experts shared by all tasks / owned by each task.
        activation: of the `mlp_experts`.
        shared_gate: add the gate over all experts that feeds the next level's shared branch.
        d_hidden: optional hidden width of the expert MLPs.
    """

    def __init__(
        self,
        d_in: int,
        d_expert: int,
        num_tasks: int,
        num_shared_experts: int = 2,
        num_task_experts: int = 2,
        activation: str = "relu",
        shared_gate: bool = False,
        d_hidden: int | None = None,
    ) -> None:
        super().__init__()
        check_positive_int(d_in, "d_in")
        check_positive_int(d_expert, "d_expert")
        check_positive_int(num_tasks, "num_tasks")
        check_positive_int(num_shared_experts, "num_shared_experts", minimum=0)
        check_positive_int(num_task_experts, "num_task_experts", minimum=0)
        per_task = num_task_experts + num_shared_experts
        if per_task == 0:
            raise ValueError(
                "CGC: every task gate needs at least one expert, got num_task_experts=0 and "
                "num_shared_experts=0; set either to >= 1"
            )
        self.d_in, self.d_expert, self.num_tasks = d_in, d_expert, num_tasks
        self.num_shared_experts, self.num_task_experts = num_shared_experts, num_task_experts
        self.num_experts = num_tasks * num_task_experts + num_shared_experts
        self.experts = mlp_experts(self.num_experts, d_in, d_expert, activation, d_hidden)
        self.task_gates = nn.ModuleList(_gate(d_in, per_task) for _ in range(num_tasks))
        self.shared_gate = _gate(d_in, self.num_experts) if shared_gate else None
        shared = torch.arange(num_tasks * num_task_experts, self.num_experts)
        index = [
            torch.cat([torch.arange(t * num_task_experts, (t + 1) * num_task_experts), shared])
            for t in range(num_tasks)
        ]
        # row t: the level's expert ids that task t's gate mixes, (num_tasks, E_t)
        self.register_buffer("task_expert_index", torch.stack(index), persistent=False)

    def extra_repr(self) -> str:
        return (
            f"d_in={self.d_in}, d_expert={self.d_expert}, num_tasks={self.num_tasks}, "
            f"num_task_experts={self.num_task_experts}, "
            f"num_shared_experts={self.num_shared_experts}, "
            f"shared_gate={self.shared_gate is not None}"
        )

    def _check_inputs(self, task_inputs: Sequence[Tensor], shared_input: Tensor | None) -> None:
        if isinstance(task_inputs, Tensor) or len(task_inputs) != self.num_tasks:
            got = "a tensor" if isinstance(task_inputs, Tensor) else f"{len(task_inputs)} inputs"
            raise ValueError(
                f"CGC: task_inputs must be a list of num_tasks={self.num_tasks} tensors, got {got}"
            )
        needs_shared = self.num_shared_experts > 0 or self.shared_gate is not None
        if needs_shared and shared_input is None:
            raise ValueError(
                "CGC: shared_input is required when the level has shared experts or a shared gate"
            )
        for i, x in enumerate([*task_inputs, shared_input] if needs_shared else task_inputs):
            name = f"task_inputs[{i}]" if i < self.num_tasks else "shared_input"
            check_features(x, self.d_in, name=name, where="CGC")
            if x.dim() != 2 or x.shape != task_inputs[0].shape:
                raise ValueError(
                    f"CGC: {name} must have shape (B, d_in={self.d_in}) like task_inputs[0] "
                    f"{tuple(task_inputs[0].shape)}, got {tuple(x.shape)}"
                )

    def _expert_outputs(self, task_inputs: Sequence[Tensor], shared_input: Tensor | None) -> Tensor:
        """``y_EBH``: every expert on its own branch's input, in the level's expert order."""
        first = task_inputs[0]
        if all(x is first for x in task_inputs) and (shared_input is None or shared_input is first):
            return self.experts.forward_dense(first).transpose(0, 1)
        parts = [torch.stack(list(task_inputs)).repeat_interleave(self.num_task_experts, dim=0)]
        if self.num_shared_experts:
            parts.append(shared_input.expand(self.num_shared_experts, *shared_input.shape))
        return self.experts.forward_batched(torch.cat(parts))

    def forward(self, task_inputs: Sequence[Tensor], shared_input: Tensor | None) -> CGCOutput:
        """Task branches ``task_inputs[t] (B, d_in)``, the shared branch ``shared_input (B, d_in)``
        (None allowed when there are no shared experts and no shared gate)."""
        self._check_inputs(task_inputs, shared_input)
        y_EBH = self._expert_outputs(task_inputs, shared_input)
        gates = [_gate_probs(gate, x) for gate, x in zip(self.task_gates, task_inputs, strict=True)]
        outputs = [
            torch.einsum("be,ebh->bh", g.to(y_EBH.dtype), y_EBH[index])
            for g, index in zip(gates, self.task_expert_index, strict=True)
        ]
        shared_gate, shared_output = None, None
        if self.shared_gate is not None:
            shared_gate = _gate_probs(self.shared_gate, shared_input)
            shared_output = torch.einsum("be,ebh->bh", shared_gate.to(y_EBH.dtype), y_EBH)
        return CGCOutput(outputs, shared_output, gates, shared_gate)


class PLE(nn.Module):
    """Progressive Layered Extraction (Tang et al. 2020): ``num_levels`` stacked `CGC` levels.

    Level 1 maps ``d_in -> d_expert``, later levels ``d_expert -> d_expert``; task outputs are
    ``(..., d_expert)``. ``num_levels=1`` is the single-level CGC model of the paper.
    """

    def __init__(
        self,
        d_in: int,
        d_expert: int,
        num_tasks: int,
        num_levels: int = 2,
        num_shared_experts: int = 2,
        num_task_experts: int = 2,
        activation: str = "relu",
        d_hidden: int | None = None,
    ) -> None:
        super().__init__()
        check_positive_int(num_levels, "num_levels")
        self.d_in, self.d_expert, self.num_tasks, self.num_levels = (
            d_in,
            d_expert,
            num_tasks,
            num_levels,
        )
        self.levels = nn.ModuleList(
            CGC(
                d_in if level == 0 else d_expert,
                d_expert,
                num_tasks,
                num_shared_experts,
                num_task_experts,
                activation,
                shared_gate=level < num_levels - 1 and num_shared_experts > 0,
                d_hidden=d_hidden,
            )
            for level in range(num_levels)
        )
        self.last_aux_losses: dict[str, Tensor] | None = None
        self.last_gate_weights: list[Tensor] | None = None

    def extra_repr(self) -> str:
        return f"num_levels={self.num_levels}"

    def forward(self, x: Tensor) -> MultiGateOutput:
        """``x (..., d_in)`` -> per task a ``(..., d_expert)`` output and the last level's gate."""
        x_BD = flatten_tokens(x, self.d_in, "PLE")
        lead = x.shape[:-1]
        task_inputs: list[Tensor] = [x_BD] * self.num_tasks
        shared_input: Tensor | None = x_BD
        all_gates: list[Tensor] = []
        for level in self.levels:
            out = level(task_inputs, shared_input)
            task_inputs, shared_input = out.task_outputs, out.shared_output
            all_gates += out.gate_weights
            if out.shared_gate_weights is not None:
                all_gates.append(out.shared_gate_weights)
        return _finish(self, lead, out.task_outputs, out.gate_weights, all_gates)
