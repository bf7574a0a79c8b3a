"""A tiny MoE model trained with Adam in one process and in 2 gloo processes (expert parallel, or
data parallel with replicated experts), with world-size-independent checkpoints in between: the
model, batches and the 2-process worker of tests/moe_core/test_expert_parallel_state.py, and the
4-process sub-group worker of tests/moe_core/test_expert_parallel_groups.py."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed_helpers import D, H
from torch import nn

from moe_core import ExpertBank, MoE, TopKRouter, collect_aux_losses, weighted_aux_loss

STEPS, SAVE_AT, BATCH, LR = 6, 3, 16, 1e-2
AUX = {"load_balance": 0.01, "z_loss": 0.001, "importance": 0.01}
MODES = {"ep": (1.25, AUX), "dp": (None, {}), "ddp": (1.25, AUX)}
"""mode -> (capacity factor, aux coefficients): ``ep`` splits the 4 experts over the 2 ranks
(capacity and aux losses over the 16 tokens of the group); ``dp`` keeps all experts on every rank
(groups of 1) and averages their gradients over the replica group; its capacity and aux losses
would count each rank's 8 tokens only, so it runs dropless without aux losses; ``ddp`` is ``ep``
under torch's DistributedDataParallel (`data_parallel`) instead of `average_gradients`."""


class TinyModel(nn.Module):
    """``head(h + moe(h))`` with ``h = tanh(inp(x))``: no dropout, no batch statistics."""

    def __init__(self, capacity_factor: float | None) -> None:
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.moe = MoE(TopKRouter(D, 4, top_k=2), ExpertBank(4, D, H, bias=True), capacity_factor=capacity_factor)
        self.head = nn.Linear(D, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        return self.head(h + self.moe(h).output).squeeze(-1)


def build(mode: str) -> TinyModel:
    torch.manual_seed(3)
    model = TinyModel(MODES[mode][0])
    model.aux_coefficients = MODES[mode][1]
    return model


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, D, generator=gen)
    return x, x[:, 0] * x[:, 1] + 0.1 * torch.randn(BATCH, generator=gen)


def losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(task loss: the MSE of this process's batch, aux term: the layer's weighted aux losses)."""
    task = F.mse_loss(model(x), y)
    return task, weighted_aux_loss(collect_aux_losses(model), model.aux_coefficients)


def train_one_process(model, optimizer, steps) -> list[float]:
    logged = []
    for step in steps:
        task, aux = losses(model, *batch(step))
        optimizer.zero_grad()
        (task + aux).backward()
        optimizer.step()
        logged.append((task + aux).item())
    return logged


def _train_group(model, optimizer, steps, rank: int, world: int, ddp: bool = False, grads: dict | None = None) -> list[float]:
    """Each rank its share of the global batch; DDP-style averaged gradients; the logged loss is
    the global one (mean of the ranks' task losses + the group's aux term). ``grads`` (a dict)
    receives the synchronised gradients of step 0."""
    from moe_core.expert_parallel_state import average_gradients

    share = BATCH // world
    logged = []
    for step in steps:
        x, y = batch(step)
        task, aux = losses(model, x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share])
        optimizer.zero_grad()
        (task + aux).backward()
        if not ddp:
            average_gradients(model)
        if step == 0 and grads is not None:
            grads.update({n.removeprefix("module."): p.grad.clone() for n, p in model.named_parameters()})
        optimizer.step()
        global_task = task.detach().clone()
        dist.all_reduce(global_task)
        logged.append((global_task / world + aux).item())
    return logged


def _probe(model, rank: int, world: int) -> torch.Tensor:
    x, _ = batch(999)
    share = BATCH // world
    with torch.no_grad():
        return model(x[rank * share : (rank + 1) * share])


def train_worker(rank: int, world: int, out_dir: str) -> None:
    """Both modes from scratch (losses of every step; the ``ep`` run also saves a full checkpoint
    after SAVE_AT steps), then the ``ep`` model resumed from the one-process checkpoint."""
    from moe_core.expert_parallel import to_expert_parallel
    from moe_core.expert_parallel_state import (
        average_gradients,
        data_parallel,
        expert_parallel_groups,
        full_optimizer_state_dict,
        full_state_dict,
        load_full_optimizer_state_dict,
        load_full_state_dict,
    )

    results = {}
    for mode in MODES:
        if mode == "ddp":
            model = data_parallel(to_expert_parallel(build(mode)))
            model.aux_coefficients = model.module.aux_coefficients
        else:
            group, replica = expert_parallel_groups(world if mode == "ep" else 1)
            model = to_expert_parallel(build(mode), group, replica)
        optimizer = torch.optim.Adam(model.parameters(), lr=LR)
        ddp = mode == "ddp"
        results[f"{mode}_grads"] = {}
        logged = _train_group(model, optimizer, range(SAVE_AT), rank, world, ddp, results[f"{mode}_grads"])
        if mode == "ep":
            state = {"model": full_state_dict(model), "optimizer": full_optimizer_state_dict(model, optimizer)}
            if rank == 0:
                torch.save(state, os.path.join(out_dir, "ep_ckpt.pt"))
            results["ep_probe"] = _probe(model, rank, world)
        logged += _train_group(model, optimizer, range(SAVE_AT, STEPS), rank, world, ddp)
        results[f"{mode}_losses"] = logged

    model = to_expert_parallel(build("ep"))
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    one = torch.load(os.path.join(out_dir, "one_ckpt.pt"), weights_only=True)
    load_full_state_dict(model, one["model"])
    load_full_optimizer_state_dict(model, optimizer, one["optimizer"])
    results["resumed_probe"] = _probe(model, rank, world)
    results["resumed_losses"] = _train_group(model, optimizer, range(SAVE_AT, STEPS), rank, world)
    wrong = dict(one["model"], **{"moe.experts.w_in": torch.zeros(8, D, H)})
    try:
        load_full_state_dict(model, wrong)
        results["wrong_model"] = None
    except ValueError as err:
        results["wrong_model"] = str(err)
    # groups of 1 (each rank holds all experts) without the replica group that averages them
    group, _ = expert_parallel_groups(1)
    model = to_expert_parallel(build("dp"), group, None)
    task, aux = losses(model, *batch(rank))
    (task + aux).backward()
    try:
        average_gradients(model)
        results["no_replica_group"] = None
    except ValueError as err:
        results["no_replica_group"] = str(err)
    torch.save(results, os.path.join(out_dir, f"train_rank{rank}.pt"))


def subgroup_worker(rank: int, world: int, out_dir: str) -> None:
    """World 4 as 2 expert-parallel groups of 2 ranks ({0, 1}, {2, 3}; replicas {0, 2}, {1, 3}):
    one SGD-with-momentum step of the ``ep`` model on this rank's quarter of the batch with
    `average_gradients`; saves the synchronised gradients and the full checkpoint after the step
    (SGD, not Adam: Adam's first step is lr * sign(grad) for gradients near 0, which turns rounding
    differences of 1e-9 into 1e-2)."""
    from moe_core.expert_parallel import to_expert_parallel
    from moe_core.expert_parallel_state import (
        average_gradients,
        expert_parallel_groups,
        full_optimizer_state_dict,
        full_state_dict,
    )

    group, replica = expert_parallel_groups(2)
    model = to_expert_parallel(build("ep"), group, replica)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    share = BATCH // world
    x, y = batch(0)
    task, aux = losses(model, x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share])
    optimizer.zero_grad()
    (task + aux).backward()
    average_gradients(model)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    state = {"model": full_state_dict(model), "optimizer": full_optimizer_state_dict(model, optimizer)}
    torch.save({"grads": grads, "state": state, "expert_range": model.moe.expert_range},
               os.path.join(out_dir, f"subgroup_rank{rank}.pt"))
