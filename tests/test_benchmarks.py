"""The benchmark scripts run end to end on a tiny problem and print what docs/BENCHMARKS.md reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str) -> list[dict]:
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args, "--json"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_moe_layer_json_rows_one_process_per_config() -> None:
    rows = _run("moe_layer.py", "--tokens", "64", "--d-model", "16", "--d-hidden", "16",
                "--experts", "4,8", "--top-k", "2", "--variants", "ours,ours_padded,naive,dense_equiv",
                "--repeats", "1", "--warmup", "0", "--threads", "1")
    assert [(r["num_experts"], r["variant"]) for r in rows] == [
        (E, v) for E in (4, 8) for v in ("ours", "ours_padded", "naive", "dense_equiv")
    ]
    for row in rows:
        assert row["top_k"] == 2 and row["tokens_per_s"] > 0 and row["peak_mem_mb"] > 0
    ours = [r for r in rows if r["variant"] == "ours"]
    for row in ours:
        assert row["vs_dense_equiv"] > 0 and row["vs_naive"] > 0


def test_expert_gemms_json_rows() -> None:
    rows = _run("expert_gemms.py", "--tokens", "64", "--d-model", "16", "--d-hidden", "16",
                "--experts", "4", "--repeats", "1", "--threads", "1")
    assert [(r["config"], r["outputs"]) for r in rows] == [
        ("dense_equiv", "fresh"), ("E=4", "fresh"), ("E=4", "warm")
    ]
    assert rows[0]["vs_dense"] == 1.0
    assert all(r["total_ms"] > 0 for r in rows)
