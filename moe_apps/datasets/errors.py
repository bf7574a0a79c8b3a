"""Errors of the data layer: one `DatasetError` (a ValueError) that always names the file and line.

Every loader in `moe_apps.datasets` raises these instead of returning something half-loaded, so a
bad download, a truncated archive or a hand-edited file fails loudly with a message that says which
file, which line, what was found and what was expected.
"""

from __future__ import annotations

from pathlib import Path


class DatasetError(ValueError):
    """A dataset file is missing, truncated or malformed.

    `path` is the file (or folder) at fault and `line` the 1-based line number when there is one.
    """

    def __init__(self, message: str, *, path: str | Path | None = None, line: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}" + (f", line {line}" if line is not None else "") + ": "
        super().__init__(where + message)
        self.path = None if path is None else Path(path)
        self.line = line


class MissingDataError(DatasetError):
    """The files of a dataset are not where they are looked for; says where to put them."""

    def __init__(self, dataset: str, folder: str | Path, missing: list[str], urls: list[str]):
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        sources = "\n  ".join(urls)
        message = (
            f"dataset {dataset!r} is missing {shown} under {folder}. "
            f"Run `moe-apps data download {dataset}` (needs internet), or fetch\n  {sources}\n"
            f"by hand and put the files in {folder} (see `moe-apps data info {dataset}`); "
            f"--data-dir or $MOE_APPS_DATA choose another data folder."
        )
        super().__init__(message)
        self.dataset = dataset
        self.folder = Path(folder)
        self.missing = list(missing)


class DownloadError(DatasetError):
    """A download failed (offline, refused, HTTP error, or a checksum mismatch).

    `status` is the HTTP status code when the server answered with an error, else None.
    """

    def __init__(self, message: str, *, path: str | Path | None = None, status: int | None = None):
        super().__init__(message, path=path)
        self.status = status
