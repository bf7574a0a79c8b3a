"""The shared input checks of moe_core.checks: each names the option and says what was wrong."""

from __future__ import annotations

import pytest
import torch

from moe_core.checks import check_features, check_float, check_mask, check_positive_int


def test_check_features_names_the_problem() -> None:
    with pytest.raises(ValueError, match="floating-point"):
        check_features(torch.ones(2, 4, dtype=torch.long), 4)
    with pytest.raises(ValueError, match=r"d_model=8.*\(2, 4\)"):
        check_features(torch.ones(2, 4), 8)
    check_features(torch.ones(3, 2, 4, dtype=torch.bfloat16), 4)


def test_check_positive_int_bounds() -> None:
    with pytest.raises(ValueError, match=r"top_k must be in \[1, 4\], got 5"):
        check_positive_int(5, "top_k", maximum=4)
    with pytest.raises(ValueError, match="must be an int"):
        check_positive_int(True, "num_experts")
    check_positive_int(4, "top_k", maximum=4)


def test_check_mask_shape_dtype_and_fix_hint() -> None:
    check_mask(None, 3, "mask_T", "f")
    check_mask(torch.tensor([True, False, True]), 3, "mask_T", "f")
    with pytest.raises(ValueError, match=r"convert it with mask_T\.bool\(\)"):
        check_mask(torch.tensor([1, 0, 1]), 3, "mask_T", "f", dims="T")
    with pytest.raises(ValueError, match=r"\(B, N\) = \(2, 3\)"):
        check_mask(torch.ones(3, 2, dtype=torch.bool), (2, 3), "token_mask", "SoftMoE", dims="B, N")


def test_check_float_bounds_and_hint() -> None:
    check_float(0.5, "p")
    check_float(2, "p")  # an int is a number
    check_float(0.0, "p", low_open=False)
    for bad in (0.0, -1.0, float("nan"), float("inf"), True, "1.0", None):
        with pytest.raises(ValueError, match=r"p must be a finite number > 0, got"):
            check_float(bad, "p")
    with pytest.raises(ValueError, match=r"jitter must be a finite number >= 0 and < 1, got 1.0"):
        check_float(1.0, "jitter", low_open=False, high=1.0)
    with pytest.raises(ValueError, match=r"> 0, or None for dropless, got -2"):
        check_float(-2, "capacity_factor", hint=", or None for dropless")
