"""Run a function in N local gloo processes (torch.multiprocessing spawn, a free port on 127.0.0.1),
and the layer scenarios the expert-parallel tests run in them and in one process.

``run_group(fn, nprocs, *args)`` starts the processes, each with ``torch.distributed`` initialised
(gloo, a 60 s collective timeout so a hang fails instead of blocking), runs ``fn(rank, world,
*args)`` and fails (naming the rank and its error) if any process raises or the whole run takes
longer than ``timeout`` seconds.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_core import FFN, ExpertBank, ExpertChoiceRouter, HashRouter, MoE, SwitchRouter, TopKRouter

D, H = 8, 12


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_group(fn, nprocs: int, *args, timeout: float = 180.0) -> None:
    """``fn(rank, nprocs, *args)`` in ``nprocs`` gloo processes; raises if one fails or hangs."""
    context = mp.spawn(_entry, args=(nprocs, free_port(), fn, args), nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"the {nprocs}-process group did not finish within {timeout} s")


# --- layer scenarios: name -> (builder, per-rank token counts, aux in the loss) ---------------

def _topk(E: int, k: int, cf):
    return MoE(TopKRouter(D, E, top_k=k), ExpertBank(E, D, H, bias=True), capacity_factor=cf)


def _idle_experts():
    """Top-2 of 4 where experts 2 and 3 (rank 1's) never win: positive inputs, their gate rows < 0."""
    layer = _topk(4, 2, None)
    with torch.no_grad():
        layer.router.gate.weight.abs_()
        layer.router.gate.weight[2:].neg_()
    return layer


def _shared():
    E = 4
    return MoE(TopKRouter(D, E, top_k=2), ExpertBank(E, D, H, activation="swiglu"),
               shared_experts=FFN(D, 6), capacity_factor=1.5)


SCENARIOS = {
    "topk_dropless": (lambda: _topk(4, 2, None), (7, 5), True),
    "topk_capacity": (lambda: _topk(4, 2, 0.75), (9, 6), True),
    "switch": (lambda: MoE(SwitchRouter(D, 4), ExpertBank(4, D, H), capacity_factor=1.0), (8, 8), True),
    "empty_rank": (lambda: _topk(4, 2, 1.0), (10, 0), True),
    "idle_experts": (_idle_experts, (6, 4), True),
    "shared_masked": (_shared, (6, 4), True),  # (1, N) tokens with a padding mask
    "hash": (lambda: MoE(HashRouter(D, 4, vocab_size=20), ExpertBank(4, D, H), capacity_factor=1.0), (7, 5), True),
    "expert_choice": (lambda: MoE(ExpertChoiceRouter(D, 4), ExpertBank(4, D, H)), (8, 6), False),
}


def scenario_inputs(name: str, seed: int = 0):
    """The model (seed 1), the global batch ``x`` and loss weights ``g`` (seed 2 + seed), and the
    per-rank token counts, the same in every process."""
    build, sizes, aux_in_loss = SCENARIOS[name]
    torch.manual_seed(1)
    layer = build()
    gen = torch.Generator().manual_seed(2 + seed)
    x = torch.randn(sum(sizes), D, generator=gen)
    if name == "idle_experts":
        x = x.abs()
    g = torch.randn(sum(sizes), D, generator=gen)
    return layer, x, g, sizes, aux_in_loss


def reshape_tokens(name: str, x: torch.Tensor, start: int = 0):
    """``(x, token_mask, token_ids)`` for the layer: ``shared_masked`` runs on ``(1, N, D)`` with
    every third token (by global index, from ``start``) masked as padding; ``hash`` gets token ids
    from the global index."""
    index = torch.arange(start, start + x.shape[0])
    if name == "hash":
        return x, None, index * 7 % 20
    if name != "shared_masked":
        return x, None, None
    return x.reshape(1, -1, D), (index % 3 != 2).reshape(1, -1), None


def layer_worker(rank: int, world: int, names: list[str], out_dir: str) -> None:
    """Run every scenario's expert-parallel layer on this rank's slice; save outputs and grads."""
    from moe_core.expert_parallel import ExpertParallelMoE

    results = {}
    for name in names:
        layer, x, g, sizes, aux_in_loss = scenario_inputs(name)
        ep = ExpertParallelMoE.from_moe(layer)
        start = sum(sizes[:rank])
        x_r = x[start : start + sizes[rank]].clone().requires_grad_(True)
        g_r = g[start : start + sizes[rank]]
        x_in, mask, ids = reshape_tokens(name, x_r, start)
        out = ep(x_in, token_mask=mask, token_ids=ids)
        loss = (out.output.reshape(-1, D) * g_r).sum()
        if aux_in_loss:  # every rank adds the group's aux losses: a share of 1/world each
            loss = loss + sum(out.aux_losses.values()) / world
        loss.backward()
        results[name] = {
            "output": out.output.detach().reshape(-1, D),
            "x_grad": x_r.grad,
            "router_grads": {n: p.grad for n, p in ep.router.named_parameters()},
            "expert_grads": {n: p.grad for n, p in ep.experts.named_parameters()},
            "shared_grads": {} if ep.shared_experts is None else
                            {n: p.grad for n, p in ep.shared_experts.named_parameters()},
            "aux": {k: v.detach() for k, v in out.aux_losses.items()},
            "stats": out.stats,
            "expert_range": ep.expert_range,
        }
    layer, x, g, sizes, _ = scenario_inputs("topk_capacity")  # bf16 weights and tokens
    ep = ExpertParallelMoE.from_moe(layer.to(torch.bfloat16))
    start = sum(sizes[:rank])
    x_r = x[start : start + sizes[rank]].bfloat16().requires_grad_(True)
    out = ep(x_r)
    (out.output.float() * g[start : start + sizes[rank]]).sum().backward()
    results["bf16"] = {"output": out.output.detach(), "x_grad": x_r.grad}
    try:
        ExpertParallelMoE.from_moe(MoE(TopKRouter(D, 3), ExpertBank(3, D, H)))
        results["bad_world"] = None
    except ValueError as err:
        results["bad_world"] = str(err)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
