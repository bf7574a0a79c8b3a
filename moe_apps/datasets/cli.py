"""`moe-apps data`: list, inspect, download and verify the datasets the apps train on.

Heavy work (numpy, torch, loaders) is imported inside the commands, so `--help` stays instant.
Every command takes `--data-dir` (else $MOE_APPS_DATA, else ~/.cache/moe-apps). Exit codes are the
platform's (`moe_apps.training.cli`): 1 when a dataset is not valid or a command fails (one line,
through `guard`), 2 for a usage error such as an unknown dataset name.
"""

from __future__ import annotations

import typer

from moe_apps.training.cli import EXIT_FAILURE, fail, guard

app = typer.Typer(help="Datasets: list, info, download, verify.", no_args_is_help=True)

DATA_DIR = typer.Option(
    None, "--data-dir", help="Data folder (default: $MOE_APPS_DATA, else ~/.cache/moe-apps)."
)


def _spec(name: str):
    from moe_apps.datasets.registry import DATASETS

    if name not in DATASETS:
        raise typer.BadParameter(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}",
                                 param_hint="NAME")
    return DATASETS[name]


def _names(name: str) -> list[str]:
    """Every dataset for 'all', else just `name` (checked)."""
    from moe_apps.datasets.registry import DATASETS

    return list(DATASETS) if name == "all" else [_spec(name).name]


@app.command("list")
def list_datasets(data_dir: str = DATA_DIR) -> None:
    """Every known dataset and whether it is found under the data root."""
    from rich.console import Console
    from rich.table import Table

    from moe_apps.datasets.files import dataset_status
    from moe_apps.datasets.paths import resolve_data_root
    from moe_apps.datasets.registry import DATASETS

    root = resolve_data_root(data_dir)
    table = Table(title=f"datasets under {root}")
    table.add_column("name", style="bold")
    table.add_column("what")
    table.add_column("status")
    for name, spec in DATASETS.items():
        status = dataset_status(name, root)
        style = "green" if status.startswith("complete") else "yellow"
        table.add_row(name, spec.title, f"[{style}]{status}[/{style}]")
    Console(width=160).print(table)


@app.command()
def info(name: str = typer.Argument(..., help="Dataset name (see `moe-apps data list`)."),
         data_dir: str = DATA_DIR) -> None:
    """Where a dataset comes from, where it goes, its checksums, terms and citation."""
    from rich.console import Console
    from rich.table import Table

    from moe_apps.datasets.files import dataset_status
    from moe_apps.datasets.paths import resolve_data_root

    spec = _spec(name)
    root = resolve_data_root(data_dir)
    table = Table(title=spec.name, show_header=False)
    table.add_row("what", spec.title)
    table.add_row("homepage", spec.homepage)
    table.add_row("folder", str(root / spec.folder))
    table.add_row("status", dataset_status(name, root))
    for i, file_set in enumerate(spec.file_sets):
        label = "files" if i == 0 else "or files"
        present = sum((root / f).is_file() for f in file_set)
        table.add_row(label, f"{present}/{len(file_set)} present: " + ", ".join(
            f.rsplit("/", 1)[-1] for f in file_set))
    if spec.optional_files:
        table.add_row("optional", ", ".join(f.rsplit("/", 1)[-1] for f in spec.optional_files))
    for download in spec.downloads:
        digest = (f"sha256 {download.sha256}" if download.sha256 else
                  f"md5 {download.md5}" if download.md5 else "no checksum recorded")
        note = " (optional)" if download.optional else ""
        table.add_row("source", f"{download.url}{note}\n  -> {download.extract_to or download.target}"
                      f"; {digest}")
    table.add_row("checksums", spec.checksum_note)
    table.add_row("terms", spec.license)
    table.add_row("cite", spec.citation)
    Console(width=160).print(table)


@app.command()
def download(name: str = typer.Argument(..., help="Dataset name, or 'all'."),
             data_dir: str = DATA_DIR,
             force: bool = typer.Option(False, "--force", help="Fetch again even if present."),
             ) -> None:
    """Fetch a dataset from its official source (checksummed, atomic), then verify it."""
    from rich.console import Console

    from moe_apps.datasets.download import download_dataset
    from moe_apps.datasets.errors import DatasetError

    console = Console(width=160)
    failed = False
    for dataset in _names(name):
        try:
            report = download_dataset(dataset, data_dir, force=force, progress=True)
        except OSError as error:  # a data folder that cannot be written: one line, exit 1
            fail(error)
        except DatasetError as error:
            console.print(f"[red]{dataset}: {error}[/red]", highlight=False)
            failed = True
            continue
        for label, items in (("fetched", report.fetched), ("already present", report.present),
                             ("not on the server, skipped", report.skipped)):
            if items:
                console.print(f"{dataset}: {label}: {', '.join(items)}", highlight=False)
        failed |= not guard(lambda: _print_verify(console, dataset, data_dir))  # noqa: B023
    if failed:
        raise typer.Exit(EXIT_FAILURE)


@app.command()
def verify(name: str = typer.Argument(..., help="Dataset name, or 'all'."),
           data_dir: str = DATA_DIR) -> None:
    """Check that a dataset is complete and valid: files, checksums, loading, sizes."""
    from rich.console import Console

    console = Console(width=160)
    results = [guard(lambda d=dataset: _print_verify(console, d, data_dir)) for dataset in _names(name)]
    if not all(results):
        raise typer.Exit(EXIT_FAILURE)


def _print_verify(console, name: str, data_dir: str | None) -> bool:
    from rich.table import Table

    from moe_apps.datasets.verify import verify_dataset

    with console.status(f"verifying {name}..."):
        report = verify_dataset(name, data_dir)
    verdict = "[green]valid[/green]" if report.ok else "[red]NOT valid[/red]"
    table = Table(title=f"{name} under {report.root}: {verdict}")
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail", overflow="fold")
    for check in report.checks:
        table.add_row(check.name, "[green]ok[/green]" if check.ok else "[red]FAIL[/red]",
                      check.detail)
    console.print(table)
    return report.ok
