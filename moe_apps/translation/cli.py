"""`moe-apps translation`: German<->English translation on Multi30k (train / eval / translate).

A thin Typer layer over `moe_apps.translation.train` (train) and `moe_apps.translation.inference`
(eval, translate); torch and the app modules are imported inside the commands. Bad input (a folder
that is not a translation run, source and reference files of different lengths, an unknown split,
an existing run folder, text that is not UTF-8, ``--average N`` beyond the snapshots the run kept)
prints one line and exits with code 1 without writing anything; usage errors exit with 2. A source
line longer than the model's ``max_source_tokens - 1`` subwords is truncated to them, with a
warning on stderr.
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
    guard,
    main_console,
    relaunch_with_torchrun,
    train_overrides,
)

app = typer.Typer(help="Translation on Multi30k with an expert-routed Transformer (sacreBLEU).",
                  no_args_is_help=True)

RunArg = Annotated[Path, typer.Argument(help="A run folder made by `moe-apps translation train`.")]
BeamOpt = Annotated[int | None, typer.Option("--beam", min=1, help="Beam size (1 = greedy; default: the run's, 5).")]
AverageOpt = Annotated[int | None, typer.Option(
    "--average", min=1, help="Use the mean weights of the run's last N epoch snapshots instead of best.pt.")]


def _warn(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)


@app.command("train")
def train_command(
    direction: Annotated[str | None, typer.Option("--direction", help="de-en (default) | en-de")] = None,
    preset: Annotated[str, typer.Option("--preset", help="default | compare | smoke")] = "default",
    model: Annotated[str | None, typer.Option("--model", help="moe | dense (same active FLOPs per token)")] = None,
    num_experts: Annotated[int | None, typer.Option("--num-experts", min=1, help="Experts per MoE layer.")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", min=1, help="Experts per token (top-k router).")] = None,
    router: Annotated[str | None, typer.Option("--router", help="topk | switch | hash | expert-choice (encoder only)")] = None,
    shared_expert: Annotated[bool | None, typer.Option("--shared-expert/--no-shared-expert",
                                                       help="Add an always-on shared expert.")] = None,
    moe_every: Annotated[int | None, typer.Option("--moe-every", min=1, max=2,
                                                  help="1: MoE in every layer, 2: every other layer.")] = None,
    epochs: EpochsOpt = None,
    seed: SeedOpt = None,
    out: OutOpt = None,
    resume: ResumeOpt = False,
    device: DeviceOpt = None,
    data_dir: DataDirOpt = None,
    progress: ProgressOpt = True,
    nproc: NprocOpt = 1,
) -> None:
    """Train a translation model (learns the vocabulary on the training split first). --nproc N:
    N processes, each MoE layer's experts split over them, DDP for the rest."""
    from moe_apps.training.run import apply_overrides
    from moe_apps.translation.config import get_preset
    from moe_apps.translation.train import check_world_size, read_run_config, train

    console = main_console()
    router_name = router

    def build() -> Any:
        if resume:
            if out is None:
                raise ValueError("--resume needs --out, the run folder to continue")
            base, _ = read_run_config(out)
        else:
            base = get_preset(preset)
        overrides = {
            "data.direction": direction, "model.model": model, "model.num_experts": num_experts,
            "model.top_k": top_k, "model.router": router_name, "model.shared_expert": shared_expert,
            "model.moe_every": moe_every, **train_overrides(epochs=epochs, seed=seed, device=device,
                                                            prefix="train."),
        }
        config = apply_overrides(base, overrides)
        check_world_size(config, nproc)
        return config

    config = guard(build)
    run_dir = out if out is not None else default_out(
        "translation", f"{config.model.model}-{config.data.direction}-{config.preset}")
    guard(lambda: relaunch_with_torchrun(nproc, "translation", out=run_dir, resume=resume))
    outcome = guard(lambda: train(config, run_dir, resume=resume, data_dir=data_dir, console=console,
                                  progress=progress))
    val = outcome.val_metrics
    console.print(f"best epoch {outcome.best_epoch}: validation loss {val['loss']:.4f} "
                  f"(ppl {val['ppl']:.2f}); {outcome.target_tokens_per_s:.0f} target tokens/s", highlight=False)
    console.print(f"run folder: {outcome.run_dir}  ({outcome.seconds:.1f} s); score it with "
                  f"`moe-apps translation eval {outcome.run_dir}`", highlight=False)


