"""`moe-apps vision`: CIFAR-10 classification with conv experts (train / eval / predict).

A thin Typer layer over `moe_apps.vision.train` on the platform's shared train options, error guard
and exit codes (`moe_apps.training.cli`: 1 = the command failed, one line, nothing written;
2 = a usage error). torch and the app modules are imported inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from moe_apps.training.cli import (
    EXIT_FAILURE,
    DataDirOpt,
    DeviceOpt,
    EpochsOpt,
    NprocOpt,
    OutOpt,
    ProgressOpt,
    ResumeOpt,
    SeedOpt,
    default_out,
    error_message,
    guard,
    launch_rank,
    main_console,
    relaunch_with_torchrun,
)

app = typer.Typer(help="CIFAR-10 image classification with conv experts (moe, condconv, dense).",
                  no_args_is_help=True)

RunArg = Annotated[Path, typer.Argument(help="A run folder made by `moe-apps vision train`.")]


@app.command("train")
def train_command(
    model: Annotated[str | None, typer.Option("--model", help="moe | condconv | dense | dense-wide")] = None,
    preset: Annotated[str, typer.Option("--preset", help="default (full run) | smoke (< 1 min) | tune (45k/5k split)")] = "default",
    num_experts: Annotated[int | None, typer.Option("--num-experts", help="Experts per expert stage (E).")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Experts per image (moe).")] = None,
    expert_width: Annotated[int | None, typer.Option(
        "--expert-width", help="Inner width of each expert (moe; default: the stage's width). "
                               "Narrow experts at a larger --top-k: --num-experts 4 --top-k 2 "
                               "--expert-width 128 costs what the default costs.")] = None,
    router: Annotated[str | None, typer.Option(
        "--router", help="moe's gate: topk (the default) | gumbel (k = 1: the expert sampled from the "
                         "gate's softmax in training, straight-through; argmax at eval).")] = None,
    precision: Annotated[str | None, typer.Option(
        "--precision", help="bf16 (autocast, the default) | fp32. Which trains faster depends on the "
                            "CPU (bf16 matrix units: AMX); benchmarks/vision_precision.py times both.")] = None,
    epochs: EpochsOpt = None,
    seed: SeedOpt = None,
    out: OutOpt = None,
    resume: ResumeOpt = False,
    device: DeviceOpt = None,
    data_dir: DataDirOpt = None,
    progress: ProgressOpt = True,
    nproc: NprocOpt = 1,
) -> None:
    """Train on CIFAR-10 (bf16 unless --precision fp32, channels_last on the CPU), then score the test
    set once (TTA).
    --nproc N: N processes under DDP (the conv experts are replicated, not split)."""
    from moe_apps.vision.config import get_preset, with_overrides
    from moe_apps.vision.train import train

    console = main_console()
    main = launch_rank()[0] == 0  # under torchrun rank 0 alone scores the test set
    overrides: dict[str, Any] = dict(model=model, num_experts=num_experts, top_k=top_k,
                                     expert_width=expert_width, router=router, epochs=epochs, seed=seed, device=device,
                                     precision=precision)

    def run() -> Any:
        if resume:
            if out is None:
                raise ValueError("--resume needs --out, the run folder to continue")
            relaunch_with_torchrun(nproc, "vision", out=out, resume=True)
            return train(None, out, resume=True, overrides=overrides, data_dir=data_dir,
                         console=console, progress=progress, evaluate=main)
        config = with_overrides(get_preset(preset), **overrides)  # every check before any work
        run_dir = out if out is not None else default_out("vision", f"{config.model.model}-s{config.seed}")
        relaunch_with_torchrun(nproc, "vision", out=run_dir)
        return train(config, run_dir, data_dir=data_dir, console=console, progress=progress, evaluate=main)

    outcome = guard(run)
    console.print(
        f"test accuracy {outcome.test_accuracy:.2%} ({'TTA' if outcome.config.recipe.tta else 'no TTA'}), "
        f"training {outcome.train_seconds:.0f} s ({outcome.images_per_second:.0f} images/s), "
        f"{outcome.parameters:,} parameters; run folder: {outcome.run_dir}", highlight=False)


@app.command("eval")
def eval_command(
    run: RunArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
    tta: Annotated[bool, typer.Option("--tta/--no-tta", help="Six-view test-time augmentation.")] = True,
    data_dir: DataDirOpt = None,
) -> None:
    """Test accuracy, per-class accuracy, and confusion / expert-use / worst-error PNGs in the run folder."""
    from rich.console import Console
    from rich.table import Table

    from moe_apps.vision.train import evaluate_run

    report = guard(lambda: evaluate_run(run, tta=tta, data_dir=data_dir))
    if as_json:
        typer.echo(json.dumps({"run": str(run), **report}))
        return
    table = Table(title=f"{run}: test accuracy {report['accuracy']:.2%} "
                        f"({'TTA' if tta else 'no TTA'}, {report['images']} images)")
    table.add_column("class")
    table.add_column("accuracy", justify="right")
    for name, value in report["per_class_accuracy"].items():
        table.add_row(name, "no test images" if value is None else f"{value:.2%}")
    Console().print(table)
    Console().print(f"plots written to {run}/ (confusion.png, confident_errors.png"
                    f"{', experts_by_class.png' if report['expert_fraction_by_class'] else ''})",
                    highlight=False)


@app.command("predict")
def predict_command(
    run: RunArg,
    images: Annotated[list[Path], typer.Argument(help="PNG / JPEG files (any size and mode).")],
    top: Annotated[int, typer.Option("--top", min=1, max=10, help="How many classes to show.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Top classes with probabilities for each image (converted to RGB, shorter side resized to 32,
    centre-cropped to 32 x 32). A bad file gets one error line; the others are still predicted."""
    from rich.console import Console
    from rich.table import Table

    from moe_apps.training.cli import fail
    from moe_apps.vision.train import load_run, predict_files

    loaded = guard(lambda: load_run(run))
    results, errors = guard(lambda: predict_files(loaded, images, top))
    err = Console(stderr=True)
    for error in errors:
        err.print(f"[bold red]error:[/bold red] {error_message(error)}", highlight=False, soft_wrap=True)
    if as_json:
        typer.echo(json.dumps({"run": str(run), "predictions": results,
                               "errors": [error_message(e) for e in errors]}))
    else:
        console = Console()
        for result in results:  # the path on its own line: a table title would wrap it
            console.print(result["file"], style="bold", highlight=False, soft_wrap=True)
            table = Table()
            table.add_column("class")
            table.add_column("probability", justify="right")
            for row in result["top"]:
                table.add_row(row["class"], f"{row['probability']:.3f}")
            console.print(table)
    if errors:
        if not results:
            fail(f"none of the {len(errors)} image(s) could be read")
        raise typer.Exit(EXIT_FAILURE)
