"""`moe-apps recsys`: multi-task recommendation on MovieLens (train / eval / recommend).

A thin Typer layer over `moe_apps.recsys.train`; torch, torchrec and the app modules are imported
inside the commands so that `moe-apps --help` stays instant. Bad input (an unknown user, a folder
that is not a recsys run, a corrupted checkpoint, an existing run folder) prints one clear error
and exits with code 1, without writing anything; so does a run whose loss turns non-finite.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import typer

app = typer.Typer(help="Multi-task recommendation on MovieLens (MMoE, PLE).", no_args_is_help=True)

EXIT_ERROR = 1


def _fail(error: BaseException) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/bold red] {error}", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_ERROR)


def _guard(action: Callable[[], Any]) -> Any:
    """Run ``action``; a bad-input (or diverged-run) error becomes a message and exit code 1."""
    try:
        return action()
    except (ValueError, FileExistsError, FileNotFoundError, NotADirectoryError,
            FloatingPointError) as error:
        _fail(error)


def _metrics_table(title: str, columns: dict[str, dict[str, float]]) -> Any:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    for name in columns:
        table.add_column(name, justify="right")
    keys = [k for k in next(iter(columns.values())) if not k.startswith("gate_")]
    for key in keys:
        table.add_row(key, *(f"{col.get(key, float('nan')):.4f}" for col in columns.values()))
    return table


@app.command("train")
def train_command(
    model: str = typer.Option(None, "--model", help="mmoe | ple | shared-bottom | single"),
    dataset: str = typer.Option(None, "--dataset", help="movielens-100k | movielens-1m"),
    split: str = typer.Option(None, "--split", help="u1..u5, ua, ub (ML-100K; default u1), random (ML-1M default), temporal"),
    epochs: int = typer.Option(None, "--epochs", help="Maximum epochs (early stopping on val)."),
    num_experts: int = typer.Option(None, "--num-experts", help="Experts (MMoE) / expert budget."),
    out: Path = typer.Option(None, "--out", help="Run folder (default runs/recsys/<model>-<split>-<seed>-<time>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out."),
    seed: int = typer.Option(None, "--seed", help="Seed of the split, validation slice and training."),
    data_dir: str = typer.Option(
        None, "--data-dir",
        help="Data folder (default: with --resume the run's, else $MOE_APPS_DATA, else ~/.cache/moe-apps).",
    ),
    preset: str = typer.Option("default", "--preset", help="default | ple | three-tasks | tiny | ml1m"),
    device: str = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Train a multi-task recommender (like + rating), then test the best epoch once."""
    from dataclasses import replace

    from rich.console import Console

    from moe_apps.recsys.config import OFFICIAL_SPLITS, get_preset
    from moe_apps.recsys.train import read_run_config, train

    console = Console()

    def build() -> Any:
        if resume:
            if out is None:
                raise ValueError("--resume needs --out, the run folder to continue")
            config, _ = read_run_config(out)
            config = replace(config, model=replace(config.model, vocab=()))
        else:  # --model ple without a preset takes the ple preset (its tuned dropout)
            config = get_preset("ple" if model == "ple" and preset == "default" else preset)
        chosen_split = split
        if split is None and dataset == "movielens-1m" and config.split in OFFICIAL_SPLITS:
            chosen_split = "random"  # ML-1M has no official folds
        top: dict[str, Any] = {k: v for k, v in (("dataset", dataset), ("split", chosen_split),
                                                  ("epochs", epochs), ("seed", seed),
                                                  ("device", device)) if v is not None}
        sub: dict[str, Any] = {k: v for k, v in (("model", model), ("num_experts", num_experts))
                               if v is not None}
        return replace(config, **top, model=replace(config.model, **sub))

    config = _guard(build)
    run_dir = out if out is not None else Path("runs") / "recsys" / (
        f"{config.model.model}-{config.split}-s{config.seed}-{datetime.now():%Y%m%d-%H%M%S}"
    )
    outcome = _guard(lambda: train(config, run_dir, resume=resume, data_dir=data_dir,
                                   console=console, progress=progress))
    console.print(_metrics_table(
        f"{outcome.config.model.model} on {outcome.config.split} (best epoch {outcome.best_epoch})",
        {"validation": outcome.val_metrics, "test": outcome.test_metrics},
    ))
    console.print(f"run folder: {outcome.run_dir}  ({outcome.seconds:.1f} s)", highlight=False)


@app.command("eval")
def eval_command(
    run: Path = typer.Argument(..., help="A run folder made by `moe-apps recsys train`."),
    split: str = typer.Option(None, "--split", help="Test part to score (default: the run's split)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    data_dir: str = typer.Option(None, "--data-dir", help="Data folder (default: the run's)."),
) -> None:
    """Per-task test metrics of a run's best checkpoint."""
    from rich.console import Console

    from moe_apps.recsys.train import evaluate_run, load_run

    loaded = _guard(lambda: load_run(run, data_dir))
    chosen = split or loaded.config.split
    if chosen != loaded.config.split and not as_json:
        Console(stderr=True).print(
            f"[yellow]warning:[/yellow] the run was trained on split {loaded.config.split}; the test "
            f"part of {chosen} may overlap its training ratings", highlight=False)
    metrics = _guard(lambda: evaluate_run(loaded, chosen))
    if as_json:
        typer.echo(json.dumps({"run": str(run), "model": loaded.config.model.model,
                               "split": chosen, "metrics": metrics}))
        return
    Console().print(_metrics_table(f"{loaded.config.model.model}: test part of {chosen}",
                                   {"test": metrics}))


@app.command("recommend")
def recommend_command(
    run: Path = typer.Argument(..., help="A run folder made by `moe-apps recsys train`."),
    user: int = typer.Option(..., "--user", help="MovieLens user id (as in u.data)."),
    top: int = typer.Option(10, "--top", help="How many movies."),
    task: str = typer.Option(None, "--task", help="Rank by this task (default: like)."),
    min_ratings: int = typer.Option(10, "--min-ratings", help="Only movies with this many training ratings."),
    data_dir: str = typer.Option(None, "--data-dir", help="Data folder (default: the run's)."),
) -> None:
    """A user's top unseen movies by predicted like-probability, with titles."""
    from rich.console import Console
    from rich.table import Table

    from moe_apps.recsys.train import load_run, recommend

    loaded = _guard(lambda: load_run(run, data_dir))
    recs = _guard(lambda: recommend(loaded, user, top, task, min_ratings))
    specs = loaded.config.model.tasks
    table = Table(title=f"top {len(recs)} unseen movies for user {user}")
    table.add_column("#", justify="right")
    table.add_column("movie id", justify="right")
    table.add_column("title")
    for spec in specs:
        table.add_column(f"p({spec.name})" if spec.kind == "binary" else spec.name, justify="right")
    for rank, rec in enumerate(recs, 1):
        table.add_row(str(rank), str(rec.item_id), rec.title,
                      *(f"{rec.scores[s.name]:.3f}" if s.kind == "binary" else f"{rec.scores[s.name]:.2f}"
                        for s in specs))
    Console().print(table)
