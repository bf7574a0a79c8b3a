"""Fixtures shared by the moe_core tests."""

from __future__ import annotations

import pytest

from moe_core import expert_layouts


@pytest.fixture
def many_tiers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Free tiers, so that the ``bucketed`` kernel splits even a few rows into several tiers."""
    monkeypatch.setattr(expert_layouts, "TIER_LEVEL_ROWS", 0)
    monkeypatch.setattr(expert_layouts, "TIER_COPY_ROWS", 0)
    monkeypatch.setattr(expert_layouts, "TIER_FIXED_ROWS", 0)
