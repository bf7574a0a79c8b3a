"""Atomic file writes: a temp file next to the target, fsynced, then `os.replace`.

Used for everything moe-apps must never leave half-written: downloads, checkpoints, metrics,
configs and plots. Standard library only, so the data layer and `--help` stay light.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, NoReturn


def _create_temp(folder: Path, prefix: str, suffix: str) -> tuple[int, Path]:
    """A new, empty file `<prefix><random><suffix>` in `folder`, opened for writing.

    Created with mode 0o666 so the kernel applies the umask, as for any new file (`mkstemp` makes
    0600, and reading the umask with `os.umask` would briefly change it for every thread).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = folder / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object], *, suffix: str = ".tmp") -> None:
    """Call ``write(file_object)`` on a temp file next to ``path``, fsync it, then ``os.replace``.

    If ``write`` raises, the temp file is removed and ``path`` is untouched. An OSError that names
    no file (a full disk, a file-size limit) is raised again naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temp(path.parent, f".{path.name}.", suffix)
    except OSError as error:
        _raise_naming(error, path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        _raise_naming(error, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _raise_naming(error: OSError, path: Path) -> NoReturn:
    """Raise ``error`` again, naming ``path`` if it names no file."""
    if error.filename is not None or error.errno is None:
        raise error
    raise type(error)(error.errno, error.strerror, str(path)) from error
