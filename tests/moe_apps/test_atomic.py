"""moe_apps.atomic: a failed write leaves the target untouched; the file gets the usual mode."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from moe_apps.atomic import atomic_write


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "metrics.jsonl"
    target.write_bytes(b"old")

    def half_then_fail(f) -> None:
        f.write(b"new but incomplete")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_new_file_follows_the_umask_not_mkstemp_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "sub" / "a.bin", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    path = tmp_path / "sub" / "a.bin"
    assert path.read_bytes() == b"x"
    assert path.stat().st_mode & 0o777 == 0o644


def test_does_not_touch_the_process_umask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # os.umask(0) to read the mask would, for a moment, give every other thread's new files 0666.
    def no_umask(mask: int) -> int:
        raise AssertionError("atomic_write changed the process umask")

    monkeypatch.setattr(os, "umask", no_umask)
    atomic_write(tmp_path / "a.bin", lambda f: f.write(b"x"))
    assert (tmp_path / "a.bin").read_bytes() == b"x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]
