"""Train translation runs (what `moe-apps translation train` calls); `inference` scores and uses them.

The run folder is the platform's (`moe_apps.training.run`: config.json, the lock, refusals) plus
``spm.model`` (the vocabulary, learned on the run's training pairs before the first step), the
loop's files, and after training ``routing.json`` / ``routing.png`` (expert load and drop rate per
MoE layer on the validation set, with the training-time drop rate from metrics.jsonl) and
``train_summary.json`` (wall time, updates, target tokens/s).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from moe_apps.atomic import atomic_write
from moe_apps.datasets import load_multi30k, resolve_data_root
from moe_apps.training import fit, load_checkpoint, resolve_device, set_seed
from moe_apps.training.distributed import current_context, main_process_first
from moe_apps.training.run import check_run_folder, open_run, start_run
from moe_apps.training.runtime import autocast
from moe_apps.translation.config import TranslationConfig
from moe_apps.translation.data import EncodedPairs, TrainStream, eval_batches
from moe_apps.translation.model import Seq2SeqTransformer, build_model, count_parameters
from moe_apps.translation.task import TranslationTask
from moe_apps.translation.vocab import MODEL_FILE, load_vocab, train_vocab
from moe_core import to_expert_parallel
from moe_core.diagnostics import StatsAccumulator

APP = "translation"
RESUME_FREE = ("epochs", "device")  # train options --resume may change


def _write_json(path: Path, payload: Any) -> None:
    text = json.dumps(payload, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def _side(pairs: Any, language: str) -> list[str]:
    return list(pairs.de if language == "de" else pairs.en)


@dataclass(frozen=True)
class TrainOutcome:
    """What `train` returns."""

    run_dir: Path
    config: TranslationConfig
    best_epoch: int
    val_metrics: dict[str, float]
    parameters: dict[str, int]
    seconds: float
    target_tokens_per_s: float


def read_run_config(run_dir: str | Path) -> tuple[TranslationConfig, Path | None]:
    """(config, data folder) of a translation run; RunError if ``run_dir`` is not one."""
    info = open_run(run_dir, app=APP)
    return TranslationConfig.from_dict(info.config), info.data_root


def check_resume(saved: TranslationConfig, config: TranslationConfig, run_dir: Path) -> None:
    """ValueError unless ``config`` differs from the saved one only in epochs / device."""
    free = {name: getattr(config.train, name) for name in RESUME_FREE}
    if replace(saved, train=replace(saved.train, **free)) != replace(config, train=replace(config.train, progress=saved.train.progress)):
        raise ValueError(f"--resume: the options differ from the run's config.json in {run_dir} "
                         "(only --epochs and --device may change); drop the other options")


def train(config: TranslationConfig, out_dir: str | Path, *, resume: bool = False,
          data_dir: str | Path | None = None, console: Any = None, progress: bool = True) -> TrainOutcome:
    """Train ``config`` into ``out_dir`` (or continue it with ``resume``).

    Checked before anything is written: the run folder (`check_run_folder`), the resume options,
    the device and the data (Multi30k train and val under the data folder).
    """
    from rich.console import Console

    console = console if console is not None else Console()
    run_dir = Path(out_dir)
    started = time.perf_counter()
    ctx = current_context()  # under torchrun: the MoE layers' experts are split over the ranks
    check_world_size(config, ctx.world_size)
    saved_info = check_run_folder(run_dir, app=APP, resume=resume)
    if saved_info is not None:
        check_resume(TranslationConfig.from_dict(saved_info.config), config, run_dir)
        if data_dir is None:
            data_dir = saved_info.data_root
    resolve_device(config.train.device)
    root = resolve_data_root(data_dir)
    data = load_multi30k(root, ["train", "val"])
    source, target = config.data.languages
    train_src, train_tgt = _side(data["train"], source), _side(data["train"], target)
    if config.data.train_limit is not None:
        train_src, train_tgt = train_src[: config.data.train_limit], train_tgt[: config.data.train_limit]
    val_src, val_tgt = _side(data["val"], source), _side(data["val"], target)
    if config.data.val_limit is not None:
        val_src, val_tgt = val_src[: config.data.val_limit], val_tgt[: config.data.val_limit]
    train_config = replace(config.train, progress=progress)
    with start_run(run_dir, app=APP, config=config.to_dict(), data_root=root, resume=resume):
        vocab_path = run_dir / MODEL_FILE
        with main_process_first(ctx):  # rank 0 learns and writes the vocabulary, the others read it
            if resume or not ctx.is_main:
                vocab = load_vocab(vocab_path)
            else:
                vocab = train_vocab(train_src + train_tgt, config.model.vocab_size, vocab_path,
                                    seed=config.train.seed)
        if len(vocab) > config.model.vocab_size:
            raise ValueError(f"{vocab_path} has {len(vocab)} pieces, more than vocab_size={config.model.vocab_size}")
        limit = config.model.max_source_tokens
        pairs = EncodedPairs(vocab.encode(train_src), vocab.encode(train_tgt)).filtered(limit)
        val_pairs = EncodedPairs(vocab.encode(val_src), vocab.encode(val_tgt)).filtered(limit)
        stream = TrainStream(pairs, config.data.batch_tokens, config.data.updates_per_epoch, config.train.seed)
        val = eval_batches(val_pairs, config.data.batch_tokens)
        set_seed(config.train.seed)
        model = build_model(config.model)
        params = count_parameters(model)
        if ctx.enabled:
            to_expert_parallel(model)
        console.print(
            f"[bold]{config.model.model}[/bold] {config.data.direction} ({config.preset}): "
            f"{len(pairs)} training pairs ({stream.batches_per_pass} batches a pass), "
            f"{len(val_pairs)} validation pairs, vocabulary {len(vocab)}, {params['total']:,} "
            f"parameters ({params['routed_experts']:,} in routed experts), "
            f"{config.total_updates} updates", highlight=False)
        fit_started = time.perf_counter()
        result = fit(model, TranslationTask(config.label_smoothing), stream, lambda: val, train_config,
                     run_dir, app=APP, model_config=asdict(config.model), resume=resume, console=console)
        fit_seconds = time.perf_counter() - fit_started
        train_seconds = sum(row["seconds"] for row in result.history)
        tokens = sum(row.get("train_target_tokens", 0.0) for row in result.history) * config.data.updates_per_epoch
        tokens_per_s = tokens / train_seconds if train_seconds > 0 else 0.0
        if not ctx.is_main:  # rank 0 writes the reports, from a one-process copy of the best weights
            return TrainOutcome(run_dir, config, result.best_epoch, result.best_metrics, params,
                                time.perf_counter() - started, tokens_per_s)
        if ctx.enabled:
            model = build_model(config.model).to(next(model.parameters()).device)
            load_checkpoint(result.best_checkpoint, model, app=APP, model_config=asdict(config.model))
        _write_json(run_dir / "train_summary.json", {
            "batches": config.total_updates, "optimizer_steps": config.total_updates // ctx.world_size,
            "epochs_seconds": train_seconds,
            "fit_seconds_this_process": fit_seconds, "target_tokens": tokens,
            "target_tokens_per_s": tokens_per_s, "best_epoch": result.best_epoch,
            "val": result.best_metrics, "parameters": params})
        write_routing_report(model, config, val, run_dir)
    return TrainOutcome(run_dir, config, result.best_epoch, result.best_metrics, params,
                        time.perf_counter() - started, tokens_per_s)


def check_world_size(config: TranslationConfig, world_size: int) -> None:
    """ValueError unless ``world_size`` processes can split each MoE layer's experts evenly."""
    if world_size > 1 and config.model.model == "moe" and config.model.num_experts % world_size:
        divisors = [n for n in range(1, config.model.num_experts + 1) if config.model.num_experts % n == 0]
        raise ValueError(f"{world_size} processes cannot split {config.model.num_experts} experts per "
                         f"layer evenly; use --nproc in {divisors} or --num-experts a multiple of {world_size}")


