"""Runtime pieces of the training loop: seeding and RNG snapshots, device, autocast, optimizer and
learning-rate schedule (linear warmup, then constant / cosine (Loshchilov & Hutter 2017) / linear decay /
inverse square root (Vaswani et al. 2017) / triangular one-cycle (Smith 2018)), per-parameter-group
learning-rate scales and weight decay.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from moe_apps.training.config import SCHEDULES, TrainConfig


def set_seed(seed: int) -> None:
    """Seed python's `random`, numpy's global generator and torch (CPU and every CUDA device)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; 'cpu'; 'cuda' / 'cuda:N' (ValueError if there is no GPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or (isinstance(name, str) and name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} was asked for but CUDA is not available; use 'cpu' or 'auto'")
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"device={name!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        return torch.device(name)
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")


def to_device(batches: Iterable[Any], device: torch.device) -> Iterator[Any]:
    """Each batch moved with its ``.to(device)`` (ValueError for a batch without one)."""
    for batch in batches:
        if not callable(getattr(batch, "to", None)):
            raise ValueError(
                f"batches must have a .to(device) method (a typed batch dataclass), got {type(batch).__name__}"
            )
        yield batch.to(device)


def count_steps(train_batches: Callable[[int], Iterable[Any]]) -> int:
    """Batches per epoch (``len(train_batches(0))``, else counted); ValueError if none."""
    batches = train_batches(0)
    try:
        count = len(batches)  # type: ignore[arg-type]
    except TypeError:
        count = sum(1 for _ in batches)
    if count < 1:
        raise ValueError("train_batches(0) gave no batches; the training set is empty")
    return count


def rng_state() -> dict[str, Any]:
    """A snapshot of every global generator, made of tensors, ints and lists only (loadable with
    ``torch.load(weights_only=True)``)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a `rng_state()` snapshot."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on the device's type for precision 'bf16'; a no-op for 'fp32'."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


ParamGroupsFn = Callable[[nn.Module], list[dict[str, Any]]]


def _groups(model: nn.Module, config: TrainConfig, param_groups: ParamGroupsFn | None) -> list[dict[str, Any]]:
    """The optimizer's param groups: ``param_groups(model)`` (each ``params`` with an optional
    ``lr_scale`` and ``weight_decay``) plus one default group for the trainable parameters it left
    out; every group gets ``lr = config.lr * lr_scale``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad=True); nothing to train")
    if param_groups is None:
        return [{"params": params, "lr": config.lr, "lr_scale": 1.0, "weight_decay": config.weight_decay}]
    groups, seen = [], set()
    for i, spec in enumerate(param_groups(model)):
        unknown = set(spec) - {"params", "lr_scale", "weight_decay", "name"}
        if "params" not in spec or unknown:
            raise ValueError(
                f"param group {i} must be a dict with 'params' and optionally 'lr_scale', "
                f"'weight_decay', 'name'; got keys {sorted(spec)}"
            )
        members = [p for p in spec["params"] if p.requires_grad]
        if any(id(p) in seen for p in members):
            raise ValueError(f"param group {i} repeats a parameter of an earlier group")
        seen.update(id(p) for p in members)
        scale, decay = spec.get("lr_scale", 1.0), spec.get("weight_decay", config.weight_decay)
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"param group {i}: lr_scale must be a finite number > 0, got {scale!r}")
        if not (isinstance(decay, (int, float)) and decay >= 0):
            raise ValueError(f"param group {i}: weight_decay must be >= 0, got {decay!r}")
        if members:
            groups.append({"params": members, "lr": config.lr * scale, "lr_scale": float(scale),
                           "weight_decay": float(decay), "name": str(spec.get("name", f"group{i}"))})
    rest = [p for p in params if id(p) not in seen]
    if rest:
        groups.append({"params": rest, "lr": config.lr, "lr_scale": 1.0,
                       "weight_decay": config.weight_decay, "name": "rest"})
    return groups


def build_optimizer(model: nn.Module, config: TrainConfig,
                    param_groups: ParamGroupsFn | None = None) -> torch.optim.Optimizer:
    """The optimizer of ``config.optimizer`` over the trainable parameters of ``model``, split into
    ``param_groups(model)`` when given (see `_groups`)."""
    groups = _groups(model, config, param_groups)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr, betas=config.betas, eps=config.eps)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)
    raise ValueError(f"optimizer must be one of 'adamw', 'adam', 'sgd', got {config.optimizer!r}")


def lr_factor(step: int, *, schedule: str, warmup_steps: int, total_steps: int,
              peak_fraction: float = 0.25, start_factor: float = 0.0, final_factor: float = 0.0) -> float:
    """The multiplier of the peak lr for optimizer step ``step`` (0-based) of ``total_steps``.

    Warmup: ``(step + 1) / warmup_steps`` while ``step < warmup_steps``. Then, with
    ``progress = (step - warmup_steps) / (total_steps - warmup_steps)`` in [0, 1):
    constant 1, cosine ``(1 + cos(pi * progress)) / 2``, linear ``1 - progress``, inverse_sqrt
    ``sqrt(max(warmup_steps, 1) / (step + 1))``, triangular / onecycle linear from
    ``start_factor`` to 1 at ``progress = peak_fraction``, then linear to ``final_factor``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "inverse_sqrt":
        return math.sqrt(max(warmup_steps, 1) / (step + 1))
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    if schedule in ("triangular", "onecycle"):
        if progress < peak_fraction:
            return start_factor + (1.0 - start_factor) * progress / peak_fraction
        return 1.0 + (final_factor - 1.0) * (progress - peak_fraction) / (1.0 - peak_fraction)
    raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-optimizer-step `LambdaLR` following `lr_factor` over ``total_steps`` steps (the same
    factor for every param group, each with its own base lr)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")

    def factor(step: int) -> float:
        # A plain function: LambdaLR then keeps it out of its state_dict, so a resumed run follows
        # the schedule of its current config (e.g. more epochs) from the restored step count.
        return lr_factor(
            step, schedule=config.schedule, warmup_steps=config.warmup_steps, total_steps=total_steps,
            peak_fraction=config.peak_fraction, start_factor=config.start_factor,
            final_factor=config.final_factor,
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
