"""Benchmark: the six GEMM passes of one MoE expert step against those of the dense-equivalent FFN.

Where the floor of an MoE layer's step lies on a CPU: every step runs, per expert ``e`` with its
``n = T * k / E`` rows, the forward ``x_e W_in[e]`` and ``a_e W_out[e]``, the input-gradient
products ``g_e W_out[e]^T`` and ``g'_e W_in[e]^T``, and the weight gradients ``a_e^T g_e`` and
``x_e^T g'_e``. The dense-equivalent FFN (``D -> k*H -> D``) does the same arithmetic as six large
GEMMs. This script times both, one ``torch.mm`` per expert (which is what ``torch._grouped_mm``
does on the CPU too), with the outputs

* ``fresh``: allocated for every pass, as autograd does (a large fresh tensor costs page faults
  on first touch: the allocator returns big blocks to the OS), or
* ``warm``: written into buffers allocated once (no allocation cost: the GEMMs alone).

The difference between the ``warm`` rows and the dense GEMMs is what streaming E distinct weight
matrices costs; the difference between ``fresh`` and ``warm`` is the allocation (page-fault) cost,
mostly of the E x D x H weight gradients.

Example: ``python benchmarks/expert_gemms.py --experts 8,32,128 --repeats 5``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch


def passes(E: int, T: int, k: int, D: int, H: int, warm: bool) -> dict[str, Callable[[], None]]:
    """The six GEMM passes of one step for E experts (E = 0: the dense-equivalent FFN)."""
    g = torch.Generator().manual_seed(0)
    if E == 0:  # dense: T rows, hidden k*H, one weight pair
        E, n, H = 1, T, k * H
    else:
        n = T * k // E
    x, go = torch.randn(E, n, D, generator=g), torch.randn(E, n, D, generator=g)
    a, gh = torch.randn(E, n, H, generator=g), torch.randn(E, n, H, generator=g)
    w_in, w_out = torch.randn(E, D, H, generator=g), torch.randn(E, H, D, generator=g)
    shapes = {"fwd x@W_in": (n, H), "fwd a@W_out": (n, D), "bwd g@W_out^T": (n, H),
              "bwd g'@W_in^T": (n, D), "wgrad a^T@g": (H, D), "wgrad x^T@g'": (D, H)}
    operands = {"fwd x@W_in": (x, w_in), "fwd a@W_out": (a, w_out),
                "bwd g@W_out^T": (go, w_out.transpose(1, 2)), "bwd g'@W_in^T": (gh, w_in.transpose(1, 2)),
                "wgrad a^T@g": (a.transpose(1, 2), go), "wgrad x^T@g'": (x.transpose(1, 2), gh)}
    buffers = {name: torch.empty(E, *shape) for name, shape in shapes.items()} if warm else {}

    def run(name: str) -> None:
        left, right = operands[name]
        out = buffers[name] if warm else torch.empty(E, *shapes[name])
        for e in range(E):
            torch.mm(left[e], right[e], out=out[e])

    return {name: (lambda name=name: run(name)) for name in shapes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-hidden", type=int, default=1024)
    parser.add_argument("--experts", default="8,32,128", help="comma-separated E values")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print one JSON list of rows only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    T, k, D, H = args.tokens, args.top_k, args.d_model, args.d_hidden
    configs = [("dense_equiv", 0, "fresh")]
    for E in (int(v) for v in args.experts.split(",")):
        configs += [(f"E={E}", E, "fresh"), (f"E={E}", E, "warm")]
    runs = {(label, outputs): passes(E, T, k, D, H, outputs == "warm") for label, E, outputs in configs}
    times: dict[tuple, dict[str, list[float]]] = {key: {p: [] for p in fns} for key, fns in runs.items()}
    for fns in runs.values():  # warm-up
        for fn in fns.values():
            fn()
    for _ in range(args.repeats):  # interleaved rounds
        for key, fns in runs.items():
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[key][name].append(1000 * (time.perf_counter() - start))
    rows = []
    for (label, outputs), per_pass in times.items():
        row = {"config": label, "outputs": outputs}
        row.update({name: statistics.median(v) for name, v in per_pass.items()})
        row["total_ms"] = sum(row[name] for name in per_pass)
        rows.append(row)
    dense_total = rows[0]["total_ms"]
    for row in rows:
        row["vs_dense"] = dense_total / row["total_ms"]
    if args.json:
        print(json.dumps(rows))
        return
    from rich.console import Console
    from rich.table import Table

    names = list(next(iter(times.values())))
    table = Table(title=f"GEMM passes of one step (ms, median of {args.repeats}), T={T} k={k} D={D} "
                        f"H={H} fp32 cpu threads={torch.get_num_threads()} torch {torch.__version__}")
    for header in ("config", "outputs", *names, "total", "dense / this"):
        table.add_column(header, justify="left" if header in ("config", "outputs") else "right")
    for row in rows:
        table.add_row(row["config"], row["outputs"], *(f"{row[n]:.1f}" for n in names),
                      f"{row['total_ms']:.1f}", f"{row['vs_dense']:.2f}")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
