"""Train, evaluate and query vision runs (what `moe-apps vision train / eval / predict` call).

A run folder holds the shared lifecycle's ``config.json`` and the loop's ``metrics.jsonl``,
``checkpoints/{last,best}.pt`` and ``curves.png``; `evaluate_run` adds ``eval.json`` and the plots
of `moe_apps.vision.plots`. The recipe maps onto the shared loop (`moe_apps.training.fit`): Nesterov
SGD, the triangular schedule, BN biases in their own param group (64 x lr, 1/64 of the L2), and
lookahead over the last 30% of the epochs (the loop's lookahead has a constant decay; airbench ramps
its decay up with the cube of the progress, so it barely acts before the last third either).
When the run trains on all 50,000 images (``validation=0``), the per-epoch metrics are measured
on 2,000 of the training images (``seen_*``: no test image is used to pick anything).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_apps.atomic import atomic_write
from moe_apps.datasets import resolve_data_root
from moe_apps.training import TrainConfig, fit, load_checkpoint, set_seed
from moe_apps.training.distributed import current_context
from moe_apps.training.run import RunError, check_run_folder, open_run, start_run
from moe_apps.vision.config import ModelConfig, RecipeConfig, VisionConfig, with_overrides
from moe_apps.vision.data import Split, TrainBatches, VisionData, eval_batches, make_splits
from moe_apps.vision.model import (
    NUM_CLASSES,
    VisionNet,
    build_model,
    count_parameters,
    flops_per_image,
)
from moe_apps.vision.task import Predictions, VisionTask, predict

APP = "vision"
WHITENING_IMAGES = 5000
SEEN_IMAGES = 2000
RESUME_FREE = ("epochs", "device")
CLASSES_FILE = "classes.json"


@dataclass(frozen=True)
class TrainOutcome:
    """What `train` returns: the run, its final validation metrics, the test accuracy (TTA as
    configured), the parameter count, FLOPs per image and the training time (evaluation excluded)."""

    run_dir: Path
    config: VisionConfig
    val_metrics: dict[str, float]
    test_accuracy: float
    parameters: int
    flops: int
    train_seconds: float
    images_per_second: float


def train_config(config: VisionConfig, *, progress: bool, steps_per_epoch: int) -> TrainConfig:
    """The shared loop's config for ``config.recipe``."""
    r = config.recipe
    seen = config.validation == 0
    coefficients = (("load_balance", r.aux_load_balance), ("z_loss", r.aux_z_loss))
    lookahead = r.lookahead_every > 0
    return TrainConfig(
        epochs=r.epochs, lr=r.lr, weight_decay=r.weight_decay, optimizer="sgd",
        momentum=r.momentum, nesterov=r.momentum > 0, schedule="triangular",
        peak_fraction=r.schedule_peak, start_factor=r.schedule_start, final_factor=r.schedule_end,
        grad_clip=None, precision=r.precision, device=config.device, seed=config.seed,
        aux_loss_coefficients=coefficients,
        monitor="seen_accuracy" if seen else "accuracy", monitor_mode="max", patience=None,
        checkpoint_every=max(1, steps_per_epoch // 2), log_every=10, progress=progress,
        averaging="lookahead" if lookahead else "none", averaging_decay=r.lookahead_decay,
        averaging_every=max(1, r.lookahead_every),
        averaging_start_epoch=max(1, math.floor(0.7 * r.epochs) + 1),
    )


def expert_lr_scale(model_config: ModelConfig) -> float:
    """How much larger the lr of expert parameters is: E / k for moe (an expert's gradient comes
    from about k / E of the batch while the loss is averaged over all of it, so plain SGD would
    move it E / k times slower than the dense block), E for condconv (expert kernel e gets its
    mixing weight, about 1 / E, of the kernel's gradient); 1 without experts."""
    if model_config.model == "moe":
        return model_config.num_experts / model_config.top_k
    if model_config.model == "condconv":
        return float(model_config.num_experts)
    return 1.0


def param_groups(recipe: RecipeConfig, expert_scale: float = 1.0):
    """The weights (lr, L2 as configured; first, so the logged lr is theirs), BN biases at
    ``bias_lr_scale`` x the lr and 1 / that of the L2 (airbench), the router gates at
    ``router_lr_scale`` x the lr (a gate on pooled features collapses onto one expert at the
    backbone's lr), and expert weights / expert BN biases at ``expert_scale`` x those lrs (and
    1 / that of the L2, so lr x L2 stays the same; `expert_lr_scale`)."""

    def groups(model: nn.Module) -> list[dict[str, Any]]:
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        routers = [(n, p) for n, p in named if ".router." in n]
        rest = [(n, p) for n, p in named if ".router." not in n]

        def is_expert(name: str) -> bool:
            return ".experts." in name or name.endswith("weight_EOI33")

        def is_norm_bias(name: str) -> bool:
            return ".norm" in name and name.endswith("bias")

        wd, bias_scale = recipe.weight_decay, recipe.bias_lr_scale
        specs = [("weights", False, False, 1.0), ("norm_biases", False, True, bias_scale),
                 ("expert_weights", True, False, expert_scale),
                 ("expert_norm_biases", True, True, bias_scale * expert_scale)]
        groups = []
        for name, expert, bias, scale in specs:
            params = [p for n, p in rest if is_expert(n) == expert and is_norm_bias(n) == bias]
            if params:
                groups.append({"params": params, "lr_scale": scale, "weight_decay": wd / scale,
                               "name": name})
        if routers:
            groups.append({"params": [p for _, p in routers], "lr_scale": recipe.router_lr_scale,
                           "weight_decay": 0.0, "name": "routers"})
        return groups

    return groups


# ModelConfig fields added after runs were saved: recorded only when set, so a checkpoint written
# before a field existed still matches its own config
ADDED_LATER = {"expert_core": False, "expert_width": None, "router": "topk"}


def model_config_dict(config: VisionConfig) -> dict[str, Any]:
    """What a checkpoint records of the model (and is checked against): the model config without
    the `ADDED_LATER` fields that are at their default."""
    return {k: v for k, v in asdict(config.model).items() if k not in ADDED_LATER or v != ADDED_LATER[k]}


def prepare_model(config: VisionConfig, data: VisionData) -> VisionNet:
    """Seed, build and fit the whitening filters on the first training images."""
    set_seed(config.seed)
    model = build_model(config.model)
    model.fit_whitening(data.train.images[:WHITENING_IMAGES])
    model.channels_last = config.recipe.channels_last
    model.router_input_grad = config.recipe.router_input_grad
    return model


def _write_json(path: Path, payload: Any) -> None:
    text = json.dumps(payload, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def saved_config(run_dir: str | Path, raw: Any) -> VisionConfig:
    """The `VisionConfig` of a run's config.json; RunError naming the file if it is not one."""
    try:
        return VisionConfig.from_dict(raw)
    except ValueError as error:
        raise RunError(f"{Path(run_dir) / 'config.json'} does not hold a valid vision config "
                       f"({error}); the run folder is damaged or from another version") from error


def resolve_resume(out_dir: Path, overrides: dict[str, Any]) -> tuple[VisionConfig, Path | None]:
    """The saved config of the run in ``out_dir`` with ``overrides`` (`with_overrides` names) laid
    on it; ValueError if an override other than epochs / device changes it."""
    info = check_run_folder(out_dir, app=APP, resume=True)
    assert info is not None
    saved = saved_config(out_dir, info.config)
    laid = with_overrides(saved, **overrides)
    free = {k: v for k, v in overrides.items() if k in RESUME_FREE}
    if laid != with_overrides(saved, **free):
        changed = sorted(k for k, v in overrides.items() if v is not None and k not in RESUME_FREE)
        verb = "differs" if len(changed) == 1 else "differ"
        raise ValueError(f"--resume: {', '.join('--' + k.replace('_', '-') for k in changed)} {verb} "
                         f"from the run's config.json in {out_dir}; only --epochs and --device may "
                         "change, drop the others to continue it")
    return laid, info.data_root


def train(config: VisionConfig | None, out_dir: str | Path, *, resume: bool = False,
          overrides: dict[str, Any] | None = None, data_dir: str | Path | None = None,
          console: Any = None, progress: bool = True, evaluate: bool = True) -> TrainOutcome:
    """Train ``config`` into ``out_dir`` and score the test set once with the best (= averaged,
    last) weights. ``resume``: continue the run in ``out_dir`` with its saved config (``config``
    must be None) and ``overrides`` (only epochs / device may differ)."""
    from rich.console import Console

    console = console if console is not None else Console()
    out_dir = Path(out_dir)
    saved_root = None
    if resume:
        if config is not None:
            raise ValueError("resume continues the saved config; pass config=None and overrides")
        config, saved_root = resolve_resume(out_dir, overrides or {})
    else:
        check_run_folder(out_dir, app=APP, resume=False)
    assert config is not None
    root = resolve_data_root(data_dir if data_dir is not None else saved_root)
    data = make_splits(config, root)
    steps = len(data.train) // config.recipe.batch_size
    if steps < 1:
        raise ValueError(f"the training part has {len(data.train)} images, fewer than one batch of "
                         f"{config.recipe.batch_size}")
    loop_config = train_config(config, progress=progress, steps_per_epoch=steps)
    model = prepare_model(config, data)
    task = VisionTask(config.recipe.label_smoothing, prefix="" if data.val is not None else "seen_")
    val_split = data.val if data.val is not None else Split(data.train.images[:SEEN_IMAGES],
                                                            data.train.labels[:SEEN_IMAGES])
    val = eval_batches(val_split, config.recipe.eval_batch_size)
    r = config.recipe

    def train_batches(epoch: int) -> TrainBatches:
        return TrainBatches(data.train, r.batch_size, r.translate, config.seed, epoch)

    params, flops = count_parameters(model), flops_per_image(model.config, model.widths)
    console.print(f"[bold]{config.model.model}[/bold] widths {model.widths}, {params:,} parameters, "
                  f"{flops / 1e6:.1f}M multiply-adds per image; {len(data.train)} training images, "
                  f"{len(val_split)} {'validation' if data.val is not None else 'seen (training)'} images")
    with start_run(out_dir, app=APP, config=config.to_dict(), data_root=root, resume=resume) as run:
        if current_context().is_main:  # under torchrun rank 0 alone writes the run folder
            _write_json(run.run_dir / CLASSES_FILE, data.class_names)
        started = time.perf_counter()
        result = fit(model, task, train_batches, lambda: val, loop_config, run.run_dir, app=APP,
                     model_config=model_config_dict(config), resume=resume, console=console,
                     param_groups=param_groups(r, expert_lr_scale(config.model)))
        seconds = time.perf_counter() - started
        trained = sum(row.get("seconds", 0.0) for row in result.history)
        images = r.epochs * steps * r.batch_size
        test_accuracy = float("nan")
        if evaluate:
            report = evaluate_model(model, config, data, run.run_dir, tta=r.tta)
            test_accuracy = report["accuracy"]
    return TrainOutcome(out_dir, config, result.best_metrics, test_accuracy, params, flops,
                        trained or seconds, images / max(trained or seconds, 1e-9))


@dataclass(frozen=True)
class LoadedRun:
    """A trained run ready for inference: its config, class names and model (best weights)."""

    run_dir: Path
    config: VisionConfig
    model: VisionNet
    device: torch.device
    data_root: Path | None
    class_names: list[str]


def load_run(run_dir: str | Path, device: str = "cpu") -> LoadedRun:
    """Open a vision run and load its best checkpoint (RunError / ValueError on any problem)."""
    info = open_run(run_dir, app=APP)
    config = saved_config(run_dir, info.config)
    model = build_model(config.model)
    model.channels_last = config.recipe.channels_last
    load_checkpoint(info.checkpoint("best"), model, app=APP, model_config=model_config_dict(config))
    target = torch.device(device)
    model.to(target).eval()
    classes_path = Path(run_dir) / CLASSES_FILE
    try:
        class_names = json.loads(classes_path.read_text())
    except (OSError, ValueError):
        class_names = None
    if not (isinstance(class_names, list) and len(class_names) == NUM_CLASSES):
        raise RunError(f"{classes_path} is missing or damaged (it should list the {NUM_CLASSES} class "
                       "names); the run folder is incomplete")
    return LoadedRun(Path(run_dir), config, model, target, info.data_root, class_names)


def evaluate_model(model: VisionNet, config: VisionConfig, data: VisionData, run_dir: Path, *,
                   tta: bool) -> dict[str, Any]:
    """Score the test set, write ``eval.json`` and the plots, return the report."""
    from moe_apps.vision.plots import write_eval_plots

    device = next(model.parameters()).device
    preds = predict(model, eval_batches(data.test, config.recipe.eval_batch_size), tta=tta,
                    device=device, precision=config.recipe.precision)
    report = eval_report(preds, data.test, data.class_names, config.model.num_experts, tta=tta)
    write_eval_plots(preds, data.test, data.class_names, run_dir, config.model.num_experts)
    _write_json(run_dir / "eval.json", report)
    return report


def eval_report(preds: Predictions, test: Split, class_names: list[str], num_experts: int, *,
                tta: bool) -> dict[str, Any]:
    """Accuracy (fraction), per-class accuracy (None for a class without test images, e.g. under
    ``test_limit``), the confusion matrix and expert use per class."""
    from sklearn.metrics import confusion_matrix

    from moe_apps.vision.plots import expert_fractions

    predicted = preds.probs_NC.argmax(1).numpy()
    truth = test.labels.numpy()
    matrix = confusion_matrix(truth, predicted, labels=list(range(len(class_names))))
    per_class = {name: float(matrix[i, i] / matrix[i].sum()) if matrix[i].sum() else None
                 for i, name in enumerate(class_names)}
    experts = {stage: frac.tolist() for stage, frac in
               expert_fractions(preds, test.labels, len(class_names), num_experts).items()}
    return {"accuracy": float((predicted == truth).mean()), "images": int(len(truth)), "tta": tta,
            "per_class_accuracy": per_class, "confusion_matrix": matrix.tolist(),
            "expert_fraction_by_class": experts, "class_names": class_names}


def evaluate_run(run_dir: str | Path, *, tta: bool = True, data_dir: str | Path | None = None) -> dict[str, Any]:
    """What `moe-apps vision eval` does: the report of the run's best weights on the test set."""
    loaded = load_run(run_dir)
    root = resolve_data_root(data_dir if data_dir is not None else loaded.data_root)
    data = make_splits(loaded.config, root)
    return evaluate_model(loaded.model, loaded.config, data, loaded.run_dir, tta=tta)


__all__ = ["APP", "LoadedRun", "RunError", "TrainOutcome", "evaluate_run", "load_run", "train"]


def predict_files(loaded: LoadedRun, paths: list[Path], top: int) -> tuple[list[dict[str, Any]], list[ValueError]]:
    """Top-``top`` classes of each readable image file (TTA as the run's recipe says) and one
    ValueError per file that could not be read (missing, not an image, truncated)."""
    from moe_apps.vision.data import VisionBatch, load_image

    if not 1 <= top <= 10:
        raise ValueError(f"--top must be in 1..10, got {top}")
    images, names, errors = [], [], []
    for path in paths:
        try:
            images.append(load_image(path))
            names.append(str(path))
        except ValueError as error:
            errors.append(error)
    if not images:
        return [], errors
    batch = VisionBatch(torch.stack(images), torch.zeros(len(images), dtype=torch.long))
    preds = predict(loaded.model, [batch], tta=loaded.config.recipe.tta, device=loaded.device,
                    precision=loaded.config.recipe.precision)
    classes = loaded.class_names
    results = []
    for name, probs_C in zip(names, preds.probs_NC, strict=True):
        values, indices = probs_C.topk(top)
        results.append({"file": name, "top": [{"class": classes[i], "probability": float(v)}
                                              for v, i in zip(values.tolist(), indices.tolist(), strict=True)]})
    return results, errors
