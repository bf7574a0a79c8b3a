"""Which precision and memory format trains the vision nets fastest on this machine: training steps
(forward, backward, SGD step, batch 1024) of `moe` and `dense` in bf16 autocast and in fp32, each
with channels_last and with the plain NCHW layout, all interleaved in one process (median of
``--rounds`` rounds). Prints a table with each variant's time relative to the recipe's default
(bf16, channels_last) and the CPU facts that decide it: bf16 autocast pays off where the cores
have bf16 matrix units (Intel AMX), and can cost time where they do not.

    python benchmarks/vision_precision.py
    python benchmarks/vision_precision.py --models moe --rounds 5 --json

The answer picks `moe-apps vision train --precision` (docs/BENCHMARKS.md, Vision).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vision_steps import cpu_facts, cpu_line, interleaved_medians, training_steps  # noqa: E402

LAYOUTS = {"channels_last": True, "NCHW": False}
DEFAULT = ("bf16", "channels_last")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=["moe", "dense"], default=["moe", "dense"])
    parser.add_argument("--precisions", nargs="+", choices=["bf16", "fp32"], default=["bf16", "fp32"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    keys = [(model, precision, layout) for model in args.models for precision in args.precisions for layout in LAYOUTS]
    variants = {" ".join(key): ({"model": key[0]}, {"precision": key[1], "channels_last": LAYOUTS[key[2]]})
                for key in keys}
    median = interleaved_medians(training_steps(variants, args.batch_size, args.data_dir), list(variants),
                                 args.rounds)
    rows = []
    for model, precision, layout in keys:
        name, default = f"{model} {precision} {layout}", median.get(" ".join((model, *DEFAULT)))
        rows.append({"model": model, "precision": precision, "layout": layout, "step_s": median[name],
                     "images_per_second": args.batch_size / median[name],
                     "vs_default": median[name] / default if default else None})
    result = {"batch_size": args.batch_size, "rounds": args.rounds, "cpu": cpu_facts(), "rows": rows}
    if args.json:
        print(json.dumps(result))
        return
    print(cpu_line(result["cpu"]))
    print(f"| model | precision | layout | ms per step (batch {args.batch_size}, median of {args.rounds}) "
          f"| images/s | x bf16 + channels_last |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['vs_default']:.2f}" if r["vs_default"] is not None else "-"
        print(f"| {r['model']} | {r['precision']} | {r['layout']} | {1000 * r['step_s']:.0f} | "
              f"{r['images_per_second']:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
