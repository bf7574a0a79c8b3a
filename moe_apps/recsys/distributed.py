"""The recsys model under ``torchrun``: its embedding tables sharded by torchrec's
`DistributedModelParallel` (DMP), the dense layers data-parallel (torch DDP, which DMP applies), as
the `Distribute` function the shared loop takes (`moe_apps.training.distributed`, issue 12).

What runs where (2 gloo processes on CPU, torch 2.14.1 / torchrec 1.9.2 / fbgemm-gpu-cpu 1.9.0;
tests/moe_apps/recsys/test_recsys_distributed.py):

* sharding types: ``table_wise`` (the default), ``row_wise``, ``column_wise``, ``table_row_wise``
  and ``data_parallel`` all train on CPU/gloo with the DENSE compute kernel and match one process.
  ``table_wise`` is the default: each table lives whole on one rank (largest first onto the
  least-loaded rank), one all-to-all each way per lookup, no table straddles ranks; ``row_wise`` /
  ``table_row_wise`` split every table by rows (for tables too big for one process);
  ``column_wise`` splits widths in equal blocks (a table whose width the world size does not
  divide, e.g. a 3-task bias table on 2 ranks, stays table-wise).
* compute kernels: only DENSE trains here. The FUSED kernel (fbgemm's table-batched embeddings with
  the optimizer fused into backward: ``fused_params`` / ``apply_optimizer_in_backward``) refuses
  Adam on CPU ("Optimizer adam is not supported in CPU mode") and wants widths divisible by 4 (the
  bias tables are T wide); FUSED_UVM / FUSED_UVM_CACHING and NCCL need GPUs. On GPUs the usual
  recipe is FUSED with a fused per-table optimizer (e.g. row-wise Adagrad): not done or run here.
* optimizer: with DENSE kernels each local table block is an ordinary parameter (a
  ``TableBatchedEmbeddingSlice`` view of fbgemm's weights) with a ``.grad``, so the loop's own
  AdamW (weight decay, lr schedule) trains the blocks and the dense layers as in one process
  (``make_optimizer`` stays None). torchrec divides the embedding gradients coming back through the
  all-to-all by the world size, as DDP averages the dense ones: N processes on N local batches
  step like one process on their concatenation. DDP runs with ``static_graph=False``: torchrec's
  default static graph skips the first step's all-reduce when the output is not a pytree
  (`RecsysOutput` is a dataclass) and the ranks' dense weights part.
* gradient clipping: the table blocks are the `DistributedModel`'s ``sharded_parameters``, so the
  loop's norm sums their squares over every rank and counts the (averaged, replicated) dense
  gradients once: the norm and the clipped step equal one process's (tested with clipping that
  bites, every sharding type).

State: `full_state_dict` gathers every block (``ShardedTensor`` local shards, all-gathered as
objects) into the plain model's one-process state dict (same keys, full tables) on every rank;
`load_full_state_dict` cuts a full one into this rank's blocks, so checkpoints do not depend on the
world size and ``moe-apps recsys eval`` reads them in one process. AdamW's moments are gathered and
cut the same way, in the layout of a one-process optimizer over the plain model (parameters
numbered group by group in the model's order).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec import EmbeddingBagCollection

from moe_apps.training.distributed import DistContext, DistributedModel

SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel")
DEFAULT_SHARDING = "table_wise"

Pieces = dict[str, list[tuple[tuple[int, ...], Tensor]]]  # key -> [(offsets, local block)]


def embedding_collections(model: nn.Module) -> list[tuple[str, EmbeddingBagCollection]]:
    """The model's torchrec collections by module path (the recsys model: encoder.embeddings and
    encoder.biases; one pair per task network for ``single``)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, EmbeddingBagCollection)]