@torch.no_grad()
def write_routing_report(model: Seq2SeqTransformer, config: TranslationConfig, batches: Sequence[Any],
                         run_dir: Path) -> dict[str, Any] | None:
    """Expert load per MoE layer on ``batches`` (eval mode: dropless) plus the last epoch's
    training drop rate, to routing.json and routing.png. None for a dense model."""
    from moe_apps.translation.plots import plot_expert_load

    layers = model.moe_layers()
    if not layers:
        return None
    device = next(model.parameters()).device
    model.eval()
    accumulators = {name: StatsAccumulator() for name, _ in layers}
    with autocast(device, config.train.precision):
        for batch in batches:
            model(batch.to(device))
            for name, ffn in layers:
                accumulators[name].update(ffn.inner.last_stats)
    last = {}
    metrics_path = run_dir / "metrics.jsonl"
    if metrics_path.is_file():
        rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        last = rows[-1] if rows else {}
    report = {}
    for name, ffn in layers:
        summary = accumulators[name].summary()
        module_name = next(n for n, m in model.named_modules() if m is ffn.inner)
        report[name] = {
            "fraction_per_expert": summary["fraction_per_expert"],
            "tokens_per_expert": summary["tokens_per_expert"],
            "load_cv": summary["load_cv"], "dead_experts": summary["dead_experts"],
            "val_dropped_fraction": summary["dropped_fraction"],
            "train_dropped_fraction": last.get(f"routing_{module_name}_dropped_fraction"),
        }
    _write_json(run_dir / "routing.json", report)
    plot_expert_load({k: v["fraction_per_expert"] for k, v in report.items()}, run_dir / "routing.png",
                     title=f"expert load per layer, validation ({config.model.router}, "
                           f"E={config.model.num_experts})")
    return report
