"""Benchmark: one MoE layer forward + backward, against the naive loop and dense baselines.

Variants (all forward + backward of ``loss = mean(output**2)`` wrt the input and every parameter,
gradients set to None before each step, as ``optimizer.zero_grad()`` does):

* ``ours``          -- ``moe_core.layer.MoE(TopKRouter, ExpertBank)``, dropless, eager (with
                       ``--router expert_choice``: ``ExpertChoiceRouter`` with capacity factor k,
                       every expert takes ``T * k / E`` tokens, the same active compute);
* ``ours_compiled`` -- the same layer under ``torch.compile`` (compile time not timed);
* ``ours_padded`` / ``ours_bucketed`` / ``ours_grouped`` / ``ours_loop`` -- the layer with one
                       expert kernel forced (``ExpertBank(method=...)``: padded ``bmm``, one
                       ``bmm`` per tier of padding, ``torch._grouped_mm``, one matmul per
                       expert), to compare the kernels ``auto`` chooses between;
* ``naive``         -- the per-expert masked loop a tutorial writes: ``nn.ModuleList`` of FFNs, a
                       boolean mask per expert, ``out[mask] += gate * expert(x[mask])``;
* ``dense_soft``    -- soft gating: every expert on every token, weighted by the softmax (skipped
                       when it would need more than ``--dense-soft-max-gb`` or more than 8x the
                       active compute; the table says so);
* ``dense_equiv``   -- a dense FFN with the same active parameters, ``D -> k*H -> D`` (no router).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` minus what was allocated before the step;
on CPU the peak of the running sum of the allocation / free events the torch profiler records
(``profile_memory=True``) during one extra step -- every byte the torch CPU allocator hands out,
including the parameter gradients. ``act_mb`` is that peak minus the parameter gradients (which
every variant must allocate), i.e. activations and temporaries.

Each (E, k) config runs in a fresh process (``--in-process`` to share one): measured in one
process, E = 8 running first slowed ``ours`` at E = 32 by about 8% (glibc's malloc raises its
mmap / trim thresholds after large frees, which changes which later allocations fault), while
fixing the thresholds (``MALLOC_MMAP_THRESHOLD_``) made the order irrelevant. All variants of one
config still run interleaved in one process, so their ratios are measured in one run.

Example: ``python benchmarks/moe_layer.py --experts 8 --top-k 2 --variants ours,dense_equiv --repeats 3``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from moe_core.expert_choice import ExpertChoiceRouter
from moe_core.experts import FFN, ExpertBank
from moe_core.layer import MoE
from moe_core.routers import SoftmaxRouter, TopKRouter

VARIANTS = ("ours", "ours_compiled", "naive", "dense_soft", "dense_equiv")
KERNEL_VARIANTS = ("ours_padded", "ours_bucketed", "ours_grouped", "ours_loop")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class NaiveMoE(nn.Module):
    """The tutorial MoE: loop over experts, boolean mask of the tokens routed to each."""

    def __init__(self, router: nn.Module, experts: list[nn.Module]) -> None:
        super().__init__()
        self.router, self.experts = router, nn.ModuleList(experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.router(x)
        idx, w = routing.expert_indices_TK, routing.combine_weights_TK.to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            mask_TK = idx == e
            token_mask = mask_TK.any(-1)
            if token_mask.any():
                gate = (w * mask_TK).sum(-1)[token_mask]
                out[token_mask] += gate[:, None] * expert(x[token_mask])
        return out


class DenseSoftMoE(nn.Module):
    """Soft gating: every expert on every token, combined with the softmax probabilities."""

    def __init__(self, router: nn.Module, experts: ExpertBank) -> None:
        super().__init__()
        self.router, self.experts = router, experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.router(x).probs_TE.to(x.dtype)
        return torch.einsum("te,ted->td", probs, self.experts.forward_dense(x))


def build(
    variant: str, E: int, k: int, D: int, H: int, dtype: torch.dtype, device: str, router: str = "topk"
) -> nn.Module:
    torch.manual_seed(0)
    if variant in ("ours", "ours_compiled", *KERNEL_VARIANTS):
        method = variant.removeprefix("ours_") if variant in KERNEL_VARIANTS else "auto"
        gate = TopKRouter(D, E, top_k=k) if router == "topk" else ExpertChoiceRouter(D, E, capacity_factor=k)
        layer = MoE(gate, ExpertBank(E, D, H, method=method)).to(device)
        layer.experts.to(dtype)  # the router stays fp32
        if variant == "ours_compiled":
            return torch.compile(layer)
        return layer
    if variant == "naive":
        experts = [FFN(D, H, bias=False).to(device, dtype) for _ in range(E)]
        return NaiveMoE(TopKRouter(D, E, top_k=k).to(device), experts)
    if variant == "dense_soft":
        return DenseSoftMoE(SoftmaxRouter(D, E).to(device), ExpertBank(E, D, H).to(device, dtype))
    return FFN(D, k * H, bias=False).to(device, dtype)


def output_of(result) -> torch.Tensor:
    return result if isinstance(result, torch.Tensor) else result.output


def step(module: nn.Module, x: torch.Tensor) -> None:
    module.zero_grad(set_to_none=True)
    x.grad = None
    output_of(module(x)).float().square().mean().backward()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory_mb(module: nn.Module, x: torch.Tensor, device: str) -> float:
    """Peak bytes allocated during one step above what was allocated before it (the previous
    step's gradients are released first, so that they are not counted as freed during the step)."""
    module.zero_grad(set_to_none=True)
    x.grad = None
    if device == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(module, x)
        sync(device)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(module, x)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak / 2**20


def skip_reason(
    variant: str, E: int, k: int, T: int, D: int, H: int, dtype: torch.dtype, max_gb: float, device: str,
    router: str,
) -> str | None:
    if router != "topk" and variant in ("naive", "dense_soft"):
        return "skipped: a token-choice baseline"
    if variant == "ours_grouped" and device == "cuda" and dtype != torch.bfloat16:
        return "skipped: torch._grouped_mm on CUDA takes bf16 only"
    if variant == "dense_soft":
        need_gb = T * E * (2 * H + 2 * D) * torch.finfo(dtype).bits / 8 / 2**30
        if need_gb > max_gb:
            return f"skipped: needs ~{need_gb:.1f} GB of activations"
        if E / k > 8:
            return f"skipped: {E / k:.0f}x the active compute"
    return None


def run_config(E: int, k: int, args: argparse.Namespace) -> list[dict]:
    dtype, device = DTYPES[args.dtype], args.device
    T, D, H = args.tokens, args.d_model, args.d_hidden
    rows: dict[str, dict] = {}
    modules: dict[str, nn.Module] = {}
    for variant in args.variants:
        row = {"num_experts": E, "top_k": k, "variant": variant, "tokens": T, "d_model": D,
               "d_hidden": H, "dtype": args.dtype, "device": device}
        reason = skip_reason(variant, E, k, T, D, H, dtype, args.dense_soft_max_gb, device, args.router)
        if reason:
            row.update(tokens_per_s=None, ms=None, peak_mem_mb=None, act_mem_mb=None, note=reason)
        else:
            modules[variant] = build(variant, E, k, D, H, dtype, device, args.router)
        rows[variant] = row
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(T, D, generator=g).to(device, dtype).requires_grad_(True)
    for module in modules.values():  # warm-up (compilation, allocator, lazy init)
        for _ in range(args.warmup):
            step(module, x)
    times: dict[str, list[float]] = {v: [] for v in modules}
    for _ in range(args.repeats):  # interleaved, so load changes hit every variant alike
        for variant, module in modules.items():
            sync(device)
            start = time.perf_counter()
            step(module, x)
            sync(device)
            times[variant].append(time.perf_counter() - start)
    for variant, module in modules.items():
        seconds = statistics.median(times[variant])
        peak = peak_memory_mb(module, x, device) if args.memory else None
        grads_mb = sum(p.numel() * p.element_size() for p in module.parameters()) / 2**20
        rows[variant].update(
            tokens_per_s=T / seconds, ms=1000 * seconds, peak_mem_mb=peak,
            act_mem_mb=None if peak is None else peak - grads_mb, note="",
        )
        del module
    for variant in ("ours", "ours_compiled", *KERNEL_VARIANTS):
        row = rows.get(variant)
        if not row or row["tokens_per_s"] is None:
            continue
        for base in ("dense_equiv", "naive"):
            other = rows.get(base)
            if other and other["tokens_per_s"]:
                row[f"vs_{base}"] = row["tokens_per_s"] / other["tokens_per_s"]
                if other["act_mem_mb"]:
                    row[f"act_mem_vs_{base}"] = row["act_mem_mb"] / other["act_mem_mb"]
    return list(rows.values())


def run_isolated(E: int, k: int, args: argparse.Namespace) -> list[dict]:
    """`run_config` in a fresh Python process: the allocator state one config leaves behind
    (glibc raises its mmap / trim thresholds after large frees) does not tilt the next one.
    The child gets this command line with one config appended (argparse keeps the last value)."""
    command = [sys.executable, __file__, *sys.argv[1:], "--experts", str(E), "--top-k", str(k), "--json"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"config E={E} k={k} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    title = (f"MoE layer ({args.router} routing) fwd+bwd, T={args.tokens} D={args.d_model} H={args.d_hidden} {args.dtype} "
             f"{args.device} threads={torch.get_num_threads()} torch {torch.__version__}")
    headers = ["E", "k", "variant", "ms/step", "tokens/s", "peak MB", "act MB", "vs dense_equiv",
               "vs naive", "act mem vs dense", "note"]

    def fmt(v, spec: str) -> str:
        return "" if v is None else format(v, spec)

    body = [
        [str(r["num_experts"]), str(r["top_k"]), r["variant"], fmt(r["ms"], ".1f"),
         fmt(r["tokens_per_s"], ",.0f"), fmt(r["peak_mem_mb"], ".0f"), fmt(r["act_mem_mb"], ".0f"),
         fmt(r.get("vs_dense_equiv"), ".2f"), fmt(r.get("vs_naive"), ".2f"),
         fmt(r.get("act_mem_vs_dense_equiv"), ".2f"), r["note"]]
        for r in rows
    ]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        print(" | ".join(headers))
        for line in body:
            print(" | ".join(line))
        return
    table = Table(title=title)
    for h in headers:
        table.add_column(h, justify="left" if h in ("variant", "note") else "right")
    for line in body:
        table.add_row(*line)
    Console(width=200).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-hidden", type=int, default=1024)
    parser.add_argument("--experts", default="8,32,128", help="comma-separated E values")
    parser.add_argument("--top-k", default="1,2", help="comma-separated k values")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"subset of {VARIANTS + KERNEL_VARIANTS}"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--router", choices=("topk", "expert_choice"), default="topk")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory step")
    parser.add_argument("--dense-soft-max-gb", type=float, default=3.0)
    parser.add_argument("--json", action="store_true", help="print one JSON list of rows only")
    parser.add_argument(
        "--in-process", action="store_true",
        help="run every (E, k) config in this process (default: each in a fresh one, see above)",
    )
    args = parser.parse_args()
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variants) - set(VARIANTS) - set(KERNEL_VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {VARIANTS + KERNEL_VARIANTS}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    torch.set_num_threads(args.threads)
    configs = [(int(E), int(k)) for E in args.experts.split(",") for k in args.top_k.split(",")]
    rows = []
    for i, (E, k) in enumerate(configs, 1):
        start = time.perf_counter()
        rows += run_config(E, k, args) if args.in_process or len(configs) == 1 else run_isolated(E, k, args)
        print(f"[{i}/{len(configs)}] E={E} k={k} measured in {time.perf_counter() - start:.0f} s",
              file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows))
    else:
        print_table(rows, args)


if __name__ == "__main__":
    main()
