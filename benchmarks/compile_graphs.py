"""Which MoE layer settings compile to one graph: `torch._dynamo.explain` over a small layer.

For each setting (expert dtype, router, ``track_stats``) the script builds
``MoE(router, ExpertBank(4, 64, 128), capacity_factor=1.25)``, runs ``torch._dynamo.explain`` on 32
tokens and prints the number of graphs, graph breaks and the first break reasons. The result is
recorded in docs/BENCHMARKS.md ("torch.compile"); the fully traced setting is also a test
(`tests/moe_core/test_layer.py`, ``fullgraph=True``).

Example: ``python benchmarks/compile_graphs.py``.
"""

from __future__ import annotations

import argparse
import json
import logging

import torch

from moe_core.expert_choice import ExpertChoiceRouter
from moe_core.experts import ExpertBank
from moe_core.layer import MoE
from moe_core.routers import TopKRouter

SETTINGS = [  # (expert dtype, router, track_stats)
    ("bf16", "topk", False), ("bf16", "expert_choice", False), ("bf16", "topk", True),
    ("fp32", "topk", False), ("fp32", "topk", True),
]


def explain(dtype: str, router: str, track_stats: bool) -> dict:
    torch.manual_seed(0)
    gate = TopKRouter(64, 4, top_k=2) if router == "topk" else ExpertChoiceRouter(64, 4, capacity_factor=1.0)
    experts = ExpertBank(4, 64, 128).to(torch.bfloat16 if dtype == "bf16" else torch.float32)
    layer = MoE(gate, experts, capacity_factor=1.25, track_stats=track_stats)
    x = torch.randn(32, 64, dtype=experts.w_in.dtype)
    torch._dynamo.reset()
    result = torch._dynamo.explain(layer)(x)
    reasons = []
    for b in result.break_reasons:
        frame = b.user_stack[-1] if b.user_stack else None
        where = f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}" if frame else "?"
        reasons.append(f"{where} {b.reason.splitlines()[0][:80]}")
    return {"experts": dtype, "router": router, "track_stats": track_stats,
            "graphs": result.graph_count, "graph_breaks": result.graph_break_count,
            "reasons": sorted(set(reasons))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON list of rows only")
    args = parser.parse_args()
    torch._logging.set_logs(dynamo=logging.ERROR)  # the breaks are in the table, not as warnings
    rows = [explain(*setting) for setting in SETTINGS]
    if args.json:
        print(json.dumps(rows))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"torch._dynamo.explain, MoE(ExpertBank(4, 64, 128)), 32 tokens, torch {torch.__version__}")
    for header in ("experts", "router", "track_stats", "graphs", "breaks", "distinct break reasons"):
        table.add_column(header)
    for r in rows:
        table.add_row(r["experts"], r["router"], str(r["track_stats"]), str(r["graphs"]),
                      str(r["graph_breaks"]), "\n".join(r["reasons"][:4]) or "-")
    Console(width=220).print(table)


if __name__ == "__main__":
    main()
