"""`fit`: the one training loop every app shares (device, bf16 autocast, seeding, optimizer and
schedule, gradient clipping, MoE aux losses, early stopping, exact checkpoint/resume, progress,
run folder).

Per step the loss is ``task.training_loss(model, batch)`` plus
``weighted_aux_loss(collect_aux_losses(model), coefficients)`` (moe_core.losses: the load-balancing
loss of Switch Transformer, Fedus et al. 2021, and the router z-loss of ST-MoE, Zoph et al. 2022).

Options beyond the plain loop (all in `TrainConfig`, see its docstring): SGD with (Nesterov)
momentum, Adam(W) betas, warm-up + constant / cosine / linear / inverse-sqrt / triangular schedules,
per-parameter-group lr scales and weight decay (``fit(..., param_groups=fn)``), an EMA or lookahead
average of the weights (`moe_apps.training.averaging`) that validation and best.pt use, and
per-epoch weight snapshots for checkpoint averaging.

Run folder (held by `moe_apps.training.run.start_run` while training): ``config.json`` (written
by the app), ``metrics.jsonl`` (one line per epoch), ``checkpoints/last.pt`` (everything to
resume, the weight average and the param groups' lrs included), ``checkpoints/best.pt`` (weights of
the best epoch), ``checkpoints/epoch-NNNN.pt`` (the last ``snapshots`` epochs), ``curves.png``.
Resume is exact: ``train_batches(epoch)`` must give the same batches in the same order for the
same (seed, epoch), so the loop replays the epoch's iterator past the steps already done and
restores the RNG, optimizer and scheduler states saved after the last of them.

Under ``torchrun`` (N processes) the same loop runs data-parallel: `moe_apps.training.distributed`
states the rules (rank r trains on batches r, r+N, ...; only rank 0 writes; full-state checkpoints
that load at any world size); in one process it changes nothing.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moe_apps.atomic import atomic_write
from moe_apps.training.averaging import WeightAverage
from moe_apps.training.checkpoint import (
    check_compatible,
    list_snapshots,
    normalize_config,
    read_checkpoint,
    save_checkpoint,
    snapshot_path,
)
from moe_apps.training.config import FitResult, Task, TrainConfig
from moe_apps.training.distributed import (
    Distribute,
    RankSync,
    current_context,
    data_parallel_model,
    rank_device,
)
from moe_apps.training.plots import plot_curves
from moe_apps.training.run_state import RunState, is_better
from moe_apps.training.runtime import (
    ParamGroupsFn,
    autocast,
    build_scheduler,
    count_steps,
    resolve_device,
    set_seed,
    to_device,
)
from moe_core.diagnostics import RoutingStats
from moe_core.losses import collect_aux_losses, weighted_aux_loss

# Logged in metrics.jsonl but left off the one-line epoch summary (per-expert detail).
QUIET_PREFIXES = ("routing_", "val_gate", "train_gate")
PLOT_EVERY_S = 30.0  # redraw curves.png at an epoch end at most this often (and always at the end)


class _Trainer:
    """One `fit` call: holds the objects a run needs so that the steps read as plain methods."""

    def __init__(self, model: nn.Module, task: Task, config: TrainConfig, run_dir: Path, *,
                 app: str, model_config: dict[str, Any], device: torch.device, total_steps: int,
                 console: Any, param_groups: ParamGroupsFn | None = None, sync: RankSync | None = None) -> None:
        self.model, self.task, self.config, self.run_dir = model, task, config, run_dir
        self.sync = sync if sync is not None else RankSync(current_context(), None, model, config.seed)
        self.net = self.sync.net  # forward / backward (DDP under torchrun); state through self.sync
        self.app, self.model_config, self.device, self.console = app, model_config, device, console
        self.last_path = run_dir / "checkpoints" / "last.pt"
        self.best_path = run_dir / "checkpoints" / "best.pt"
        self.metrics_path = run_dir / "metrics.jsonl"
        self.coefficients = dict(config.aux_loss_coefficients)
        weighted_aux_loss({}, self.coefficients)  # a typo in a coefficient name fails here, not later
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = self.sync.make_optimizer(config, param_groups)
        self.scheduler = build_scheduler(self.optimizer, config, total_steps)
        self.average = None if config.averaging == "none" else WeightAverage(
            config.averaging, config.averaging_decay, config.averaging_every, config.averaging_start_epoch)
        self.run = RunState()
        self.last_plot = -math.inf

    # ----- checkpoints -------------------------------------------------------------------------
    def _header(self) -> dict[str, Any]:
        """What every checkpoint says of the run's app and configs (checked on resume and load)."""
        return {"app": self.app, "model_config": self.model_config, "train_config": asdict(self.config)}

    def _metadata(self) -> dict[str, Any]:
        return {**self._header(), **self.run.metadata()}

    def check_finite(self) -> None:
        """FloatingPointError (before anything is saved) if the epoch's running sums went NaN/inf."""
        bad = self.run.non_finite()
        if bad:
            raise FloatingPointError(
                f"non-finite {', '.join(bad)} in epoch {self.run.epoch + 1} by step "
                f"{self.run.step_in_epoch}; lower lr, turn on grad_clip, or check the data"
            )

    def save_last(self) -> None:
        """checkpoints/last.pt (collective under torchrun: every rank calls it, rank 0 writes)."""
        self.check_finite()
        sync, run = self.sync, self.run
        run.sums, run.metric_sums = sync.mean_over_ranks(run.sums), sync.mean_over_ranks(run.metric_sums)
        averaging = None if self.average is None else self.average.state_dict()
        if averaging is not None and averaging["state"] is not None:
            averaging["state"] = {k: v.cpu() for k, v in sync.full_of(self.average.state).items()}
        state = {
            **self._header(),
            **run.state_dict(),
            "model": sync.model_state(),
            "optimizer": sync.optimizer_state(self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            **sync.rng_entries(),
            "averaging": averaging,
        }
        if sync.is_main:
            save_checkpoint(self.last_path, state)

    def restore(self, state: Mapping[str, Any]) -> None:
        self.sync.load_model_state(state["model"])
        self.sync.load_optimizer_state(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.average is not None:
            if state.get("averaging") is None:
                raise ValueError(f"{self.last_path} was trained without weight averaging; resume it "
                                 "with averaging='none' or start a new run")
            averaging = dict(state["averaging"])
            if averaging["state"] is not None:
                averaging["state"] = self.sync.local_of(averaging["state"])
            self.average.load_state_dict(averaging, self.device)
        step = self.scheduler.last_epoch  # follow the current config's schedule from here
        for group, base_lr in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base_lr * self.scheduler.lr_lambdas[0](step)
        self.run = RunState.from_state_dict(state, self.device)
        self.write_metrics()

    def write_metrics(self) -> None:
        """metrics.jsonl = one line per epoch of the history, written atomically (a full disk is
        an OSError naming the file, and a kill never leaves half a line); rank 0 only."""
        if not self.sync.is_main:
            return
        lines = "".join(json.dumps(row) + "\n" for row in self.run.history)
        atomic_write(self.metrics_path, lambda f: f.write(lines.encode()))

    # ----- one step / one epoch ----------------------------------------------------------------
    def train_step(self, batch: Any) -> None:
        for module in self.model.modules():  # a layer this forward skips must not add stale values
            if getattr(module, "last_aux_losses", None) is not None:
                module.last_aux_losses = None
            if getattr(module, "last_stats", None) is not None:
                module.last_stats = None
        with autocast(self.device, self.config.precision):
            task_loss, metrics = self.task.training_loss(self.net, batch)
            if not isinstance(task_loss, Tensor) or task_loss.dim() != 0:
                raise ValueError(
                    "Task.training_loss must return (scalar loss tensor, dict of metrics), got a "
                    f"{type(task_loss).__name__} of shape {tuple(getattr(task_loss, 'shape', ()))}"
                )
            aux = collect_aux_losses(self.model)
            loss = task_loss + weighted_aux_loss(aux, self.coefficients) if aux else task_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip is not None:
            self.run.add("grad_norm", self.sync.clip_grad_norm_(self.params, self.config.grad_clip), self.device)
        self.optimizer.step()
        self.scheduler.step()
        if self.average is not None:
            self.average.after_step(self.model, self.run.epoch)
        run = self.run
        run.add("train_loss", loss, self.device)
        for name, value in aux.items():
            run.add(f"aux_{name}", value, self.device)
        for name, value in metrics.items():
            run.add(f"train_{name}", value, self.device, metric=True)
        for name, module in self.model.named_modules():
            stats = getattr(module, "last_stats", None)
            if isinstance(stats, RoutingStats):
                run.add_routing(name or "model", stats)
        run.step_in_epoch += 1
        run.global_step += 1

    def validate(self, val_batches: Callable[[], Iterable[Any]]) -> dict[str, float]:
        self.net.eval()
        averaged = self.average.applied(self.model) if self.average is not None else contextlib.nullcontext()
        with averaged, torch.no_grad(), autocast(self.device, self.config.precision):
            metrics = self.task.evaluate(self.net, to_device(val_batches(), self.device))
        metrics = self.sync.agree(metrics)  # rank 0's metrics decide on every rank
        if not isinstance(metrics, Mapping) or self.config.monitor not in metrics:
            keys = sorted(metrics) if isinstance(metrics, Mapping) else type(metrics).__name__
            raise ValueError(
                f"TrainConfig.monitor={self.config.monitor!r} is not among the validation metrics "
                f"Task.evaluate returned ({keys}); set monitor to one of them"
            )
        return {name: float(value) for name, value in metrics.items()}

    def end_epoch(self, metrics: dict[str, float], seconds: float) -> str:
        """Log the epoch, update best / early stopping, write checkpoints, metrics and curves."""
        run, config = self.run, self.config
        self.check_finite()
        run.sums, run.metric_sums = self.sync.mean_over_ranks(run.sums), self.sync.mean_over_ranks(run.metric_sums)
        lr = self.scheduler.base_lrs[0] * self.scheduler.lr_lambdas[0](run.global_step - 1)
        row = run.epoch_row(metrics, lr, seconds)
        value = metrics[config.monitor]
        improved = is_better(value, run.best_metric, config.monitor_mode)
        run.next_epoch(row)
        weights = self.validated_weights()
        if improved:
            run.best_metric, run.best_epoch, run.best_metrics = value, run.epoch, dict(metrics)
            run.bad_epochs = 0
            if self.sync.is_main:
                save_checkpoint(self.best_path, {**self._metadata(), "model": weights})
        else:
            run.bad_epochs += 1
        if config.snapshots and self.sync.is_main:
            save_checkpoint(snapshot_path(self.run_dir, run.epoch), {**self._metadata(), "model": weights})
            for old in list_snapshots(self.run_dir)[:-config.snapshots]:
                old.unlink(missing_ok=True)
        run.stopped_early = config.patience is not None and run.bad_epochs >= config.patience
        self.save_last()
        self.write_metrics()
        if time.perf_counter() - self.last_plot >= PLOT_EVERY_S and self.sync.is_main:
            self.plot()
        shown = "  ".join(f"{k} {v:.4g}" for k, v in row.items()
                          if k not in ("epoch", "seconds", "lr") and not k.startswith(QUIET_PREFIXES))
        mark = " *" if improved else ""
        stop = f"  early stop ({run.bad_epochs} epochs without a better {config.monitor})" if run.stopped_early else ""
        return f"epoch {run.epoch}/{config.epochs}  {shown}  lr {row['lr']:.3g}  {seconds:.1f}s{mark}{stop}"

    def validated_weights(self) -> dict[str, Tensor]:
        """The weights validation scores: the weight average once it started, else the model's."""
        if self.average is None:
            return self.sync.model_state()
        return self.sync.full_of(self.average.averaged_state(self.model))

    def plot(self) -> None:
        if self.run.history and self.sync.is_main:
            plot_curves(self.run.history, self.run_dir / "curves.png", monitor=self.config.monitor,
                        best_epoch=self.run.best_epoch)
            self.last_plot = time.perf_counter()

    def train_epoch(self, batches: Iterable[Any], resumed_state: Mapping[str, Any] | None,
                    progress: Any, steps_per_epoch: int, started: float) -> None:
        """Train the rest of epoch ``run.epoch``; on resume, skip its done steps and then restore RNG."""
        run, config = self.run, self.config
        self.net.train()
        iterator = iter(self.sync.shard(batches, steps_per_epoch))
        if resumed_state is not None:
            # Replay the iterator past the done steps (data order depends on (seed, epoch) only),
            # then restore the RNG exactly as it was right after the last done step.
            for _ in islice(iterator, run.step_in_epoch):
                pass
            self.sync.restore_rng(resumed_state, run.global_step)
        task_id = progress.add_task(f"epoch {run.epoch + 1}/{config.epochs}", total=steps_per_epoch,
                                    completed=run.step_in_epoch, loss="")
        for batch in to_device(iterator, self.device):
            self.train_step(batch)
            progress.update(task_id, advance=1)
            if run.step_in_epoch % config.log_every == 0:
                mean = (run.sums["train_loss"] / run.step_in_epoch).item()
                progress.update(task_id, loss=f"loss {mean:.4f}")
                if not config.progress and self.sync.is_main:
                    self.console.print(f"epoch {run.epoch + 1} step {run.step_in_epoch}: loss {mean:.4f}")
            if config.checkpoint_every is not None and run.global_step % config.checkpoint_every == 0:
                run.seconds = time.perf_counter() - started
                self.save_last()
        progress.remove_task(task_id)
        if run.step_in_epoch == 0:
            raise ValueError(f"train_batches({run.epoch}) gave no batches; the training set is empty")


def fit(model: nn.Module, task: Task, train_batches: Callable[[int], Iterable[Any]],
        val_batches: Callable[[], Iterable[Any]], config: TrainConfig, run_dir: str | Path, *,
        app: str, model_config: Mapping[str, Any], resume: bool = False, console: Any = None,
        param_groups: ParamGroupsFn | None = None, distribute: Distribute | None = None) -> FitResult:
    """Train ``model`` on ``task`` for ``config.epochs`` epochs (or until early stopping).

    Args:
        train_batches: ``epoch`` (0-based) -> that epoch's batches, in an order that depends only
            on (seed, epoch). Batches have ``.to(device)``; the task gets them on the device.
        val_batches: () -> the validation batches, passed to ``task.evaluate`` once per epoch.
        run_dir: the run folder (see the module docstring). A fresh run refuses a folder that
            already holds checkpoints; ``resume=True`` continues from checkpoints/last.pt.
        app, model_config: stored in every checkpoint and checked on resume / load.
        console: a rich Console for the per-epoch lines (a new one if None).
        param_groups: ``model -> [{"params": [...], "lr_scale": float, "weight_decay": float}]``;
            each group trains at ``lr * lr_scale`` (under the same schedule) with its own weight
            decay; trainable parameters left out form one more group with the config's values.
        distribute: under torchrun, how the model is spread over the ranks (default
            `data_parallel_model`: DDP, expert-parallel experts reduced over their group); ignored
            in one process. The rules (data share, rank 0 writes, full checkpoints) are in
            `moe_apps.training.distributed`.

    Returns:
        FitResult; the model is left holding the weights of the best epoch (checkpoints/best.pt:
        the averaged weights when ``config.averaging`` is on).
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not isinstance(app, str) or not app:
        raise ValueError(f"app must be the app's name such as 'recsys', got {app!r}")
    run_dir = Path(run_dir)
    normalized = normalize_config(model_config)
    console = console if console is not None else Console()
    checkpoint_dir = run_dir / "checkpoints"
    existing = sorted(p.name for p in checkpoint_dir.glob("*.pt")) if checkpoint_dir.is_dir() else []
    if not resume and existing:
        raise FileExistsError(
            f"run folder {run_dir} already has checkpoints ({', '.join(existing)}); pass resume=True "
            "to continue that run, or choose a new run folder"
        )
    last_path = checkpoint_dir / "last.pt"
    if resume and not last_path.is_file():
        raise FileNotFoundError(
            f"resume=True but {last_path} does not exist; start a fresh run (resume=False) instead"
        )
    ctx = current_context()
    device = rank_device(resolve_device(config.device), ctx)
    state = None
    if resume:
        state = read_checkpoint(last_path)
        check_compatible(state, last_path, app=app, model_config=normalized)
    else:
        set_seed(config.seed)
    model.to(device)
    dm = (distribute or data_parallel_model)(model, ctx) if ctx.enabled else None
    sync = RankSync(ctx, dm, model, config.seed)
    if state is None:
        sync.seed_rank()
    steps_per_epoch = sync.steps_per_epoch(count_steps(train_batches))
    trainer = _Trainer(model, task, config, run_dir, app=app, model_config=normalized, device=device,
                       total_steps=config.epochs * steps_per_epoch, console=console,
                       param_groups=param_groups, sync=sync)
    if sync.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    say = console.print if sync.is_main else (lambda *args, **kwargs: None)
    if state is not None:
        trainer.restore(state)
        say(f"resumed {run_dir} at epoch {trainer.run.epoch + 1}, step {trainer.run.step_in_epoch}"
            + (f" on {ctx.world_size} processes" if ctx.enabled else ""))
    else:
        trainer.write_metrics()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[loss]}"))
    with Progress(*columns, console=console, disable=not (config.progress and sync.is_main)) as progress:
        while trainer.run.epoch < config.epochs and not trainer.run.stopped_early:
            started = time.perf_counter() - trainer.run.seconds
            if state is not None and trainer.run.step_in_epoch == 0:
                sync.restore_rng(state, trainer.run.global_step)  # saved at the epoch boundary
                state = None
            trainer.train_epoch(train_batches(trainer.run.epoch), state, progress, steps_per_epoch,
                                started)
            state = None
            metrics = trainer.validate(val_batches)
            say(trainer.end_epoch(metrics, time.perf_counter() - started), soft_wrap=True)
    trainer.plot()
    run = trainer.run
    if run.best_epoch is None:
        raise FloatingPointError(
            f"validation {config.monitor} was never finite in {run.epoch} epochs; no best checkpoint"
        )
    sync.barrier()  # rank 0 has written best.pt
    sync.load_model_state(read_checkpoint(trainer.best_path)["model"])
    return FitResult(best_metrics=dict(run.best_metrics), best_epoch=run.best_epoch,
                     history=[dict(row) for row in run.history], run_dir=run_dir,
                     best_checkpoint=trainer.best_path)
