"""World-size-independent state of expert-parallel models: checkpoints, optimizer moments, groups
and DDP-style gradient averaging (for `moe_core.expert_parallel.ExpertParallelMoE`).

Checkpoints are ONE file, the one-process layout: `full_state_dict` all-gathers every expert
tensor over its expert-parallel group into global expert order (``experts.w_in`` is ``(E, D, H)``
with expert e at index e, never a per-rank renumbering), so a checkpoint written under expert
parallelism IS the checkpoint of the same model in one process, and `load_full_state_dict` cuts
each rank's experts out of it at any world size, 1 included (plain ``model.load_state_dict`` there).
`full_optimizer_state_dict` / `load_full_optimizer_state_dict` do the same for the optimizer's
per-parameter tensors (Adam's ``exp_avg`` / ``exp_avg_sq``), so a resume at another world size
continues with the right moments. Why one file rather than a ``torch.distributed.checkpoint``
folder: eval / predict read it in one process with no process group, the platform's integrity
check covers one file, and these models fit in one host's memory; DCP's sharded folders pay off
when rank 0 cannot hold the whole model, which is not the case here (stated in the README).

`expert_parallel_groups` builds the usual 2-D layout (expert-parallel groups of consecutive ranks,
replica groups across them); `average_gradients` averages gradients the way DDP does (the gradient
of the mean of the ranks' losses): dense parameters over the whole world, expert parameters only
over the ranks that hold the same experts (their replica group), each divided by the world size.
`data_parallel` wraps a model whose experts are split over the whole world in torch's
``DistributedDataParallel`` for its dense parameters, the experts left out of DDP's all-reduce.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from moe_core.expert_parallel import ExpertParallelMoE


def expert_parallel_layers(model: nn.Module) -> list[tuple[str, ExpertParallelMoE]]:
    """``(module name, layer)`` of every `ExpertParallelMoE` in ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ExpertParallelMoE)]


def _expert_keys(model: nn.Module) -> dict[str, ExpertParallelMoE]:
    """State-dict key -> layer, for every expert tensor split over a group."""
    keys = {}
    for name, layer in expert_parallel_layers(model):
        for pname, _ in layer.experts.named_parameters():
            keys[f"{name}.experts.{pname}" if name else f"experts.{pname}"] = layer
    return keys


def _gather(t: Tensor, layer: ExpertParallelMoE) -> Tensor:
    """This rank's experts' tensor -> all experts of the layer (dim 0, global expert order)."""
    if layer.group_size == 1:
        return t.detach().clone()
    parts = [torch.empty_like(t) for _ in range(layer.group_size)]
    dist.all_gather(parts, t.detach().contiguous(), group=layer.group)
    return torch.cat(parts)


def _cut(t: Tensor, layer: ExpertParallelMoE, key: str, local_shape: torch.Size, where: str) -> Tensor:
    expected = (layer.num_experts, *local_shape[1:])
    if tuple(t.shape) != expected:
        raise ValueError(
            f"{where}: {key} has shape {tuple(t.shape)} but this model expects {expected} (all "
            f"num_experts={layer.num_experts} experts); is it a checkpoint of another model?"
        )
    return t[layer.expert_range.start : layer.expert_range.stop]


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with every expert tensor of every expert-parallel layer gathered into
    global expert order: the one-process checkpoint. Collective: every rank calls it (each gets it)."""
    keys = _expert_keys(model)
    return {k: _gather(v, keys[k]) if k in keys else v for k, v in model.state_dict().items()}


def load_full_state_dict(model: nn.Module, state: Mapping[str, Tensor], where: str = "checkpoint") -> None:
    """Load a one-process (or `full_state_dict`) state into ``model`` at any world size: each rank
    keeps its own experts. A state of another model is a ValueError naming the first key that differs."""
    own, keys = model.state_dict(), _expert_keys(model)
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(
            f"{where} does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            f"is it a checkpoint of another model?"
        )
    local = {}
    for key, value in state.items():
        if key in keys:
            value = _cut(value, keys[key], key, own[key].shape, where)
        elif value.shape != own[key].shape:
            raise ValueError(
                f"{where}: {key} has shape {tuple(value.shape)} but this model expects "
                f"{tuple(own[key].shape)}; is it a checkpoint of another model?"
            )
        local[key] = value
    model.load_state_dict(local)


def _optimizer_params(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[Tensor, ExpertParallelMoE | None]]:
    """Every parameter of ``optimizer`` in its state-dict index order, with its layer if it is an
    expert parameter of an expert-parallel layer."""
    owner = {id(p): layer for _, layer in expert_parallel_layers(model) for p in layer.experts.parameters()}
    return [(p, owner.get(id(p))) for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with the per-parameter tensors of expert parameters (Adam's
    moments) gathered into global expert order. Collective; every rank of a group must hold state
    for the same parameters (it does after a step in which every rank ran backward)."""
    sd = optimizer.state_dict()
    state = {}
    for index, (param, layer) in enumerate(_optimizer_params(model, optimizer)):
        entry = sd["state"].get(index)
        if entry is None:
            continue
        if layer is not None:
            entry = {
                k: _gather(v, layer) if isinstance(v, Tensor) and v.dim() and v.shape == param.shape else v
                for k, v in entry.items()
            }
        state[index] = entry
    return {"state": state, "param_groups": sd["param_groups"]}