def sharding_plan(model: nn.Module, world_size: int, sharding: str = DEFAULT_SHARDING) -> Any:
    """torchrec's `ShardingPlan` putting every table of ``model`` under ``sharding`` (DENSE kernel).

    ``table_wise``: tables largest (rows x width) first, each onto the rank with the fewest
    elements so far (ties: the lowest rank). ``column_wise``: a table whose width ``world_size``
    divides is split in equal column blocks over all ranks, the others are placed table-wise."""
    from torchrec.distributed.sharding_plan import (
        column_wise,
        construct_module_sharding_plan,
        data_parallel,
        row_wise,
        table_row_wise,
        table_wise,
    )
    from torchrec.distributed.types import ShardingPlan

    if sharding not in SHARDING_TYPES:
        raise ValueError(f"sharding must be one of {SHARDING_TYPES}, got {sharding!r}")
    collections = embedding_collections(model)
    if not collections:
        raise ValueError("the model has no torchrec EmbeddingBagCollection to shard")
    tables = [(path, cfg) for path, ebc in collections for cfg in ebc.embedding_bag_configs()]
    load, owner = [0] * world_size, {}
    for path, cfg in sorted(tables, key=lambda t: -t[1].num_embeddings * t[1].embedding_dim):
        rank = min(range(world_size), key=lambda r: load[r])
        owner[(path, cfg.name)] = rank
        load[rank] += cfg.num_embeddings * cfg.embedding_dim

    def generator(path: str, cfg: Any) -> Any:
        if sharding == "row_wise":
            return row_wise()
        if sharding == "table_row_wise":
            return table_row_wise(host_index=0)  # one host: its ranks split the rows
        if sharding == "data_parallel":
            return data_parallel()
        if sharding == "column_wise" and cfg.embedding_dim % world_size == 0:
            return column_wise(size_per_rank=[cfg.embedding_dim // world_size] * world_size)
        return table_wise(rank=owner[(path, cfg.name)])

    plan = {
        path: construct_module_sharding_plan(
            ebc, {cfg.name: generator(path, cfg) for cfg in ebc.embedding_bag_configs()},
            local_size=world_size, world_size=world_size, device_type="cpu")
        for path, ebc in collections
    }
    return ShardingPlan(plan)


def describe_plan(plan: Any, world_size: int) -> str:
    """One line: which tables each rank holds a block of, and how they are cut."""
    kinds = sorted({p.sharding_type for module in plan.plan.values() for p in module.values()})
    held: dict[int, list[str]] = {r: [] for r in range(world_size)}
    for module in plan.plan.values():
        for table, p in module.items():
            for rank in sorted(set(p.ranks if p.ranks is not None else range(world_size))):
                held[rank].append(table)
    ranks = "; ".join(f"rank {r}: {', '.join(sorted(t))}" for r, t in held.items())
    return f"torchrec DistributedModelParallel ({', '.join(kinds)}, dense kernel) over {world_size} processes; {ranks}"


# ----- state: full <-> this rank's shards ----------------------------------------------------------
def _local_pieces(state: Mapping[str, Any], rank: int) -> tuple[Pieces, dict[str, tuple[torch.Size, torch.dtype]]]:
    """This rank's blocks of every entry (a replicated tensor: rank 0's only) and each full shape."""
    pieces: Pieces = {}
    shapes = {}
    for key, value in state.items():
        if isinstance(value, ShardedTensor):
            shapes[key] = (value.size(), value.dtype)
            pieces[key] = [(tuple(s.metadata.shard_offsets), s.tensor.detach().cpu().clone())
                           for s in value.local_shards()]
        elif isinstance(value, Tensor):
            shapes[key] = (value.shape, value.dtype)
            pieces[key] = [((0,) * value.dim(), value.detach().cpu().clone())] if rank == 0 else []
        else:
            raise TypeError(f"state entry {key} is a {type(value).__name__}, not a tensor or ShardedTensor")
    return pieces, shapes


def _block(offsets: tuple[int, ...], shape: torch.Size) -> tuple[slice, ...]:
    return tuple(slice(o, o + n) for o, n in zip(offsets, shape, strict=True))


def _assemble(all_pieces: list[Pieces], shapes: Mapping[str, tuple[torch.Size, torch.dtype]]) -> dict[str, Tensor]:
    full = {}
    for key, (shape, dtype) in shapes.items():
        out = torch.zeros(shape, dtype=dtype)
        for pieces in all_pieces:
            for offsets, block in pieces.get(key, []):
                out[_block(offsets, block.shape)] = block
        full[key] = out
    return full


def _gather(obj: Any) -> list[Any]:
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """COLLECTIVE: the one-process state dict of a DMP-sharded ``model`` (plain keys, full tables,
    CPU tensors), on every rank."""
    pieces, shapes = _local_pieces(model.state_dict(), dist.get_rank())
    return _assemble(_gather(pieces), shapes)


def load_full_state_dict(model: nn.Module, state: Mapping[str, Tensor], where: str = "checkpoint") -> None:
    """Copy a one-process state dict into this rank's shards and replicated tensors (every rank
    calls it with the same ``state``); ValueError naming the first mismatch, before any copy."""
    local = model.state_dict()
    missing, unexpected = sorted(set(local) - set(state)), sorted(set(state) - set(local))
    if missing or unexpected:
        raise ValueError(f"the {where} does not fit this recsys model: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}; was it made with another config?")
    for key, value in local.items():
        if tuple(value.shape) != tuple(state[key].shape):
            raise ValueError(f"the {where} holds {key} of shape {tuple(state[key].shape)}, the model "
                             f"{tuple(value.shape)}; was it made with another config or data?")
    with torch.no_grad():
        for key, value in local.items():
            full = state[key]
            if isinstance(value, ShardedTensor):
                for shard in value.local_shards():
                    block = _block(tuple(shard.metadata.shard_offsets), shard.tensor.shape)
                    shard.tensor.copy_(full[block])
            else:
                value.copy_(full)


def _layout(model: nn.Module) -> tuple[set[str], dict[str, tuple[int, ...]]]:
    """(keys of the sharded tables, key -> offsets of this rank's one block of each it holds a
    block of); table-wise sharding leaves a rank an empty parameter for every table it lacks."""
    sharded, offsets = set(), {}
    for key, value in model.state_dict().items():
        if not isinstance(value, ShardedTensor):
            continue
        sharded.add(key)
        shards = value.local_shards()
        if len(shards) > 1:
            raise ValueError(f"{key} has {len(shards)} blocks on this rank; one is supported")
        if shards:
            offsets[key] = tuple(shards[0].metadata.shard_offsets)
    return sharded, offsets


def _group_names(model: nn.Module, optimizer: torch.optim.Optimizer, plain: list[str]) -> list[list[str]]:
    """COLLECTIVE: per optimizer group, the names of its parameters on any rank, in model order."""
    names = {id(p): n for n, p in model.named_parameters()}
    local = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    order = {n: i for i, n in enumerate(plain)}
    merged = [sorted(set().union(*(g[i] for g in _gather(local))), key=order.__getitem__)
              for i in range(len(local))]
    return merged


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer,
                              plain: list[str]) -> dict:
    """COLLECTIVE: the optimizer's state dict as one process training the plain model would hold
    it: every table's moments full-sized, parameters numbered group by group in ``plain`` order."""
    rank, (sharded, offsets) = dist.get_rank(), _layout(model)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = _group_names(model, optimizer, plain)
    pieces: dict[str, dict[str, Any]] = {}  # name -> state key -> [(offsets, block)] or a value
    for group in optimizer.param_groups:
        for param in group["params"]:
            name, state = names[id(param)], optimizer.state.get(param, {})
            if (name in sharded and name not in offsets) or (name not in sharded and rank != 0):
                continue  # no block of this table here, or replicated: rank 0's copy
            at = offsets.get(name, (0,) * param.dim())
            pieces[name] = {k: [(at, v.detach().cpu().clone())] if _param_shaped(v, param)
                            else (v.detach().cpu().clone() if isinstance(v, Tensor) else v)
                            for k, v in state.items()}
    shapes = {n: tuple(v.size()) for n, v in model.state_dict().items() if n in set(plain)}
    gathered = _gather(pieces)
    state, index = {}, 0
    out_groups = []
    for local_group, members in zip(optimizer.param_groups, groups, strict=True):
        ids = []
        for name in members:
            entries: dict[str, Any] = {}
            for rank_pieces in gathered:
                for k, v in rank_pieces.get(name, {}).items():
                    if isinstance(v, list):
                        block = entries.setdefault(k, torch.zeros(shapes[name], dtype=v[0][1].dtype))
                        for at, piece in v:
                            block[_block(at, piece.shape)] = piece
                    else:
                        entries.setdefault(k, v)
            if entries:
                state[index] = entries
            ids.append(index)
            index += 1
        out_groups.append({**{k: v for k, v in local_group.items() if k != "params"}, "params": ids})
    return {"state": state, "param_groups": out_groups}


def _param_shaped(value: Any, param: Tensor) -> bool:
    return isinstance(value, Tensor) and value.dim() > 0 and value.shape == param.shape


def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                                   plain: list[str]) -> None:
    """COLLECTIVE: load a one-process optimizer state dict (as `full_optimizer_state_dict` makes
    it, or a one-process run saved it) into this rank's optimizer, cutting each table's moments."""
    groups = _group_names(model, optimizer, plain)
    saved = state["param_groups"]
    if [len(g["params"]) for g in saved] != [len(g) for g in groups]:
        raise ValueError(f"the checkpoint's optimizer has groups of {[len(g['params']) for g in saved]} "
                         f"parameters, this model {[len(g) for g in groups]}; was it made with another config?")
    full_index = {name: index for members, g in zip(groups, saved, strict=True)
                  for name, index in zip(members, g["params"], strict=True)}
    (sharded, offsets), names = _layout(model), {id(p): n for n, p in model.named_parameters()}
    local_state, local_groups, index = {}, [], 0
    for group, saved_group in zip(optimizer.param_groups, saved, strict=True):
        ids = []
        for param in group["params"]:
            name = names[id(param)]
            entries = state["state"].get(full_index[name])
            if entries is not None and (name not in sharded or name in offsets):
                at = offsets.get(name, (0,) * param.dim())
                local_state[index] = {  # copies: a state dict may share tensors with its optimizer
                    k: (v[_block(at, param.shape)] if v.dim() > 0 and v.dim() == param.dim() else v).clone()
                    if isinstance(v, Tensor) else v
                    for k, v in entries.items()}
            ids.append(index)
            index += 1
        local_groups.append({**{k: v for k, v in saved_group.items() if k != "params"}, "params": ids})
    optimizer.load_state_dict({"state": local_state, "param_groups": local_groups})


