"""Checkpoints of the training loop: atomic writes, safe reads, and the app / model_config check.

A checkpoint is one ``torch.save`` dict (format `FORMAT_VERSION`) holding the model weights and, for
checkpoints/last.pt, everything an exact resume needs: optimizer, scheduler, the RNG states of
python / numpy / torch, the position (epoch, step within the epoch, global step), the early-stopping
state, the history and the running sums of the unfinished epoch. It is written to a temp file in the
same folder, then ``os.replace``-d, so a kill mid-write never leaves a half-written checkpoint.
Only tensors, numbers, strings, lists and dicts go in, so it loads with ``weights_only=True``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_apps.atomic import atomic_write

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


def save_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    """Write ``state`` (plus the format version) atomically to ``path``."""
    payload = {"format_version": FORMAT_VERSION, **state}
    atomic_write(Path(path), lambda f: torch.save(payload, f))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict to CPU, with a clear error naming the file if it is missing, truncated,
    corrupted, or not a moe-apps training checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises RuntimeError / EOFError / UnpicklingError here
        raise ValueError(
            f"checkpoint {path} cannot be read (truncated or corrupted?): {type(error).__name__}: "
            f"{error}. Delete it to train from scratch, or resume from another checkpoint."
        ) from error
    if not isinstance(state, dict) or "format_version" not in state or "model" not in state:
        raise ValueError(f"checkpoint {path} is not a moe-apps training checkpoint (no format_version/model)")
    if state["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {path} has format version {state['format_version']}, this code reads "
            f"version {FORMAT_VERSION}"
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
        raise ValueError(f"checkpoint {path} does not fit this model's parameters: {error}") from error
    return {key: state[key] for key in METADATA_KEYS if key in state}
