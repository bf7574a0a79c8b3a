"""The training loop under ``torchrun``: the process context, how a model is distributed, and the
per-rank pieces `moe_apps.training.loop.fit` uses (data parallelism, Li et al. 2020, "PyTorch
Distributed"; expert parallelism as in GShard, Lepikhin et al. 2021, via `moe_core.expert_parallel`).

`current_context()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and initialises the
default process group once (gloo for CPU tensors, plus nccl for CUDA tensors when CUDA is present).
Without torchrun (WORLD_SIZE unset or 1) it returns ``DistContext()`` and touches nothing, and
`RankSync` does exactly what one process always did.

A `Distribute` function turns the app's model into a `DistributedModel`: the module the loop runs
forward/backward on, and world-size-independent (collective) state-dict functions. The default,
`data_parallel_model`, wraps the model in torch's DistributedDataParallel for its dense parameters;
the experts of layers the app converted with `moe_core.to_expert_parallel` (split over the whole
world) stay out of DDP, their gradients already summed over every rank's tokens by the all-to-all
backward and divided by the world size (`moe_core.expert_parallel_state.data_parallel`). Experts
that are not expert-parallel (vision's conv experts) are plain replicated parameters under DDP.

The loop's rules under N processes (see `RankSync`):
- data: rank r trains on batches r, r+N, r+2N, ... of ``train_batches(epoch)``; every rank takes
  ``len // N`` steps per epoch (the last ``len % N`` batches of each epoch are dropped), so the
  global batch is N times the app's batch and an epoch still covers the data once;
- the logged training sums are means over the ranks; validation runs on every rank (an
  expert-parallel forward is collective) and rank 0's metrics decide best epoch and early stopping;
- only rank 0 writes files; checkpoints hold the FULL state (one-process keys, every expert, Adam's
  moments of every expert), so they load in one process or resume at any world size; position is
  counted in optimizer steps, so a resume at another world size continues at the same step (exact
  when the global batch is kept, i.e. the app's batch scaled by old N / new N);
- each rank > 0 draws its own random numbers (dropout, augmentation) from a seed of (seed, rank).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moe_apps.training.runtime import build_optimizer, rng_state, set_rng_state, set_seed


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a torchrun job (the defaults: one process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current_context() -> DistContext:
    """From torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK). WORLD_SIZE unset or 1 -> DistContext().
    Otherwise initialises the default process group once (gloo on CPU, nccl for CUDA tensors when
    CUDA is available) and returns the context."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return DistContext()
    ctx = DistContext(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(ctx.local_rank)
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return ctx


@contextmanager
def main_process_first(ctx: DistContext) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. writes a file), then the other ranks run it (e.g. read
    it). A no-op in one process."""
    if ctx.enabled and not ctx.is_main:
        dist.barrier()
    yield
    if ctx.enabled and ctx.is_main:
        dist.barrier()


def rank_device(device: torch.device, ctx: DistContext) -> torch.device:
    """``cuda`` without an index means this rank's GPU (LOCAL_RANK) under torchrun."""
    if ctx.enabled and device.type == "cuda" and device.index is None:
        return torch.device("cuda", ctx.local_rank)
    return device


@dataclass
class DistributedModel:
    """A model made ready for N processes by a `Distribute` function (docs/ARCHITECTURE.md)."""

    module: nn.Module
    full_state_dict: Callable[[], dict[str, Tensor]]
    load_full_state_dict: Callable[[Mapping[str, Tensor]], None]
    make_optimizer: Callable[[Callable[[Iterable], torch.optim.Optimizer]], torch.optim.Optimizer] | None = None
    full_optimizer_state_dict: Callable[[torch.optim.Optimizer], dict] | None = None
    load_full_optimizer_state_dict: Callable[[torch.optim.Optimizer, dict], None] | None = None
    sharded_parameters: tuple[Tensor, ...] = ()  # this rank's own blocks of bigger tensors (torchrec's
    # sharded tables): the gradient norm sums their squares over every rank, not once


Distribute = Callable[[nn.Module, DistContext], DistributedModel]


