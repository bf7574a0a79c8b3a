"""Checkpoints of the training loop: atomic writes, safe reads, and the app / model_config check.

A checkpoint is one ``torch.save`` dict (format `FORMAT_VERSION`) holding the model weights and, for
checkpoints/last.pt, everything an exact resume needs: optimizer, scheduler, the RNG states of
python / numpy / torch, the position (epoch, step within the epoch, global step), the early-stopping
state, the history and the running sums of the unfinished epoch. It is written to a temp file in the
same folder, then ``os.replace``-d, so a kill mid-write never leaves a half-written checkpoint.
Only tensors, numbers, strings, lists and dicts go in, so it loads with ``weights_only=True``.

Integrity: every checkpoint carries ``sha256``, a digest of its whole content (every tensor's dtype,
shape and bytes, every other value's repr, walked in a fixed order), computed when written and
verified on every read; a mismatch (bytes changed on disk after the write) is a `RunError` naming
the file. Checkpoints written before digests existed have none and load unverified. Errors of
torch's loader become one `RunError` line naming the file (never torch's advice to load with
``weights_only=False``). ``checkpoints/epoch-NNNN.pt`` snapshots (``TrainConfig.snapshots``) are
averaged by `average_snapshots` (checkpoint averaging, Vaswani et al. 2017).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moe_apps.atomic import atomic_write
from moe_apps.training.run import RunError

FORMAT_VERSION = 1
METADATA_KEYS = (
    "format_version", "app", "model_config", "train_config", "epoch", "step_in_epoch",
    "global_step", "best_metric", "best_epoch", "best_metrics", "bad_epochs", "stopped_early", "history",
)


def normalize_config(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """``model_config`` as plain JSON values (tuples -> lists, other objects -> str), so the copy in
    a checkpoint and the current one compare equal exactly when they describe the same model."""
    if not isinstance(model_config, Mapping):
        raise ValueError(f"model_config must be a mapping (e.g. dataclasses.asdict(config)), got {type(model_config).__name__}")
    return json.loads(json.dumps(dict(model_config), default=str, sort_keys=True))


def _feed(h: Any, value: Any) -> None:
    """Feed ``value`` into hash ``h`` in a fixed order (dict keys sorted by repr)."""
    if isinstance(value, Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{flat.dtype}{tuple(value.shape)}".encode())
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    elif isinstance(value, Mapping):
        h.update(f"D{len(value)}".encode())
        for key in sorted(value, key=repr):
            h.update(repr(key).encode())
            _feed(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(f"L{len(value)}".encode())
        for item in value:
            _feed(h, item)
    else:
        h.update(f"V{value!r};".encode())


def content_digest(state: Mapping[str, Any]) -> str:
    """sha256 of a checkpoint dict's content (its own ``sha256`` entry left out)."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != "sha256"})
    return h.hexdigest()


def save_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    """Write ``state`` (plus the format version and its digest) atomically to ``path``. The bytes are
    made in memory first, so a full disk or a file-size limit is an OSError naming ``path``."""
    payload = {"format_version": FORMAT_VERSION, **state}
    payload["sha256"] = content_digest(payload)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write(Path(path), lambda f: f.write(buffer.getbuffer()))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict to CPU and verify its digest; a `RunError` naming the file if it is
    missing, unreadable, truncated, corrupted, or not a moe-apps training checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"checkpoint {path} does not exist")
    advice = "delete it and train again, or resume / evaluate from another checkpoint"
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles on stderr, in several lines
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as error:
        raise RunError(f"checkpoint {path} cannot be read: {error.strerror or error}") from error
    except Exception as error:  # torch raises RuntimeError / EOFError / UnpicklingError here
        raise RunError(
            f"checkpoint {path} cannot be read ({type(error).__name__}): it is truncated, corrupted "
            f"or holds objects other than tensors and plain values; {advice}"
        ) from error
    if not isinstance(state, dict) or "format_version" not in state or "model" not in state:
        raise RunError(f"checkpoint {path} is not a moe-apps training checkpoint (no format_version/model)")
    if state["format_version"] != FORMAT_VERSION:
        raise RunError(
            f"checkpoint {path} has format version {state['format_version']}, this code reads "
            f"version {FORMAT_VERSION}"
        )
    if "sha256" in state and content_digest(state) != state["sha256"]:
        raise RunError(
            f"checkpoint {path} fails its integrity check (its bytes changed after it was written: "
            f"a disk fault or an edit); {advice}"
        )
    return state


