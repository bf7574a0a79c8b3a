"""`moe-apps recsys`: multi-task recommendation on MovieLens (train / eval / recommend / export).

A thin Typer layer over `moe_apps.recsys.train`, on the platform's shared train options, error
guard and exit codes (`moe_apps.training.cli`: 1 = the command failed, one line, nothing written;
2 = a usage error). torch, torchrec and the app modules are imported inside the commands, so that
`moe-apps --help` stays instant.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from moe_apps.training.cli import (
    DataDirOpt,
    DeviceOpt,
    EpochsOpt,
    NprocOpt,
    OutOpt,
    ProgressOpt,
    ResumeOpt,
    SeedOpt,
    default_out,
    fail,
    guard,
    main_console,
    relaunch_with_torchrun,
    train_overrides,
)

app = typer.Typer(help="Multi-task recommendation on MovieLens (MMoE, PLE).", no_args_is_help=True)

RunArg = Annotated[Path, typer.Argument(help="A run folder made by `moe-apps recsys train`.")]
EvalDataDirOpt = Annotated[str | None, typer.Option("--data-dir", help="Data folder (default: the run's).")]


def _metrics_table(title: str, columns: dict[str, dict[str, float]]) -> Any:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    for name in columns:
        table.add_column(name, justify="right")
    keys: list[str] = []  # every column's metrics (the test column adds the top-K ones)
    for col in columns.values():
        keys += [k for k in col if not k.startswith("gate_") and k not in keys]
    for key in keys:
        table.add_row(key, *(f"{col[key]:.4f}" if key in col else "-" for col in columns.values()))
    return table


@app.command("train")
def train_command(
    preset: Annotated[str, typer.Option("--preset", help="default | ple | three-tasks | tiny | ml1m | ranking | ranking-ease")] = "default",
    model: Annotated[str | None, typer.Option("--model", help="mmoe | ple | shared-bottom | single")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", help="movielens-100k | movielens-1m")] = None,
    split: Annotated[str | None, typer.Option(
        "--split", help="u1..u5, ua, ub (ML-100K; default u1), random (ML-1M default), temporal, recbole")] = None,
    num_experts: Annotated[int | None, typer.Option("--num-experts", min=1, help="Experts (MMoE) / expert budget.")] = None,
    epochs: EpochsOpt = None,
    seed: SeedOpt = None,
    out: OutOpt = None,
    resume: ResumeOpt = False,
    device: DeviceOpt = None,
    data_dir: DataDirOpt = None,
    progress: ProgressOpt = True,
    nproc: NprocOpt = 1,
) -> None:
    """Train a multi-task recommender (like + rating), then test the best epoch once. With
    ``--nproc N``: N local processes, the embedding tables sharded by torchrec (table-wise)."""
    from moe_apps.recsys.train import build_config, train

    def build() -> Any:
        if resume and out is None:
            raise ValueError("--resume needs --out, the run folder to continue")
        overrides = {**train_overrides(epochs=epochs, seed=seed, device=device), "dataset": dataset,
                     "split": split, "model.model": model, "model.num_experts": num_experts}
        return build_config(preset, overrides, resume_dir=out if resume else None)

    config = guard(build)
    run_dir = out if out is not None else default_out(
        "recsys", f"{config.model.model}-{config.split}-s{config.seed}")
    guard(lambda: relaunch_with_torchrun(nproc, "recsys", out=run_dir, resume=resume))
    console = main_console()
    outcome = guard(lambda: train(config, run_dir, resume=resume, data_dir=data_dir,
                                  console=console, progress=progress))
    console.print(_metrics_table(
        f"{outcome.config.model.model} on {outcome.config.split} (best epoch {outcome.best_epoch})",
        {"validation": outcome.val_metrics, "test": outcome.test_metrics},
    ))
    console.print(f"run folder: {outcome.run_dir}  ({outcome.seconds:.1f} s)", highlight=False)


@app.command("eval")
def eval_command(
    run: RunArg,
    split: Annotated[str | None, typer.Option("--split", help="Test part to score (default: the run's split).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
    allow_overlap: Annotated[bool, typer.Option(
        "--allow-overlap", help="Score a test part that shares ratings with the run's training part "
        "(inflated metrics; the JSON then says overlaps_training: true).")] = False,
    data_dir: EvalDataDirOpt = None,
) -> None:
    """Per-task test metrics of a run's best checkpoint, and full-ranking top-K metrics
    (ndcg@10, recall@10, hit@10, mrr@10, ... over every movie not rated in training)."""
    from rich.console import Console

    from moe_apps.recsys.train import evaluate_run, load_run, overlap_with_training

    loaded = guard(lambda: load_run(run, data_dir))
    chosen = split or loaded.config.split
    shared, total = guard(lambda: overlap_with_training(loaded, chosen))
    if shared and not allow_overlap:
        fail(f"the test part of {chosen} shares {shared} of its {total} ratings with the training part "
             f"of this run (split {loaded.config.split}), so its metrics would be inflated; score "
             f"--split {loaded.config.split}, or pass --allow-overlap to score it anyway")
    metrics = guard(lambda: evaluate_run(loaded, chosen))
    if as_json:
        typer.echo(json.dumps({"run": str(run), "model": loaded.config.model.model, "split": chosen,
                               "overlaps_training": bool(shared), "metrics": metrics}))
        return
    if shared:
        Console(stderr=True).print(
            f"[yellow]warning:[/yellow] {shared} of the {total} test ratings of {chosen} are in the "
            f"run's training part (split {loaded.config.split}): these metrics are inflated", highlight=False)
    Console().print(_metrics_table(f"{loaded.config.model.model}: test part of {chosen}",
                                   {"test": metrics}))


@app.command("recommend")
def recommend_command(
    run: RunArg,
    user: Annotated[int, typer.Option("--user", help="MovieLens user id (as in u.data).")],
    top: Annotated[int, typer.Option("--top", help="How many movies.")] = 10,
    task: Annotated[str | None, typer.Option(
        "--task", help="Rank by this task (default: the run's ranking score, corrected P(rate) x P(like | rate), or P(like)).")] = None,
    min_ratings: Annotated[int, typer.Option("--min-ratings", help="Only movies with this many training ratings.")] = 10,
    data_dir: EvalDataDirOpt = None,
) -> None:
    """A user's top unseen movies by the run's ranking score, with titles (--min-ratings only
    filters what is shown; evaluation ranks every candidate)."""
    from rich.console import Console
    from rich.table import Table

    from moe_apps.recsys.train import load_run, recommend

    loaded = guard(lambda: load_run(run, data_dir))
    recs = guard(lambda: recommend(loaded, user, top, task, min_ratings))
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


@app.command("export")
def export_command(
    run: RunArg,
    out: Annotated[Path, typer.Argument(help="New folder for the exported model (must not exist).")],
    data_dir: EvalDataDirOpt = None,
) -> None:
    """Export a run for serving: a torch.export program (OUT/model.pt2) that takes a MovieLens
    user id and candidate movie ids and returns ranking scores (NaN for unknown ids), with the
    feature tables inside; OUT/export.json says how to call it."""
    from moe_apps.recsys.export import export_run
    from moe_apps.recsys.train import load_run

    if out.exists():
        fail(f"{out} already exists; choose a new export folder (nothing was written)")
    loaded = guard(lambda: load_run(run, data_dir))
    info = guard(lambda: export_run(loaded, out))
    typer.echo(f"exported {info.info['model']} ({info.info['score']}) to {info.program}")