def data_parallel_model(model: nn.Module, ctx: DistContext) -> DistributedModel:
    """The default: torch DDP over the dense parameters; ExpertParallelMoE experts (if the app
    converted its layers with moe_core.to_expert_parallel) are left out of DDP and reduced over
    their replica group; state dicts via moe_core.expert_parallel_state."""
    from torch.nn.parallel import DistributedDataParallel

    from moe_core.expert_parallel_state import (
        data_parallel,
        expert_parallel_layers,
        full_optimizer_state_dict,
        full_state_dict,
        load_full_optimizer_state_dict,
        load_full_state_dict,
    )

    device = next(model.parameters()).device
    options = {"device_ids": [device.index]} if device.type == "cuda" else {}
    if expert_parallel_layers(model):
        module: nn.Module = data_parallel(model, **options)
    else:
        module = DistributedDataParallel(model, **options)
    return DistributedModel(
        module=module,
        full_state_dict=lambda: full_state_dict(model),
        load_full_state_dict=lambda state: load_full_state_dict(model, state),
        full_optimizer_state_dict=lambda optimizer: full_optimizer_state_dict(model, optimizer),
        load_full_optimizer_state_dict=lambda optimizer, state: load_full_optimizer_state_dict(model, optimizer, state),
    )


def clip_grad_norm_(model: nn.Module, params: list[Tensor], max_norm: float,
                    sharded: Iterable[Tensor] = ()) -> Tensor:
    """`torch.nn.utils.clip_grad_norm_` over the WHOLE model when parameters are split over ranks:
    the squared norms of each rank's expert gradients are summed over their group, those of the
    ``sharded`` blocks (torchrec's tables) over the world, the dense ones (equal on every rank
    after the all-reduce) counted once. Returns the total norm."""
    from moe_core.expert_parallel_state import expert_parallel_layers

    layers = expert_parallel_layers(model)
    sharded_ids = {id(p) for p in sharded}
    if not layers and not sharded_ids:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    owner = {id(p): layer for _, layer in layers for p in layer.experts.parameters()}
    grads = [p.grad for p in params if p.grad is not None]
    device = grads[0].device
    total = torch.zeros((), dtype=torch.float32, device=device)
    by_group: dict[int, tuple[Any, Tensor]] = {}
    if sharded_ids:  # every rank joins this all-reduce, also one that holds no block
        by_group[id(dist.group.WORLD)] = (dist.group.WORLD, torch.zeros_like(total))
    for param in params:
        if param.grad is None:
            continue
        squared = param.grad.detach().float().pow(2).sum()
        layer = owner.get(id(param))
        if id(param) in sharded_ids:
            group = dist.group.WORLD
        elif layer is not None:
            group = layer.group
        else:
            total = total + squared
            continue
        group, acc = by_group.get(id(group), (group, torch.zeros_like(total)))
        by_group[id(group)] = (group, acc + squared)
    for group, squared in by_group.values():
        dist.all_reduce(squared, group=group)
        total = total + squared
    norm = total.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, scale.to(grads[0].dtype))
    return norm


