"""Safe downloads: temp file in the target folder, checksum, then `os.replace` (never half a file).

`download_file` streams one URL to `.<name>.<random>.part` next to the target while hashing it,
checks the sha256 / md5 when known, and only then renames it into place; on any failure the part
file is removed. `download_dataset` fetches every `Download` of a `DatasetSpec`; zips are unpacked
into a temporary folder, their files checked against the registry's sha256 values, and the
folder renamed into place. Offline or blocked, the error names the dataset, the URL and where to
put the files by hand.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from moe_apps.atomic import atomic_write
from moe_apps.datasets.errors import DatasetError, DownloadError
from moe_apps.datasets.files import complete_file_set, file_digest
from moe_apps.datasets.paths import resolve_data_root
from moe_apps.datasets.registry import DatasetSpec, Download, get_spec

CHUNK = 1 << 16


@dataclass
class DownloadReport:
    """What `download_dataset` did: files fetched, already present, and optional ones skipped."""

    name: str
    root: Path
    fetched: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _progress(enabled: bool):  # a rich Progress, or a do-nothing context when disabled
    if not enabled:
        return nullcontext(None)
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TimeRemainingColumn(), transient=False)


def download_file(
    url: str,
    target: Path,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    dataset: str = "dataset",
    progress: bool = True,
    timeout: float = 60.0,
    manual_hint: Path | None = None,
) -> Path:
    """Fetch `url` to `target` atomically, checking `sha256` / `md5` when given.

    Raises `DownloadError`: offline / refused / HTTP error (naming `dataset`, `url` and the
    folder to put the file in by hand, `manual_hint` if given) or a checksum mismatch (nothing is
    left at `target`). An HTTP error keeps its status in `error.status`.
    """
    target = Path(target)
    wanted = {name: want.lower() for name, want in (("sha256", sha256), ("md5", md5)) if want}
    hashers = {name: hashlib.new(name) for name in wanted}

    def fetch(out) -> None:
        try:
            response = urllib.request.urlopen(url, timeout=timeout)
        except urllib.error.HTTPError as error:
            raise _offline(dataset, url, f"HTTP {error.code} {error.reason}", target,
                           manual_hint, status=error.code) from error
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise _offline(dataset, url, str(reason), target, manual_hint) from error
        with response, _progress(progress) as bar:
            total = response.headers.get("Content-Length") if response.headers else None
            task = None if bar is None else bar.add_task(
                f"{dataset}: {target.name}", total=int(total) if total else None)
            received = 0
            try:
                while block := response.read(CHUNK):
                    out.write(block)
                    received += len(block)
                    for hasher in hashers.values():
                        hasher.update(block)
                    if bar is not None:
                        bar.update(task, advance=len(block))
            except (OSError, http.client.HTTPException) as error:
                raise _offline(dataset, url, f"connection lost: {error!r}", target,
                               manual_hint) from error
            if total and received != int(total):
                raise _offline(dataset, url, f"connection lost after {received} of {total} "
                               "bytes", target, manual_hint)
        for name, want in wanted.items():
            if hashers[name].hexdigest() != want:
                raise DownloadError(
                    f"{name} of the download from {url} is {hashers[name].hexdigest()}, expected "
                    f"{want}; nothing was written (a changed or damaged file: try again, or "
                    f"fetch it by hand and check it)", path=target)

    atomic_write(target, fetch, suffix=".part")  # checked before the rename: never half a file
    return target


def _offline(dataset: str, url: str, reason: str, target: Path, hint: Path | None,
             status: int | None = None) -> DownloadError:
    place = (f"unzip it so that its folder is {hint}" if hint is not None else
             f"put the file in {target.parent}")
    return DownloadError(
        f"could not download {dataset!r} from {url} ({reason}). If this machine is offline or the "
        f"site is blocked, fetch that URL elsewhere and {place} "
        "(or point --data-dir / $MOE_APPS_DATA at a folder that has it).", status=status)


def download_dataset(
    dataset: str | DatasetSpec,
    root: str | Path | None = None,
    *,
    force: bool = False,
    progress: bool = True,
) -> DownloadReport:
    """Fetch every file of `dataset` under the data root; files already in place are kept.

    `force=True` fetches again. Optional files that the server does not have (HTTP 404) are
    skipped. Returns a `DownloadReport`; raises `DownloadError` / `DatasetError` otherwise.
    """
    spec = get_spec(dataset) if isinstance(dataset, str) else dataset
    data_root = resolve_data_root(root)
    report = DownloadReport(spec.name, data_root)
    complete = complete_file_set(spec, data_root) is not None
    for item in spec.downloads:
        # A complete dataset (in any layout) needs only its missing optional files.
        in_place = _in_place(spec, data_root, item) or (complete and not item.optional)
        if in_place and not force:
            report.present.append(item.extract_to or item.target)
            continue
        try:
            if item.extract_to is None:
                download_file(item.url, data_root / item.target, sha256=item.sha256,
                              md5=item.md5, dataset=spec.name, progress=progress)
            else:
                _download_zip(spec, item, data_root, progress)
        except DownloadError as error:
            if item.optional and error.status == 404:
                report.skipped.append(item.target)
                continue
            raise
        report.fetched.append(item.extract_to or item.target)
    return report


def _in_place(spec: DatasetSpec, root: Path, item: Download) -> bool:
    """Whether what `item` would produce is already there (a file, or a complete folder)."""
    if item.extract_to is None:
        return (root / item.target).is_file()
    folder = root / item.extract_to
    return all((folder / name).is_file() for name in _unpacked_files(spec, item))


def _unpacked_files(spec: DatasetSpec, item: Download) -> list[str]:
    """The required files of `spec` that the zip `item` unpacks, relative to `item.extract_to`."""
    prefix = f"{item.extract_to}/"
    return [name[len(prefix):] for name in spec.file_sets[0] if name.startswith(prefix)]


def _download_zip(spec: DatasetSpec, item: Download, root: Path, progress: bool) -> None:
    target = root / str(item.extract_to)
    archive = root / item.target
    download_file(item.url, archive, sha256=item.sha256, md5=item.md5, dataset=spec.name,
                  progress=progress, manual_hint=target)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        try:
            with zipfile.ZipFile(archive) as zipped:
                for member in zipped.namelist():
                    if member.startswith("/") or ".." in Path(member).parts:
                        raise DatasetError(f"unsafe member path {member!r}", path=archive)
                zipped.extractall(staging)
        except (zipfile.BadZipFile, EOFError) as error:
            raise DatasetError(f"truncated or corrupt zip ({error})", path=archive) from error
        member = item.extract_member or target.name
        unpacked = staging / member
        if not unpacked.is_dir():
            raise DatasetError(f"zip has no folder {member!r}", path=archive)
        _check_unpacked(spec, item, unpacked, archive)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old."))
            os.replace(target, old / target.name)
        os.replace(unpacked, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        archive.unlink(missing_ok=True)


def _check_unpacked(spec: DatasetSpec, item: Download, unpacked: Path, archive: Path) -> None:
    """The unpacked folder has every file of the spec and the registry's sha256 values."""
    missing = [name for name in _unpacked_files(spec, item) if not (unpacked / name).is_file()]
    if missing:
        raise DatasetError("zip lacks " + ", ".join(f"{unpacked.name}/{name}" for name in missing),
                           path=archive)
    prefix = f"{item.extract_to}/"
    for name, want in spec.sha256.items():
        if name.startswith(prefix):
            got = file_digest(unpacked / name[len(prefix):])
            if got != want:
                raise DatasetError(f"{name[len(prefix):]} in the zip has sha256 {got}, expected "
                                   f"{want}; nothing was put in place", path=archive)
