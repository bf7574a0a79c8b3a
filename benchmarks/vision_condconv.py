"""CondConv on the CPU: which form of the mixed convolution is faster, and what a condconv training
step costs against dense's.

1. The layer: `moe_apps.vision.condconv.MIXED_CONVS` (``grouped``: each image's kernel mixed, one
   grouped convolution with B groups; ``summed``: all E kernels in one convolution, then the
   mixing-weighted sum) at the expert stage's shape (256 -> 256 channels at 7 x 7, batch
   ``--batch-size``), forward and backward, in bf16 autocast and channels_last, for each E of
   ``--experts``, interleaved in one process (median of ``--rounds``). The E up to which
   ``summed`` wins is what `SUMMED_MAX_EXPERTS` should be.
2. The network (``--step``): training steps of condconv (E = 2, the form `mixed_conv_kind`
   picks) and dense, interleaved (`benchmarks/vision_steps.py`).

    python benchmarks/vision_condconv.py
    python benchmarks/vision_condconv.py --experts 2 4 6 8 --rounds 5 --step
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vision_steps import cpu_facts, cpu_line, interleaved_medians, training_steps  # noqa: E402


def layer_steps(num_experts: int, batch_size: int, channels: int = 256, side: int = 7):
    """``step(kind)``: seconds of one forward + backward of the mixed conv in form ``kind``."""
    import torch

    from moe_apps.vision.condconv import MIXED_CONVS

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, channels, side, side, generator=g).to(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = torch.randn(num_experts, channels, channels, 3, 3, generator=g).mul_(0.02).requires_grad_()
    logits = torch.randn(batch_size, num_experts, generator=g).requires_grad_()

    def step(kind: str) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = MIXED_CONVS[kind](x, weight, logits.softmax(-1))
        y.float().sum().backward()
        x.grad = weight.grad = logits.grad = None
        return time.perf_counter() - start

    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--step", action="store_true", help="Also time condconv and dense training steps.")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    if min(args.experts) < 1 or args.batch_size < 1 or args.rounds < 1:
        parser.error("--experts, --batch-size and --rounds must be at least 1")
    from moe_apps.vision.condconv import mixed_conv_kind

    print(cpu_line(cpu_facts()))
    print("\n| E | grouped ms | summed ms | grouped / summed | form picked |\n|---|---|---|---|---|")
    for e in args.experts:
        median = interleaved_medians(layer_steps(e, args.batch_size), ["grouped", "summed"], args.rounds)
        print(f"| {e} | {median['grouped'] * 1e3:,.0f} | {median['summed'] * 1e3:,.0f} | "
              f"{median['grouped'] / median['summed']:.2f} | {mixed_conv_kind(e)} |", flush=True)
    if args.step:
        variants = {name: ({"model": name}, {}) for name in ("condconv", "dense")}
        median = interleaved_medians(training_steps(variants, args.batch_size, args.data_dir),
                                     list(variants), args.rounds)
        print(f"\n| model | ms per training step (batch {args.batch_size}) | x dense |\n|---|---|---|")
        for name, seconds in median.items():
            print(f"| {name} | {seconds * 1e3:,.0f} | {seconds / median['dense']:.2f} |")


if __name__ == "__main__":
    main()
