"""The run lifecycle every app shares: start (or resume) a run in a folder, open a finished run for
eval / predict, and lay CLI overrides onto a frozen preset config.

A run folder holds ``config.json`` = ``{"app", "config", "data_root", "format": 1}`` (folders
written before "format" existed still open), the training loop's files (``metrics.jsonl``,
``checkpoints/{last,best}.pt``, ``curves.png``) and whatever the app adds. While a job trains into
it, the folder is held: ``fcntl.flock`` on ``<run>/.lock`` (the holder's pid written inside for
the message), so a second job is refused, and the kernel releases the lock when the holder exits
or is killed (kill -9 included); the ``.lock`` file itself stays. Readers (`open_run`) take no lock:
checkpoints are replaced atomically, so eval of a run still training reads its last complete one.
A job of several processes (torchrun: RANK / WORLD_SIZE in the environment) holds its folder once:
every rank calls `start_run`, rank 0 alone checks, creates, locks and cleans the folder and writes
config.json, then tells the other ranks (a broadcast on the default process group) that the run
started, or why it did not; ranks > 0 never create, lock or write anything in it.

Standard library only (torch is imported only under torchrun), so a CLI can check a folder before
any heavy import.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from moe_apps.atomic import atomic_write

RUN_FORMAT = 1
LOCK_NAME = ".lock"
CONFIG_NAME = "config.json"
CHECKPOINT_NAMES = ("last", "best")

C = TypeVar("C")


class RunError(ValueError):
    """A one-line, user-facing problem with a run folder: not a run, another app's run, held by
    another job, a corrupted checkpoint, a folder that cannot be written."""


@dataclass(frozen=True)
class RunInfo:
    """A run folder as `start_run` / `open_run` see it.

    Attributes:
        run_dir: the folder.
        app: the app that made it ("recsys", "vision", ...).
        config: the app's config as plain JSON values (``config.json["config"]``).
        data_root: the data folder the run was trained on (None if it did not record one).
    """

    run_dir: Path
    app: str
    config: dict[str, Any]
    data_root: Path | None

    def checkpoint(self, name: str = "best") -> Path:
        """``checkpoints/<name>.pt`` ("best" or "last"); RunError saying why it is missing."""
        if name not in CHECKPOINT_NAMES:
            raise ValueError(f"checkpoint name must be one of {CHECKPOINT_NAMES}, got {name!r}")
        path = self.run_dir / "checkpoints" / f"{name}.pt"
        if not path.is_file():
            raise RunError(
                f"{self.run_dir} has no checkpoints/{name}.pt: the run has not finished an epoch "
                "(still in its first one, or stopped before its end); wait for it, or train it again"
            )
        return path


def launch_rank() -> tuple[int, int]:
    """``(rank, world size)`` of this process under torchrun (RANK / WORLD_SIZE), else ``(0, 1)``."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return (int(os.environ.get("RANK", "0") or 0), world) if world > 1 else (0, 1)


def _share_outcome(message: str | None) -> str | None:
    """Rank 0's ``message`` (None: the run started) on every rank of the torchrun job."""
    import torch.distributed as dist

    from moe_apps.training.distributed import current_context

    current_context()  # the process group, once
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _fix(app: str) -> str:
    return f"a run folder made by `moe-apps {app} train`"