@app.command("eval")
def eval_command(
    run: RunArg,
    split: Annotated[str | None, typer.Option("--split", help="test_2016_flickr (default) | val | test_2017_flickr | test_2017_mscoco")] = None,
    src: Annotated[Path | None, typer.Option("--src", help="Source sentences, one per line (plain or .gz).")] = None,
    ref: Annotated[Path | None, typer.Option("--ref", help="Reference translations aligned with --src.")] = None,
    beam: BeamOpt = None,
    average: AverageOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    data_dir: DataDirOpt = None,
    device: DeviceOpt = None,
) -> None:
    """sacreBLEU BLEU and chrF of a run's best checkpoint, or of its averaged last snapshots
    (hypotheses and scores saved in the run folder)."""
    from rich.console import Console

    from moe_apps.translation.inference import evaluate, evaluation_set, load_run, result_stem

    loaded = guard(lambda: load_run(run, device=device or "auto", average=average))
    name, sources, references = guard(lambda: evaluation_set(loaded, split=split, src=src, ref=ref,
                                                             data_dir=data_dir))
    with Console(stderr=True).status(f"translating {len(sources)} sentences"):
        scores = guard(lambda: evaluate(loaded, name, sources, references, beam=beam))
    if scores["truncated_sources"]:
        _warn(f"{scores['truncated_sources']} source lines were longer than "
              f"{loaded.config.model.max_source_tokens - 1} subwords and were truncated")
    if as_json:
        typer.echo(json.dumps(scores))
        return
    from rich.table import Table

    weights = ", ".join(scores["checkpoints"])
    if scores["weights"] == "average":
        weights = f"mean of {weights}"
    table = Table(title=f"{run} on {name} ({loaded.config.data.direction}, beam {scores['beam']}, {weights})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("bleu", "chrf", "bleu_lowercase", "length_ratio", "sentences", "sentences_per_s"):
        value = scores[key]
        table.add_row(key, f"{value:.2f}" if isinstance(value, float) else str(value))
    console = Console()
    console.print(table)
    console.print(scores["bleu_signature"], highlight=False)
    console.print(f"hypotheses: {loaded.run_dir / 'hypotheses' / (result_stem(loaded, name, scores['beam']) + '.txt')}",
                  highlight=False, soft_wrap=True)


@app.command("translate")
def translate_command(
    run: RunArg,
    text: Annotated[str | None, typer.Argument(help="A sentence to translate (default: read lines from stdin).")] = None,
    beam: BeamOpt = None,
    average: AverageOpt = None,
    show_routing: Annotated[bool, typer.Option("--show-routing", help="Print the experts of each subword in each MoE layer.")] = False,
    device: DeviceOpt = None,
) -> None:
    """Translate a sentence, or stdin line by line (an empty line gives an empty line). Piped
    input is read whole and decoded in batches; typed input (a terminal) is answered line by line."""
    from moe_apps.translation.data import split_lines
    from moe_apps.translation.inference import load_run

    loaded = guard(lambda: load_run(run, device=device or "auto", average=average))
    if show_routing and not loaded.model.moe_layers():
        _warn("this run's model is dense: it has no MoE layers to show")
        show_routing = False
    stdin = typer.get_binary_stream("stdin")
    if text is None and stdin.isatty():
        for number, raw in enumerate(iter(stdin.readline, b""), 1):
            lines = guard(lambda raw=raw, number=number: split_lines(raw, f"stdin line {number}"))
            _translate_and_print(loaded, lines, beam, show_routing)
        return
    lines = [text] if text is not None else guard(lambda: split_lines(stdin.read(), "stdin"))
    _translate_and_print(loaded, lines, beam, show_routing)


def _translate_and_print(loaded: Any, lines: list[str], beam: int | None, show_routing: bool) -> None:
    """Translate ``lines`` and print one line each (with its routing tables for --show-routing)."""
    from moe_apps.translation import inference

    # --show-routing decodes each line alone: the routing shown is the sentence's alone, and what an
    # expert-choice encoder picks depends on the other sentences of a batch
    chunks = [[line] for line in lines] if show_routing else [lines]
    results = [guard(lambda chunk=chunk: inference.translate_lines(loaded, chunk, beam=beam)) for chunk in chunks]
    truncated = sum(result.truncated for result in results)
    if truncated:
        _warn(f"{truncated} lines were longer than {loaded.config.model.max_source_tokens - 1} "
              "subwords and were truncated")
    for result in results:
        for i, line in enumerate(result.lines):
            typer.echo(line)
            if show_routing and result.source_ids[i]:
                _print_routing(inference.routing_of(loaded, result.source_ids[i], result.ids[i]))


def _print_routing(routing: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for side, tokens, title in (("encoder", routing["source"], "source subword"),
                                ("decoder", routing["target"], "generated token")):
        names = [name for name in routing["layers"] if name.startswith(side)]
        if not names:
            continue
        table = Table(title=f"{side} experts ({'best first' if side == 'decoder' else 'per layer'})")
        table.add_column(title)
        for name in names:
            table.add_column(f"layer {name.split('.')[1]}", justify="right")
        for t, token in enumerate(tokens):
            table.add_row(token, *(",".join(map(str, routing["layers"][name][t])) for name in names))
        console.print(table)
