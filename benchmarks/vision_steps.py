"""Timing the vision nets' training steps, shared by benchmarks/vision_quality.py (``--step-time``:
moe against dense, the step-time target of the vision issue), benchmarks/vision_precision.py
(bf16 or fp32, channels_last or NCHW) and benchmarks/vision_condconv.py (condconv against dense),
with the CPU facts each table is printed under. A step is forward, backward and an SGD step on
the first ``batch_size`` CIFAR-10 training images, in the recipe's precision and memory format;
variants are timed interleaved in one process, so that a slower or busier moment of the machine
hits all of them alike, and each is reported as its median.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path


def training_steps(variants: dict[str, tuple[dict, dict]], batch_size: int,
                   data_dir: str | None) -> Callable[[str], float]:
    """``step(name)``: seconds of one training step (forward, backward, SGD step on the first
    ``batch_size`` CIFAR-10 training images) of the variant ``name`` = (ModelConfig changes,
    RecipeConfig changes), in its recipe's precision and memory format. Each net is built once."""
    import torch
    import torch.nn.functional as F

    from moe_apps.datasets import load_cifar10
    from moe_apps.training.runtime import autocast
    from moe_apps.vision.config import ModelConfig, RecipeConfig
    from moe_apps.vision.model import build_model
    from moe_apps.vision.train import param_groups

    images = load_cifar10(data_dir).train_images[:batch_size]
    labels = torch.randint(0, 10, (batch_size,), generator=torch.Generator().manual_seed(0))
    nets, opts, recipes = {}, {}, {}
    for name, (model_changes, recipe_changes) in variants.items():
        torch.manual_seed(0)
        recipe = recipes[name] = RecipeConfig(**recipe_changes)
        net = build_model(ModelConfig(**model_changes))
        net.fit_whitening(images)
        net.channels_last = recipe.channels_last  # as `train.prepare_model` sets them
        net.router_input_grad = recipe.router_input_grad
        groups = param_groups(recipe)(net)
        opts[name] = torch.optim.SGD([{"params": g["params"], "lr": 1e-3} for g in groups],
                                     momentum=0.85, nesterov=True)
        nets[name] = net.train()

    def step(name: str) -> float:
        start = time.perf_counter()
        with autocast(torch.device("cpu"), recipes[name].precision):
            out = nets[name](images)
            loss = F.cross_entropy(out.logits_BC, labels, label_smoothing=0.2)
        loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def interleaved_medians(step: Callable[[str], float], names: list[str], rounds: int) -> dict[str, float]:
    """Median seconds of ``step(name)`` per name over ``rounds`` rounds that take every name in turn
    (after two warm-up steps each), so that a slower or busier machine moment hits all alike."""
    for name in names:
        step(name), step(name)
    times = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            times[name].append(step(name))
    return {name: statistics.median(values) for name, values in times.items()}


def step_times(rounds: int, batch_size: int, data_dir: str | None, recipe: dict | None = None,
               model_config: dict | None = None) -> dict:
    """Median seconds per training step of moe and dense (default widths and ``model_config``),
    interleaved, in the recipe's precision and memory format."""
    from moe_apps.vision.config import RecipeConfig

    variants = {name: ({**(model_config or {}), "model": name}, recipe or {}) for name in ("moe", "dense")}
    median = interleaved_medians(training_steps(variants, batch_size, data_dir), list(variants), rounds)
    resolved = RecipeConfig(**(recipe or {}))
    return {"batch_size": batch_size, "rounds": rounds, "precision": resolved.precision,
            "channels_last": resolved.channels_last, "moe_s": median["moe"], "dense_s": median["dense"],
            "ratio": median["moe"] / median["dense"]}


def cpu_facts() -> dict:
    """torch's CPU kernel level and the AMX flags Linux reports (empty elsewhere)."""
    import torch

    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1].splitlines()[0].split()
    except (OSError, IndexError):
        flags = []
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "amx": sorted(f for f in flags if f.startswith("amx")),
            "avx512_bf16": "avx512_bf16" in flags}


def cpu_line(facts: dict) -> str:
    """`cpu_facts` in one line, printed above each timing table."""
    return (f"torch {facts['torch']}, {facts['threads']} threads, CPU kernels {facts['cpu_capability']}, "
            f"AMX: {', '.join(facts['amx']) or 'none'}, avx512_bf16: {'yes' if facts['avx512_bf16'] else 'no'}")