def _read_config(run_dir: Path, app: str) -> dict[str, Any]:
    """The parsed config.json of ``run_dir``; RunError if the folder is not a run of ``app``."""
    if not run_dir.exists():
        raise RunError(f"{run_dir} does not exist; expected {_fix(app)}")
    if not run_dir.is_dir():
        raise RunError(f"{run_dir} is a file, not a run folder; expected {_fix(app)}")
    path = run_dir / CONFIG_NAME
    if not path.is_file():
        raise RunError(f"{run_dir} is not a {app} run folder (it has no {CONFIG_NAME}); expected {_fix(app)}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunError(f"{path} cannot be read as JSON ({error}); it is not {_fix(app)}") from error
    other = raw.get("app") if isinstance(raw, dict) else None
    if other != app:
        what = f"a {other} run (config.json has app={other!r})" if isinstance(other, str) else (
            f"not a {app} run folder (config.json has app={other!r})")
        raise RunError(f"{run_dir} is {what}; expected {_fix(app)}")
    if not isinstance(raw.get("config"), dict):
        raise RunError(f"{path} has no 'config' object; it is not {_fix(app)}")
    fmt = raw.get("format", RUN_FORMAT)
    if fmt != RUN_FORMAT:
        raise RunError(f"{path} has run format {fmt!r}; this version of moe-apps reads format {RUN_FORMAT}")
    return raw


def open_run(run_dir: str | Path, *, app: str) -> RunInfo:
    """The run in ``run_dir`` for eval / predict / resume; writes nothing.

    RunError (one line: what the folder is, what was expected) for a missing folder, a folder that
    is not a run, or a run of another app.
    """
    run_dir = Path(run_dir)
    raw = _read_config(run_dir, app)
    root = raw.get("data_root")
    return RunInfo(run_dir, app, raw["config"], Path(root) if isinstance(root, str) and root else None)


def _holder(lock_path: Path) -> str:
    try:
        pid = lock_path.read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "another process"


def _check_free(run_dir: Path) -> None:
    """RunError if a live job holds ``run_dir`` (probes the lock without keeping it)."""
    lock_path = run_dir / LOCK_NAME
    if not lock_path.is_file():
        return
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunError(_held_message(run_dir, lock_path)) from None
    finally:
        os.close(fd)


def _held_message(run_dir: Path, lock_path: Path) -> str:
    return (f"{run_dir} is held by another training job ({_holder(lock_path)}); wait for it to end, "
            "or choose another --out")


def _has_run(run_dir: Path) -> bool:
    return (run_dir / CONFIG_NAME).exists() or (run_dir / "checkpoints").exists()


def _check_writable(run_dir: Path) -> None:
    """RunError if ``run_dir`` (or its nearest existing ancestor, for a new folder) cannot be written."""
    probe = run_dir
    while not probe.exists() and probe != probe.parent:
        if probe.is_symlink():
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise RunError(f"cannot create the run folder {run_dir}: {probe} is a file; choose another --out")
    if probe.is_dir() and not os.access(probe, os.W_OK | os.X_OK):
        raise RunError(f"cannot write the run folder {run_dir}: {probe} is not writable; choose another --out")


def check_run_folder(out_dir: str | Path, *, app: str, resume: bool = False) -> RunInfo | None:
    """Every refusal `start_run` can make before it writes anything, without writing anything.

    A fresh run: ``out_dir`` must be creatable and hold no run, except a run of ``app`` that saved
    no checkpoint (killed in its first epoch), which starts over. ``resume``: ``out_dir`` must
    hold a run of ``app`` with a checkpoints/last.pt; its `RunInfo` is returned (the saved config,
    to lay overrides on, and its data folder). Either way: RunError if another job holds it.
    Apps call this before loading data, so that a bad --out fails fast. Under torchrun only rank 0
    probes the lock (the other ranks would find it held by rank 0).
    """
    return _check(Path(out_dir), app=app, resume=resume, probe_lock=launch_rank()[0] == 0)


def _check(run_dir: Path, *, app: str, resume: bool, probe_lock: bool) -> RunInfo | None:
    _check_writable(run_dir)
    if probe_lock and run_dir.is_dir():
        _check_free(run_dir)
    if not resume:
        if run_dir.is_dir() and _has_run(run_dir) and not _never_saved(run_dir, app):
            raise RunError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
        return None
    info = open_run(run_dir, app=app)
    if not (run_dir / "checkpoints" / "last.pt").is_file():
        fix = ("train it again without --resume to start afresh there, or delete it" if _never_saved(run_dir, app)
               else "delete it or choose another --out to start afresh")
        raise RunError(f"{run_dir} has no checkpoints/last.pt to resume from (the run stopped before its "
                       f"first epoch ended, or last.pt was deleted); {fix}")
    return info


def _never_saved(run_dir: Path, app: str) -> bool:
    """Whether ``run_dir`` holds a run of ``app`` that saved no checkpoint (killed or failed in its
    first epoch): a fresh run may start over in it, as nothing of it would be lost."""
    if any((run_dir / "checkpoints").glob("*.pt")):
        return False
    try:
        open_run(run_dir, app=app)
    except RunError:
        return False
    return True


STALE_TEMP = re.compile(r"\..+\.[0-9a-f]+\.tmp")  # `moe_apps.atomic`'s temp names: .<name>.<hex>.tmp


def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """Delete the ``.<name>.<hex>.tmp`` files an interrupted atomic write left in ``run_dir`` and its
    subfolders (only call this while holding the folder: the holder is its only writer). A subfolder
    that is a run folder of its own (it has a config.json or a .lock, e.g. ``--out runs`` above
    other runs) is not entered: its temp files may belong to a live job."""
    removed = []
    for folder, subfolders, files in os.walk(run_dir):
        subfolders[:] = sorted(d for d in subfolders
                               if not any((Path(folder, d, n)).exists() for n in (CONFIG_NAME, LOCK_NAME)))
        for name in sorted(files):
            path = Path(folder, name)
            if STALE_TEMP.fullmatch(name) and path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def write_run_config(run_dir: Path, *, app: str, config: Mapping[str, Any], data_root: str | Path | None) -> None:
    """Write ``config.json`` atomically."""
    payload = {"app": app, "config": dict(config), "data_root": None if data_root is None else str(data_root),
               "format": RUN_FORMAT}
    text = json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"
    atomic_write(run_dir / CONFIG_NAME, lambda f: f.write(text.encode()))


@contextmanager
def start_run(out_dir: str | Path, *, app: str, config: Mapping[str, Any] | None,
              data_root: str | Path | None, resume: bool = False) -> Iterator[RunInfo]:
    """Hold ``out_dir`` for one training job and give its `RunInfo`.

    The app validates its config (and device) BEFORE calling this. Then: the `check_run_folder`
    refusals; the folder is created and its lock taken (RunError "held by pid N" if another job has
    it; released when the block ends or the process dies); stale ``.*.tmp`` files are removed; on
    ``resume`` checkpoints/last.pt is read and its digest verified (RunError if it fails);
    ``config.json`` is written with ``config`` (on ``resume``, the saved config is kept when
    ``config`` is None, else replaced by it: the caller checked that the overrides are compatible).
    OSErrors (a folder that cannot be written) become RunError naming the path. Under torchrun
    ranks > 0 wait for rank 0 to do all this and get the same `RunInfo` (module docstring).
    """
    if not isinstance(app, str) or not app:
        raise ValueError(f"app must be the app's name such as 'recsys', got {app!r}")
    rank, world = launch_rank()
    if rank > 0:
        problem = _share_outcome(None)
        if problem is not None:
            raise RunError(f"rank 0 could not start the run ({problem})")
        saved = open_run(out_dir, app=app) if resume else None
        yield _run_info(Path(out_dir), app, config, data_root, saved)
        return
    try:
        fd, saved = _hold(Path(out_dir), app=app, config=config, data_root=data_root, resume=resume)
    except BaseException as error:
        if world > 1:
            _share_outcome(str(error) or type(error).__name__)
        raise
    try:
        if world > 1:
            _share_outcome(None)
        yield _run_info(Path(out_dir), app, config, data_root, saved)
    finally:
        os.close(fd)  # releases the flock


def _run_info(run_dir: Path, app: str, config: Mapping[str, Any] | None, data_root: str | Path | None,
              saved: RunInfo | None) -> RunInfo:
    if config is not None:
        root = data_root if data_root is not None else (saved.data_root if saved else None)
        return RunInfo(run_dir, app, json.loads(json.dumps(dict(config), default=str)),
                       Path(root) if root is not None else None)
    assert saved is not None
    return saved if data_root is None else dataclasses.replace(saved, data_root=Path(data_root))


def _hold(run_dir: Path, *, app: str, config: Mapping[str, Any] | None, data_root: str | Path | None,
          resume: bool) -> tuple[int, RunInfo | None]:
    """`start_run`'s work on rank 0: the open, locked descriptor of ``.lock`` and the saved run."""
    saved = check_run_folder(run_dir, app=app, resume=resume)
    if not resume and config is None:
        raise ValueError("start_run needs the run's config for a fresh run")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock_path = run_dir / LOCK_NAME
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as error:
        raise RunError(f"cannot create the run folder {run_dir}: {error.strerror or error}; choose another --out") from error
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(_held_message(run_dir, lock_path)) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        # Checked again under the lock: another job may have started or finished meanwhile.
        saved = _check(run_dir, app=app, resume=resume, probe_lock=False)
        remove_stale_temp_files(run_dir)
        if resume:  # a corrupted last.pt is refused before config.json is touched
            from moe_apps.training.checkpoint import read_checkpoint

            read_checkpoint(run_dir / "checkpoints" / "last.pt")
        if config is not None:
            root = data_root if data_root is not None else (saved.data_root if saved else None)
            write_run_config(run_dir, app=app, config=config, data_root=root)
    except BaseException:
        os.close(fd)
        raise
    return fd, saved


# ----- CLI overrides onto frozen configs ---------------------------------------------------------
def apply_overrides(config: C, overrides: Mapping[str, Any]) -> C:
    """``config`` (a frozen dataclass) with ``overrides`` laid on it: None values are skipped,
    nested dataclass fields go by dotted name (``"model.num_experts"``), every touched dataclass is
    rebuilt with `dataclasses.replace` (so its own validation runs). ValueError naming an unknown
    field and the known ones."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise ValueError(f"apply_overrides needs a dataclass instance, got {type(config).__name__}")
    nested: dict[str, dict[str, Any]] = {}
    direct: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(config)}
    for key, value in overrides.items():
        if value is None:
            continue
        head, _, rest = key.partition(".")
        if head not in names:
            raise ValueError(
                f"unknown option {key!r} for {type(config).__name__}; known fields: {', '.join(sorted(names))}"
            )
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    for head, sub in nested.items():
        inner = direct.get(head, getattr(config, head))
        if not dataclasses.is_dataclass(inner):
            raise ValueError(f"{head!r} of {type(config).__name__} is not a nested config; "
                             f"cannot set {', '.join(f'{head}.{k}' for k in sub)}")
        direct[head] = apply_overrides(inner, sub)
    return dataclasses.replace(config, **direct) if direct else config
