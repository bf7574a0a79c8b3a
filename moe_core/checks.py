"""The input checks moe_core's routers, experts, layers and losses share, and that moe_apps uses
for its configs: each raises a one-line ValueError that says what was wrong and how to fix it.

* `check_positive_int` / `check_float`: an option in range (bools and non-finite numbers refused);
* `check_features` / `flatten_tokens`: a float tensor ``(..., d_model)``, flattened to ``x_TD``;
* `check_mask`: None or a bool mask of an exact shape;
* `describe_tensor`: the "got ..." part of a message (dtype and shape, or the type name).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_features(x: Tensor, d_model: int, *, name: str = "x", where: str = "input") -> None:
    """Raise a ValueError that says what is wrong unless ``x`` is a float tensor ``(..., d_model)``."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{where}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(
            f"{where}: {name} must be a floating-point tensor (float32/bfloat16/float16), got {x.dtype}; "
            f"cast it with {name}.float()"
        )
    if x.dim() < 1 or x.shape[-1] != d_model:
        raise ValueError(
            f"{where}: {name} must have shape (..., d_model={d_model}), got {tuple(x.shape)}"
        )


def flatten_tokens(x: Tensor, d_model: int, where: str) -> Tensor:
    """Check ``x`` is a float tensor ``(..., d_model)`` (`check_features`) and flatten it to ``x_TD``."""
    check_features(x, d_model, where=where)
    return x.reshape(-1, d_model)


def describe_tensor(value: object) -> str:
    """``"torch.int64 (4, 2)"`` for a tensor (dtype and shape), else the type name: the "got" part
    of an input-check error message."""
    if isinstance(value, Tensor):
        return f"{value.dtype} {tuple(value.shape)}"
    return type(value).__name__


def check_mask(
    mask: Tensor | None,
    length_or_shape: int | tuple[int, ...],
    name: str,
    where: str,
    *,
    dims: str | None = None,
    true_for: str = "real tokens",
) -> None:
    """Raise a ValueError that says what is wrong unless ``mask`` is None or a bool tensor of
    exactly ``length_or_shape``.

    Args:
        dims: the expected shape in legend letters for the message, e.g. ``"T"`` or ``"B, N"``.
        true_for: what a True entry means, for the message (``"real tokens"``, ``"kept slots"``).
    """
    if mask is None:
        return
    shape = (length_or_shape,) if isinstance(length_or_shape, int) else tuple(length_or_shape)
    if isinstance(mask, Tensor) and mask.dtype == torch.bool and tuple(mask.shape) == shape:
        return
    expected = str(shape)
    if dims:
        expected = f"({dims}{',' if len(shape) == 1 else ''}) = {shape}"
    fix = ""
    if isinstance(mask, Tensor) and tuple(mask.shape) == shape:
        fix = f"; convert it with {name}.bool()"
    raise ValueError(
        f"{where}: {name} must be a bool tensor of shape {expected} with True for {true_for}, "
        f"got {describe_tensor(mask)}{fix}"
    )


def check_positive_int(value: int, name: str, *, minimum: int = 1, maximum: int | None = None) -> None:
    """Raise a ValueError naming ``name`` unless ``minimum <= value <= maximum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {allowed}, got {value}")


def check_float(
    value: float,
    name: str,
    *,
    low: float = 0.0,
    low_open: bool = True,
    high: float | None = None,
    hint: str = "",
) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is a finite real number ``> low``
    (``>= low`` with ``low_open=False``) and, given ``high``, ``< high``. ``hint`` is appended to
    the requirement in the message (e.g. ``", or None for dropless"``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (high is None or value < high)
    if not ok:
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        allowed = bound if high is None else f"{bound} and < {high:g}"
        raise ValueError(f"{name} must be a finite number {allowed}{hint}, got {value!r}")