class RankSync:
    """What the loop does differently on rank ``ctx.rank`` of N; in one process (``dm`` None) every
    method is exactly what the loop did before distribution existed."""

    def __init__(self, ctx: DistContext, dm: DistributedModel | None, model: nn.Module, seed: int) -> None:
        self.ctx, self.dm, self.model, self.seed = ctx, dm, model, seed
        self.net = model if dm is None else dm.module  # what forward/backward run on

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    def clip_grad_norm_(self, params: list[Tensor], max_norm: float) -> Tensor:
        if self.dm is None:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        return clip_grad_norm_(self.model, params, max_norm, self.dm.sharded_parameters)

    # ----- data and random numbers -----------------------------------------------------------
    def steps_per_epoch(self, batches: int) -> int:
        if batches < self.ctx.world_size:
            raise ValueError(f"train_batches(0) gave {batches} batches, fewer than the "
                             f"{self.ctx.world_size} processes; use fewer processes or smaller batches")
        return batches // self.ctx.world_size

    def shard(self, batches: Iterable[Any], steps: int) -> Iterable[Any]:
        """Rank r's batches: r, r+N, ... (``steps`` of them; the epoch's remainder dropped)."""
        if self.dm is None:
            return batches
        return islice(batches, self.ctx.rank, steps * self.ctx.world_size, self.ctx.world_size)

    def seed_rank(self) -> None:
        """Ranks > 0 draw other dropout masks / augmentations than rank 0 (rank 0 keeps ``seed``)."""
        if self.dm is not None and not self.is_main:
            set_seed((self.seed * 1_000_003 + self.ctx.rank) % 2**63)

    def rng_entries(self) -> dict[str, Any]:
        """Checkpoint entries of the random state: rank 0's ``rng`` (what one process reads) and,
        under N processes, every rank's (``rng_by_rank``). Collective."""
        state = rng_state()
        if self.dm is None:
            return {"rng": state}
        states: list[Any] = [None] * self.ctx.world_size
        dist.all_gather_object(states, state)
        return {"rng": states[0], "rng_by_rank": states}

    def restore_rng(self, saved: Mapping[str, Any], global_step: int) -> None:
        """This rank's saved random state; a rank the checkpoint had no state for (the world
        grew) draws from a seed of (seed, rank, step)."""
        by_rank = saved.get("rng_by_rank") or [saved["rng"]]
        if self.ctx.rank < len(by_rank):
            set_rng_state(by_rank[self.ctx.rank])
        else:
            set_seed((self.seed * 1_000_003 + self.ctx.rank * 7919 + global_step) % 2**63)

    # ----- collectives on numbers ------------------------------------------------------------
    def mean_over_ranks(self, sums: dict[str, Tensor]) -> dict[str, Tensor]:
        """The ranks' mean of each running sum (keys in sorted order, one all-reduce). Setting
        every rank's sums to it keeps their total, so it may be called at any step."""
        if self.dm is None or not sums:
            return sums
        keys = sorted(sums)
        flat = torch.stack([sums[k].reshape(()) for k in keys])
        dist.all_reduce(flat)
        flat = flat / self.ctx.world_size
        return {k: flat[i] for i, k in enumerate(keys)}

    def agree(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (validation metrics: one decision for all)."""
        if self.dm is None:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.dm is not None:
            dist.barrier()

    # ----- full state ------------------------------------------------------------------------
    def model_state(self) -> dict[str, Tensor]:
        """The one-process state dict (collective under N processes)."""
        return self.model.state_dict() if self.dm is None else self.dm.full_state_dict()

    def load_model_state(self, state: Mapping[str, Tensor]) -> None:
        if self.dm is None:
            self.model.load_state_dict(state)
        else:
            self.dm.load_full_state_dict(state)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        if self.dm is None or self.dm.full_optimizer_state_dict is None:
            return optimizer.state_dict()
        return self.dm.full_optimizer_state_dict(optimizer)

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        if self.dm is None or self.dm.load_full_optimizer_state_dict is None:
            optimizer.load_state_dict(state)
        else:
            self.dm.load_full_optimizer_state_dict(optimizer, state)

    def full_of(self, local: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """A state of the plain model in this rank's layout (a weight average) -> the full one
        (collective): the model holds it while `model_state` gathers it."""
        if self.dm is None:
            return dict(local)
        kept = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(local)
        try:
            return self.dm.full_state_dict()
        finally:
            self.model.load_state_dict(kept)

    def local_of(self, full: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """A full state -> this rank's layout (the inverse of `full_of`)."""
        if self.dm is None:
            return dict(full)
        kept = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.dm.load_full_state_dict(full)
        try:
            return {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        finally:
            self.model.load_state_dict(kept)

    def make_optimizer(self, config: Any, param_groups: Callable[[nn.Module], list[dict]] | None) -> torch.optim.Optimizer:
        """The loop's optimizer (`build_optimizer` over the plain model), or, when the model's
        `DistributedModel` has ``make_optimizer``, what it builds around the loop's optimizer over
        the parameters it passes (the app's param groups kept for those)."""
        if self.dm is None or self.dm.make_optimizer is None:
            return build_optimizer(self.model, config, param_groups)

        def factory(params: Iterable) -> torch.optim.Optimizer:
            params = list(params)
            wanted = {id(p) for p in params}
            holder = nn.Module()
            holder.params = nn.ParameterList(params)
            groups = None
            if param_groups is not None:
                specs = param_groups(self.model)
                groups = lambda _: [dict(s, params=[p for p in s["params"] if id(p) in wanted]) for s in specs]  # noqa: E731
            return build_optimizer(holder, config, groups)

        return self.dm.make_optimizer(factory)
