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
imported only when ``--device`` names a CUDA device, and by `relaunch_with_torchrun`.

``--nproc N`` (`NprocOpt`): a train command calls `relaunch_with_torchrun` once its options are
checked; it runs the same command (minus ``--nproc``, with the resolved ``--out``) in N local
processes through torch's own launcher (`torch.distributed.run`, what ``torchrun`` runs: exactly
``python -m torch.distributed.run --standalone --nproc-per-node N -m moe_apps.cli <app> train ...``)
and exits with 0, or with one line naming the rank that failed and exit code 1.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
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
    rank, world = launch_rank()
    if world > 1:  # under torchrun: say which process
        message = f"rank {rank}: {message}"
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
    except RuntimeError as error:  # under torchrun: another rank died inside a collective
        if launch_rank()[1] > 1 and type(error).__name__.startswith("Dist"):
            fail(f"lost contact with another rank ({type(error).__name__}); the launcher stops the job")
        raise


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
NprocOpt = Annotated[int, typer.Option(
    "--nproc", min=1, help="Train in N local processes (torch.distributed.run; DDP, experts split "
                           "over the processes where the app supports it). 1 = this process.")]


def train_overrides(*, epochs: int | None = None, seed: int | None = None, device: str | None = None,
                    prefix: str = "") -> dict[str, Any]:
    """The shared train options as `apply_overrides` names: ``{prefix}epochs``, ``{prefix}seed``,
    ``{prefix}device`` (None = not given; ``prefix="train."`` for an app that nests them)."""
    return {f"{prefix}{name}": value for name, value in (("epochs", epochs), ("seed", seed), ("device", device))
            if value is not None}


def default_out(app: str, name: str) -> Path:
    """``runs/<app>/<name>-<YYYYmmdd-HHMMSS>``: the run folder when --out is not given."""
    return Path("runs") / app / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"


# ----- --nproc: the same train command in N processes -------------------------------------------
def launch_rank() -> tuple[int, int]:
    """``(rank, world size)`` under torchrun, else ``(0, 1)`` (from the environment, no torch)."""
    from moe_apps.training.run import launch_rank as rank_of_env

    return rank_of_env()


def main_console() -> Any:
    """A rich Console that prints on rank 0 only (every process of a one-process run)."""
    from rich.console import Console

    return Console(quiet=launch_rank()[0] > 0)


@dataclass(frozen=True)
class LaunchFailure:
    """The process a torchrun job failed on: a killed one before one that exited with an error (it
    may have lost contact with the killed one) before one the launcher stopped with SIGTERM."""

    rank: int
    local_rank: int
    exit_code: int
    signal: str | None  # "SIGKILL" when killed by a signal

    def message(self, out: Path | None = None) -> str:
        """One line: which rank, how it ended, and how to continue (``--resume`` when ``out``
        holds a checkpoint, else a fresh start)."""
        how = (f"was killed by {self.signal} (exit code {self.exit_code})" if self.signal
               else f"exited with code {self.exit_code}" + (" (its error is above)" if self.exit_code == 1 else ""))
        head = f"rank {self.rank} (local rank {self.local_rank}) {how}; the launcher stopped the other ranks"
        if out is not None and not (Path(out) / "checkpoints" / "last.pt").is_file():
            return f"{head}. No checkpoint was saved yet: run the same command again to start afresh"
        where = f" --out {out}" if out is not None else ""
        return f"{head}. Rerun with --resume{where} to continue from the last complete checkpoint"


def run_torchrun(nproc: int, program: list[str]) -> LaunchFailure | None:
    """``python -m torch.distributed.run --standalone --nproc-per-node N <program>``, run by torch's
    launcher in this process (its own argument parser and `run`, so the failure comes back as data,
    not as the launcher's traceback). None when every rank exited 0."""
    import logging

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun.get_args_parser().parse_args(["--standalone", "--nproc-per-node", str(nproc), *program])
    logger = logging.getLogger("torch.distributed.elastic")
    level = logger.level
    logger.setLevel(logging.CRITICAL)  # the summary below replaces its multi-line report
    try:
        torchrun.run(args)
    except ChildFailedError as error:
        return first_failure(error.failures)
    finally:
        logger.setLevel(level)
    return None


def first_failure(failures: dict[int, Any]) -> LaunchFailure:
    """The failure to report among torch's ``{rank: ProcessFailure}``: a rank killed by a signal,
    then one that exited with an error, then one the launcher stopped (SIGTERM) after the first
    failure; earliest first, then the lowest rank."""
    def order(item: tuple[int, Any]) -> tuple[int, float, int]:
        failure = item[1]
        kind = 2 if failure.signal_name() == "SIGTERM" else (1 if failure.exitcode >= 0 else 0)
        return kind, failure.timestamp, item[0]

    rank, first = min(failures.items(), key=order)
    return LaunchFailure(rank, first.local_rank, first.exitcode, first.signal_name() if first.exitcode < 0 else None)


def _given_args(skip: set[str]) -> list[str]:
    """The options of the running Typer command that were given (not defaulted), as argv."""
    try:  # typer >= 0.2x vendors click
        from typer._click.globals import get_current_context
    except ImportError:  # pragma: no cover - typer on click
        from click import get_current_context
    ctx = get_current_context()
    argv: list[str] = []
    for param in ctx.command.params:
        name = param.name or ""
        value = ctx.params.get(name)
        source = ctx.get_parameter_source(name)
        if name in skip or value is None or getattr(source, "name", "") in ("DEFAULT", "DEFAULT_MAP"):
            continue
        if param.param_type_name != "option":
            argv += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
        elif param.is_flag:
            if value or param.secondary_opts:
                argv.append(param.opts[0] if value else param.secondary_opts[0])
        else:
            for item in value if param.multiple else [value]:
                argv += [param.opts[0], str(getattr(item, "value", item))]
    return argv


def relaunch_with_torchrun(nproc: int, app: str, *, out: Path | None, resume: bool = False) -> None:
    """Run this `moe-apps <app> train` command in ``nproc`` processes and exit, when ``nproc`` > 1
    and this process is not already one of a torchrun job; otherwise return and train here.

    The given options are passed on unchanged (minus ``--nproc``), with ``--out`` set to ``out``
    (the resolved run folder: a default one named after the time must be named once, here).
    The run folder is checked once before launching (a bad --out is one line, nothing started).
    Exits 0 when every rank succeeded; a failed rank is one line (`LaunchFailure.message`), exit 1.
    """
    if nproc <= 1 or launch_rank()[1] > 1:
        return
    if out is not None:
        from moe_apps.training.run import check_run_folder

        check_run_folder(out, app=app, resume=resume)
    argv = ["-m", "moe_apps.cli", app, "train", *_given_args({"nproc", "out"})]
    if out is not None:
        argv += ["--out", str(out)]
    env_threads = os.environ.get("OMP_NUM_THREADS")
    failure = run_torchrun(nproc, argv)
    if env_threads is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    if failure is not None:
        fail(failure.message(out))
    raise typer.Exit(0)
