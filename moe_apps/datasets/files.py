"""Reading and checking dataset files: text lines, integer tables, checksums, completeness.

Shared by the MovieLens, CIFAR-10 and Multi30k loaders and by `moe-apps data`. Every failure is a
`DatasetError` naming the file and, for text, the 1-based line.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe_apps.datasets.errors import DatasetError, MissingDataError
from moe_apps.datasets.registry import DatasetSpec, get_spec


def read_lines(path: Path, encoding: str) -> list[str]:
    """The lines of a text file without line ends; trailing blank lines dropped, inner ones kept.

    A decoding error names the line it is on.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError as error:
        raise DatasetError("file is missing", path=path) from error
    return decode_lines(raw, path, encoding)


def decode_lines(raw: bytes, path: Path, encoding: str) -> list[str]:
    """`raw` decoded and split into lines (see `read_lines`); `path` is only for messages."""
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DatasetError(f"not valid {encoding} text ({error.reason})", path=path,
                           line=line) from error
    lines = text.split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


@dataclass(frozen=True)
class Table:
    """A parsed delimited table: `ints` (n, ncols) int64 (0 in text columns), `text` columns."""

    ints: np.ndarray
    text: dict[int, list[str]]


def parse_int_table(
    path: Path,
    lines: Sequence[str],
    sep: str,
    ncols: int,
    names: Sequence[str],
    text_columns: Sequence[int] = (),
) -> Table:
    """Split every line on `sep` into `ncols` fields, integers except `text_columns`.

    A line with the wrong number of fields or a non-integer field raises `DatasetError` naming
    the line, the column and what was found.
    """
    counts = [line.count(sep) for line in lines]
    for row, count in enumerate(counts):
        if count != ncols - 1:
            raise DatasetError(
                f"expected {ncols} fields ({sep.join(names)}), got {count + 1}: {lines[row]!r}",
                path=path, line=row + 1)
    if not text_columns and lines:
        # Fast path: every field at once. Split on `sep` itself (never on whitespace), so an
        # empty field or one with a space inside cannot shift the columns of a line.
        try:
            ints = np.array(sep.join(lines).split(sep), dtype=np.int64)
            return Table(ints.reshape(len(lines), ncols), {})
        except (ValueError, OverflowError):
            pass  # the row-by-row pass below finds the bad field and names it
    ints = np.zeros((len(lines), ncols), dtype=np.int64)
    text: dict[int, list[str]] = {col: [] for col in text_columns}
    for row, line in enumerate(lines):
        for col, field in enumerate(line.split(sep)):
            if col in text:
                text[col].append(field)
                continue
            try:
                ints[row, col] = int(field)  # what the fast path accepts, too
            except (ValueError, OverflowError):
                raise DatasetError(f"{names[col]} must be an integer (64-bit), got {field!r}",
                                   path=path, line=row + 1) from None
    return Table(ints, text)


def map_ids(known_sorted: np.ndarray, ids: np.ndarray, path: Path, what: str) -> np.ndarray:
    """Dense indices of `ids` in the sorted array `known_sorted`; an unknown id names its line."""
    index = np.searchsorted(known_sorted, ids)
    found = np.zeros(len(ids), dtype=bool)
    inside = index < len(known_sorted)
    found[inside] = known_sorted[index[inside]] == ids[inside]
    if not found.all():
        row = int(np.flatnonzero(~found)[0])
        raise DatasetError(f"unknown {what} {int(ids[row])} (not in the users/items files)",
                           path=path, line=row + 1)
    return index.astype(np.int64)


def file_digest(path: Path, algorithm: str = "sha256", chunk: int = 1 << 20) -> str:
    """Hex digest of a file, read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def complete_file_set(spec: DatasetSpec, root: Path) -> tuple[str, ...] | None:
    """The first of `spec.file_sets` whose files all exist under `root`, or None."""
    for file_set in spec.file_sets:
        if all((root / name).is_file() for name in file_set):
            return file_set
    return None


def missing_files(spec: DatasetSpec, root: Path) -> list[str]:
    """The files missing from the most complete of `spec.file_sets` (empty when complete)."""
    best: list[str] | None = None
    for file_set in spec.file_sets:
        missing = [name for name in file_set if not (root / name).is_file()]
        if best is None or len(missing) < len(best):
            best = missing
    return best or []


def require_files(spec: DatasetSpec, root: Path) -> tuple[str, ...]:
    """The complete file set of `spec` under `root`; `MissingDataError` says what to fetch where."""
    found = complete_file_set(spec, root)
    if found is None:
        urls = [download.url for download in spec.downloads if not download.optional]
        raise MissingDataError(spec.name, root / spec.folder, missing_files(spec, root), urls)
    return found


def dataset_status(name: str, root: str | Path) -> str:
    """One line for `moe-apps info` / `data list`: complete, incomplete (what is missing) or absent.

    Only checks that files exist; `verify_dataset` checks their contents.
    """
    spec = get_spec(name)
    root = Path(root)
    folder = root / spec.folder
    found = complete_file_set(spec, root)
    if found is not None:
        extra = sum((root / name).is_file() for name in spec.optional_files)
        note = f", {extra} optional files" if extra else ""
        where = (root / found[0]).parent if len(found) > 1 else root / found[0]
        return f"complete: {where}{note}"
    missing = missing_files(spec, root)
    total = len(spec.file_sets[0])
    if len(missing) == total and not folder.exists():
        return f"absent: {folder}"
    return f"incomplete: {len(missing)} files missing in {folder} (e.g. {missing[0]})"