def load_full_optimizer_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer, full: Mapping, where: str = "checkpoint"
) -> None:
    """Load a one-process (or `full_optimizer_state_dict`) optimizer state at any world size."""
    params = _optimizer_params(model, optimizer)
    groups = full.get("param_groups") if isinstance(full, Mapping) else None
    if groups is None or "state" not in full or sum(len(g["params"]) for g in groups) != len(params):
        raise ValueError(
            f"{where}: the optimizer state does not fit this model's {len(params)} parameters; "
            f"is it a checkpoint of another model or optimizer?"
        )
    state = {}
    for index, entry in full["state"].items():
        param, layer = params[int(index)]
        if layer is not None:
            key = f"optimizer state of expert parameter {int(index)}"
            entry = {
                k: _cut(v, layer, key, param.shape, where)
                if isinstance(v, Tensor) and v.dim() == param.dim() and v.shape[1:] == param.shape[1:] else v
                for k, v in entry.items()
            }
        state[index] = entry
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def expert_parallel_groups(group_size: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """Split the world into expert-parallel groups of ``group_size`` consecutive ranks and the
    replica groups across them (rank r is in EP group ``r // G`` and replica group ``r % G``).
    Collective (every rank creates every group). Returns this rank's ``(group, replica_group)``,
    the two arguments of `ExpertParallelMoE` / `moe_core.expert_parallel.to_expert_parallel`."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or world % group_size:
        raise ValueError(
            f"group_size must be an int that divides the world size {world}, got {group_size!r}"
        )
    mine = {}
    for start in range(0, world, group_size):
        ranks = list(range(start, start + group_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine["group"] = group
    for offset in range(group_size):
        ranks = list(range(offset, world, group_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine["replica"] = group
    return mine["group"], mine["replica"]


def average_gradients(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """DDP's averaging after ``backward``: every gradient becomes the gradient of the mean of the
    ranks' losses. Dense parameters are summed over ``group`` (the world by default), expert
    parameters over their layer's replica group only (or not at all), then divided by the size of
    ``group``. Each kind goes in one flattened all-reduce. Every rank must have the same
    parameters with gradients. A layer split over a group smaller than ``group`` without a
    replica group is a ValueError (its experts are held by several groups, whose copies would
    otherwise be left un-averaged and drift apart)."""
    world = dist.get_world_size(group)
    for name, layer in expert_parallel_layers(model):
        if layer.replica_group is None and layer.group_size != world:
            raise ValueError(
                f"{name or 'the model'}: its experts are split over groups of {layer.group_size} of "
                f"the {world} ranks, so every expert has {world // layer.group_size} copies, but the "
                f"layer has no replica_group to average them over; build it with the replica group "
                f"that expert_parallel_groups({layer.group_size}) returns"
            )
    owner = {id(p): layer for _, layer in expert_parallel_layers(model) for p in layer.experts.parameters()}
    buckets: dict[object, list[Tensor]] = {}
    for param in model.parameters():
        if param.grad is None:
            continue
        layer = owner.get(id(param))
        target = group if layer is None else layer.replica_group
        if layer is not None and target is None:
            param.grad.div_(world)
            continue
        buckets.setdefault(target if target is not None else "world", []).append(param.grad)
    for target, grads in buckets.items():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=None if target == "world" else target)
        flat.div_(world)
        for grad, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            grad.copy_(part.view_as(grad))


def data_parallel(model: nn.Module, **ddp_options) -> DistributedDataParallel:
    """``DistributedDataParallel(model, **ddp_options)`` for the dense parameters only: the expert
    parameters of its expert-parallel layers (split over the whole world) are left out of DDP's
    broadcast and all-reduce, and their gradients, which the all-to-all backward already sums over
    every rank's tokens, are divided by the world size like DDP's mean. Same gradients as
    `average_gradients`; DDP overlaps its bucketed all-reduce with the backward. Checkpoint the
    wrapped ``.module`` with `full_state_dict`."""
    layers = expert_parallel_layers(model)
    world = dist.get_world_size()
    for _, layer in layers:
        if layer.group_size != world or layer.replica_group is not None:
            raise ValueError(
                "data_parallel takes expert-parallel layers split over the whole world; with "
                "several expert-parallel groups use average_gradients(model) after backward"
            )
    ignored = [f"{name}.experts.{pname}" if name else f"experts.{pname}"
               for name, layer in layers for pname, _ in layer.experts.named_parameters()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    for _, layer in layers:
        if not getattr(layer, "_mean_hooks", False):  # once, however often the model is wrapped
            for param in layer.experts.parameters():
                param.register_hook(lambda grad: grad / world)
            layer._mean_hooks = True
    return DistributedDataParallel(model, **ddp_options)
