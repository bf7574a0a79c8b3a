"""The `moe-apps` command: a thin Typer root that mounts one sub-app per application.

Heavy imports (torch, torchrec, torchvision) happen inside commands, so `moe-apps --help` is instant.
"""

from __future__ import annotations

import os
import sys

import typer

from moe_apps import __version__
from moe_apps.datasets.cli import app as data_app
from moe_apps.recsys.cli import app as recsys_app
from moe_apps.translation.cli import app as translation_app
from moe_apps.vision.cli import app as vision_app

app = typer.Typer(
    name="moe-apps",
    help="Mixture-of-Experts apps: multi-task recommendation (MovieLens), image classification (CIFAR-10), translation (Multi30k), data management.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(data_app, name="data")
app.add_typer(recsys_app, name="recsys")
app.add_typer(translation_app, name="translation")
app.add_typer(vision_app, name="vision")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"moe-apps {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Mixture-of-Experts apps built on moe_core."""


@app.command()
def info(
    data_dir: str = typer.Option(None, "--data-dir", help="Data folder (default: $MOE_APPS_DATA, else ~/.cache/moe-apps)."),
) -> None:
    """Versions, device, threads, and which datasets are found where."""
    from importlib.metadata import PackageNotFoundError, version

    import torch
    from rich.console import Console
    from rich.table import Table

    from moe_apps.datasets import DATASETS, dataset_status, resolve_data_root
    from moe_apps.datasets.paths import DATA_ENV

    def pkg(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    console = Console()
    table = Table(title=f"moe-apps {__version__}", show_header=False)
    table.add_row("python", sys.version.split()[0])
    for name in ("torch", "torchvision", "torchrec", "fbgemm-gpu-cpu", "fbgemm-gpu"):
        table.add_row(name, pkg(name))
    device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    table.add_row("device", device)
    table.add_row("torch threads", str(torch.get_num_threads()))
    root = resolve_data_root(data_dir)
    source = "--data-dir" if data_dir else (f"${DATA_ENV}" if os.environ.get(DATA_ENV) else "default")
    table.add_row("data root", f"{root} ({source})")
    for name in DATASETS:
        table.add_row(f"  {name}", dataset_status(name, root))
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