def check_compatible(
    state: Mapping[str, Any], path: Path, *, app: str, model_config: Mapping[str, Any] | None
) -> None:
    """ValueError naming every differing key unless the checkpoint was made by ``app`` with
    ``model_config`` (skipped when ``model_config`` is None)."""
    if state.get("app") != app:
        raise ValueError(f"checkpoint {path} was trained by app {state.get('app')!r}, not {app!r}")
    if model_config is None:
        return
    saved, current = state.get("model_config") or {}, normalize_config(model_config)
    problems = []
    for key in sorted(set(saved) | set(current)):
        if key not in current:
            problems.append(f"checkpoint was trained with {key}={saved[key]!r}, this model has no {key}")
        elif key not in saved:
            problems.append(f"checkpoint has no {key}, this model has {key}={current[key]!r}")
        elif saved[key] != current[key]:
            problems.append(
                f"checkpoint was trained with {key}={saved[key]!r}, this model has {key}={current[key]!r}"
            )
    if problems:
        raise ValueError(f"checkpoint {path} does not match this model: " + "; ".join(problems))


def load_checkpoint(
    path: str | Path, model: nn.Module, *, app: str, model_config: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Load the weights of checkpoint ``path`` into ``model`` (after checking ``app`` and, if given,
    ``model_config``) and return the checkpoint's metadata (`METADATA_KEYS`: epoch, best metrics,
    history, configs, ...)."""
    path = Path(path)
    state = read_checkpoint(path)
    check_compatible(state, path, app=app, model_config=model_config)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise ValueError(f"checkpoint {path} does not fit this model's parameters: "
                         f"{' '.join(str(error).split())}") from error
    return {key: state[key] for key in METADATA_KEYS if key in state}


SNAPSHOT_PATTERN = re.compile(r"epoch-(\d+)\.pt")


def snapshot_path(run_dir: Path, epoch: int) -> Path:
    """checkpoints/epoch-NNNN.pt: the weights at the end of ``epoch`` (from 1)."""
    return Path(run_dir) / "checkpoints" / f"epoch-{epoch:04d}.pt"


def list_snapshots(run_dir: str | Path) -> list[Path]:
    """The epoch snapshots of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in folder.glob("epoch-*.pt") if (m := SNAPSHOT_PATTERN.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def average_checkpoints(paths: Sequence[str | Path]) -> dict[str, Tensor]:
    """The element-wise mean of the model weights of ``paths`` (each digest-verified); integer
    buffers are taken from the last one. Float sums in float64, cast back to each tensor's dtype."""
    if not paths:
        raise ValueError("average_checkpoints needs at least one checkpoint")
    states = [read_checkpoint(p)["model"] for p in paths]
    keys = list(states[-1])
    for path, state in zip(paths, states, strict=True):
        if list(state) != keys:
            raise RunError(f"checkpoint {path} holds other weights than {paths[-1]}; cannot average them")
    averaged = {}
    for key in keys:
        last = states[-1][key]
        if last.is_floating_point():
            total = sum(s[key].double() for s in states)
            averaged[key] = (total / len(states)).to(last.dtype)
        else:
            averaged[key] = last.clone()
    return averaged


def average_snapshots(run_dir: str | Path, last: int | None = None) -> dict[str, Tensor]:
    """The mean weights of the run's ``last`` newest epoch snapshots (all kept ones if None)."""
    snapshots = list_snapshots(run_dir)
    if not snapshots:
        raise RunError(f"{run_dir} has no checkpoints/epoch-*.pt snapshots; train with TrainConfig.snapshots > 0")
    if last is not None:
        if last < 1:
            raise ValueError(f"last must be >= 1, got {last}")
        if last > len(snapshots):
            raise RunError(f"{run_dir} keeps {len(snapshots)} epoch snapshots, fewer than the {last} asked for")
        snapshots = snapshots[-last:]
    return average_checkpoints(snapshots)
