"""What every app's Typer sub-app shares: the error guard, the exit-code convention, the train options.

Exit codes (the same in `moe-apps data`, `recsys` and every app to come):
    0 success;
    1 (`EXIT_FAILURE`) the command ran and failed: bad input found while working (a folder that is
      not a run, a corrupted checkpoint, an unknown user, a folder held by another job, an OS error
      such as a full disk), a diverged run. One red line on stderr, no traceback, nothing written;
    2 (`EXIT_USAGE`) a usage error found while parsing the command line (unknown option, --epochs 0,
      --seed -1, --device tpu, --device cuda without CUDA): Typer's own message naming the option.

The train options below are validated while parsing, so an invalid one stops the command before
anything is written. Only typer and the standard library are imported at module level; torch is
imported only when ``--device`` names a CUDA device.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer

EXIT_FAILURE = 1
EXIT_USAGE = 2

T = TypeVar("T")


def error_message(error: BaseException) -> str:
    """One line for ``error``: an OSError names its path and says what to check."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        text = f"{error.strerror}: {error.filename}"
        if error.filename2 is not None:
            text += f" -> {error.filename2}"
        return f"{text} (check the path, its permissions and the free disk space)"
    text = str(error) or type(error).__name__
    return " ".join(text.split())  # one line, whatever the message held


def fail(error: BaseException | str) -> NoReturn:
    """Print ``error`` as one red line on stderr and exit with `EXIT_FAILURE`."""
    from rich.console import Console
    from rich.markup import escape

    message = error if isinstance(error, str) else error_message(error)
    Console(stderr=True).print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False,
                               soft_wrap=True)
    raise typer.Exit(EXIT_FAILURE)


FAILURES = (ValueError, OSError, FloatingPointError)  # RunError and DatasetError are ValueErrors


def guard(action: Callable[[], T]) -> T:
    """Run ``action`` (a command body); a bad-input, OS or diverged-run error becomes one line and
    exit code 1. Anything else (a bug) keeps its traceback."""
    try:
        return action()
    except FAILURES as error:
        fail(error)


def _check_device(value: str | None) -> str | None:
    if value is None:
        return None
    known = value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit())
    if not known:
        raise typer.BadParameter(f"{value!r} is not a device; use auto, cpu, cuda or cuda:N")
    if value.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise typer.BadParameter(f"{value!r}: CUDA is not available on this machine; use cpu or auto")
        index = int(value[5:]) if ":" in value else 0
        if index >= torch.cuda.device_count():
            raise typer.BadParameter(f"{value!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return value


# ----- the train options every app's `train` takes ----------------------------------------------
PresetOpt = Annotated[str, typer.Option("--preset", help="Named preset of the app's config.py.")]
EpochsOpt = Annotated[int | None, typer.Option("--epochs", min=1, help="Maximum epochs (default: the preset's).")]
SeedOpt = Annotated[int | None, typer.Option("--seed", min=0, help="Seed of data order, splits and weights (>= 0).")]
OutOpt = Annotated[Path | None, typer.Option("--out", help="Run folder (default runs/<app>/<name>-<time>).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run in --out from checkpoints/last.pt.")]
DeviceOpt = Annotated[str | None, typer.Option("--device", callback=_check_device,
                                               help="auto | cpu | cuda | cuda:N (default: the preset's).")]
DataDirOpt = Annotated[str | None, typer.Option(
    "--data-dir", help="Data folder (default: with --resume the run's, else $MOE_APPS_DATA, else ~/.cache/moe-apps).")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]


def train_overrides(*, epochs: int | None = None, seed: int | None = None, device: str | None = None,
                    prefix: str = "") -> dict[str, Any]:
    """The shared train options as `apply_overrides` names: ``{prefix}epochs``, ``{prefix}seed``,
    ``{prefix}device`` (None = not given; ``prefix="train."`` for an app that nests them)."""
    return {f"{prefix}{name}": value for name, value in (("epochs", epochs), ("seed", seed), ("device", device))
            if value is not None}


def default_out(app: str, name: str) -> Path:
    """``runs/<app>/<name>-<YYYYmmdd-HHMMSS>``: the run folder when --out is not given."""
    return Path("runs") / app / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
