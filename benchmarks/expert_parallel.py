"""Benchmark: the expert-parallel MoE layer on N local gloo processes against one process.

For each process count P (``--nprocs``, default ``1,2``) the script starts P processes (torch's
``multiprocessing.spawn``, gloo on 127.0.0.1, ``--threads`` torch threads each, default 1: one core
per rank, as one device per rank; on a shared machine a 2-thread process also loses badly to
OpenMP threads waiting for a busy core), builds the same `moe_core.MoE` (same seed) in every one (P = 1: that layer itself; P > 1:
`ExpertParallelMoE.from_moe`, the E experts split over the P ranks), gives each rank ``T / P`` of
the same global batch of T tokens and times ``--steps`` training steps (forward, backward,
`average_gradients`, Adam) after ``--warmup`` ones. It reports

* ``tokens_per_s`` per process count: global tokens per second of training steps;
* ``all_to_all_share`` per process count: the fraction of the step time spent inside the MoE
  layer's collectives (the token all-to-alls forward and backward, plus the small exchanges of the
  slot counts and of the aux-loss / stats sums; mean over ranks; it includes waiting for the
  slowest rank), and ``grad_allreduce_share``: the same for `average_gradients` (the all-reduce of
  the dense gradients);
* ``outputs_max_abs_diff`` / ``grads_max_abs_diff``: P-process outputs and gradients (input,
  router, expert weights) against one process on the first batch, before any update (loss
  ``sum(output * g)``); ``grads_max_rel_diff``: each gradient's largest difference over its largest
  entry (fp32 sums over thousands of tokens in another order differ in the last bits), and
  ``grads_max_abs_diff_by`` per kind;
* ``checkpoint_2to1_max_abs_diff``: the P-process model after the timed steps is saved with
  `full_state_dict` and loaded into the one-process layer; the largest difference of their outputs.

On a 2-core machine no speed-up is expected: the figure is the cost of communication.

Example: ``python benchmarks/expert_parallel.py --tokens 4096 --experts 8 --json``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_core import ExpertBank, MoE, TopKRouter, collect_aux_losses, weighted_aux_loss
from moe_core.expert_parallel import ExpertParallelMoE
from moe_core.expert_parallel_state import average_gradients, full_state_dict

AUX = {"load_balance": 0.01, "z_loss": 0.001}


class CommTimer:
    """A context manager that adds up the seconds spent inside it."""

    def __init__(self) -> None:
        self.seconds, self._start = 0.0, 0.0

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.seconds += time.perf_counter() - self._start


def build_layer(args) -> MoE:
    torch.manual_seed(0)
    return MoE(TopKRouter(args.d_model, args.experts, top_k=args.top_k),
               ExpertBank(args.experts, args.d_model, args.d_hidden, bias=True),
               capacity_factor=args.capacity_factor)


def batch(args, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return (torch.randn(args.tokens, args.d_model, generator=gen),
            torch.randn(args.tokens, args.d_model, generator=gen))


def worker(rank: int, world: int, port: int, args, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    layer = build_layer(args)
    model = layer if world == 1 else ExpertParallelMoE.from_moe(layer)
    timer, grad_timer = CommTimer(), CommTimer()
    model.comm_timer = timer if world > 1 else None
    share = args.tokens // world
    part = slice(rank * share, (rank + 1) * share)

    x, g = batch(args, 0)  # correctness: one forward/backward, loss = sum of the ranks' shares
    x_r = x[part].clone().requires_grad_(True)
    out = model(x_r)
    ((out.output * g[part]).sum() + sum(out.aux_losses.values()) / world).backward()
    result = {"output": out.output.detach(), "x_grad": x_r.grad,
              "router_grads": {n: p.grad.clone() for n, p in model.router.named_parameters()},
              "expert_grads": {n: p.grad.clone() for n, p in model.experts.named_parameters()}}

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            dist.barrier()
            timer.seconds, grad_timer.seconds, start = 0.0, 0.0, time.perf_counter()
        x, g = batch(args, 1 + step)
        out = model(x[part])
        loss = (out.output * g[part]).square().mean() + weighted_aux_loss(collect_aux_losses(model), AUX)
        optimizer.zero_grad()
        loss.backward()
        if world > 1:
            with grad_timer:
                average_gradients(model)
        optimizer.step()
    dist.barrier()
    result["elapsed"], result["comm"] = time.perf_counter() - start, timer.seconds
    result["grad_comm"] = grad_timer.seconds
    with torch.no_grad():
        result["probe"] = model(batch(args, -1)[0][part]).output
    state = full_state_dict(model) if world > 1 else model.state_dict()
    if rank == 0:
        torch.save(state, Path(out_dir) / "state.pt")
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def run(args, world: int, out_dir: str) -> list[dict]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(worker, args=(world, port, args, out_dir), nprocs=world, join=True)
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def compare(args, results: list[dict], out_dir: str) -> dict[str, float]:
    """P-process results against the one-process layer on the same weights and batch."""
    world = len(results)
    layer = build_layer(args)
    x, g = batch(args, 0)
    x = x[: args.tokens // world * world].clone().requires_grad_(True)
    out = layer(x)
    ((out.output * g[: x.shape[0]]).sum() + sum(out.aux_losses.values())).backward()
    outputs = max_diff(torch.cat([r["output"] for r in results]), out.output.detach())
    pairs = {"input": [(torch.cat([r["x_grad"] for r in results]), x.grad)],
             "router": [(sum(r["router_grads"][n] for r in results), p.grad)
                        for n, p in layer.router.named_parameters()],
             "experts": [(torch.cat([r["expert_grads"][n] for r in results]), p.grad)
                         for n, p in layer.experts.named_parameters()]}
    by_kind = {kind: max(max_diff(a, b) for a, b in found) for kind, found in pairs.items()}
    relative = max(max_diff(a, b) / float(b.abs().max()) for found in pairs.values() for a, b in found)
    layer.load_state_dict(torch.load(Path(out_dir) / "state.pt", weights_only=True))
    with torch.no_grad():
        probe = layer(batch(args, -1)[0][: x.shape[0]]).output
    checkpoint = max_diff(torch.cat([r["probe"] for r in results]), probe)
    return {"outputs_max_abs_diff": outputs, "grads_max_abs_diff": max(by_kind.values()),
            "grads_max_rel_diff": relative, "grads_max_abs_diff_by": by_kind,
            "checkpoint_2to1_max_abs_diff": checkpoint}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="global tokens per step")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--capacity-factor", type=float, default=None, help="default: dropless")
    parser.add_argument("--nprocs", default="1,2", help="comma-separated process counts")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    args = parser.parse_args()
    counts = [int(v) for v in args.nprocs.split(",")]
    bad = [p for p in counts if p < 1 or args.experts % p or args.tokens % p]
    if bad:
        sys.exit(f"--nprocs {bad}: every process count must divide --experts={args.experts} and --tokens={args.tokens}")

    report: dict = {"config": {k: v for k, v in vars(args).items() if k != "json"},
                    "tokens_per_s": {}, "all_to_all_share": {}, "grad_allreduce_share": {}, "step_ms": {}}
    for world in counts:
        with tempfile.TemporaryDirectory() as out_dir:
            results = run(args, world, out_dir)
            elapsed = max(r["elapsed"] for r in results)
            report["tokens_per_s"][str(world)] = args.tokens * args.steps / elapsed
            report["step_ms"][str(world)] = 1000 * elapsed / args.steps
            report["all_to_all_share"][str(world)] = sum(r["comm"] / r["elapsed"] for r in results) / world
            report["grad_allreduce_share"][str(world)] = sum(r["grad_comm"] / r["elapsed"] for r in results) / world
            if world > 1 and "outputs_max_abs_diff" not in report:
                report.update(compare(args, results, out_dir))
        if not args.json:
            print(f"P={world}: {report['tokens_per_s'][str(world)]:9.0f} tokens/s  "
                  f"{report['step_ms'][str(world)]:8.1f} ms/step  "
                  f"all-to-all {100 * report['all_to_all_share'][str(world)]:5.1f}%  "
                  f"grad all-reduce {100 * report['grad_allreduce_share'][str(world)]:5.1f}% of the step",
                  flush=True)
    if args.json:
        print(json.dumps(report))
    else:
        for key in ("outputs_max_abs_diff", "grads_max_abs_diff", "grads_max_rel_diff",
                    "checkpoint_2to1_max_abs_diff"):
            if key in report:
                print(f"{key}: {report[key]:.3g}")


if __name__ == "__main__":
    main()