# ----- the Distribute function ----------------------------------------------------------------------
def torchrec_model_parallel(model: nn.Module, ctx: DistContext, *,
                            sharding: str = DEFAULT_SHARDING) -> DistributedModel:
    """Shard ``model``'s torchrec tables over the default process group with
    `DistributedModelParallel` (in place: ``model`` then holds this rank's shards) and start from
    its current weights on every rank, so the run starts where one process would."""
    from torchrec.distributed.model_parallel import (
        DefaultDataParallelWrapper,
        DistributedModelParallel,
    )
    from torchrec.distributed.types import ShardingEnv

    if not dist.is_initialized() or dist.get_world_size() != ctx.world_size:
        raise ValueError("torchrec_model_parallel needs the default process group of the context "
                         "(moe_apps.training.distributed.current_context())")
    plain = [n for n, p in model.named_parameters() if p.requires_grad]
    initial = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    device = next(model.parameters()).device
    plan = sharding_plan(model, ctx.world_size, sharding)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        # DDP's static-graph mode (torchrec's default) skips the first step's all-reduce when the
        # output is not a pytree (RecsysOutput is a dataclass): the ranks' dense weights would part
        dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.group.WORLD),
                                       device=device, plan=plan,
                                       data_parallel_wrapper=DefaultDataParallelWrapper(static_graph=False))
    load_full_state_dict(model, initial, where="initial state")
    sharded_keys = _layout(model)[0]
    return DistributedModel(
        sharded_parameters=tuple(p for n, p in model.named_parameters() if n in sharded_keys),
        module=dmp,
        full_state_dict=partial(full_state_dict, model),
        load_full_state_dict=partial(load_full_state_dict, model),
        full_optimizer_state_dict=lambda optimizer: full_optimizer_state_dict(model, optimizer, plain),
        load_full_optimizer_state_dict=lambda optimizer, state: load_full_optimizer_state_dict(
            model, optimizer, state, plain),
    )
