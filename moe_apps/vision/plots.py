"""The pictures `moe-apps vision eval` leaves in the run folder (matplotlib, Agg canvas, written
atomically): ``confusion.png`` (test confusion matrix, row-normalised), ``experts_by_class.png``
(for moe: the fraction of each class's test images that each expert of each expert stage
received; for condconv: on which kernel of each conv their largest mixing weight fell) and ``confident_errors.png`` (the test images the model got wrong with the highest
probability on the wrong class, with true / predicted labels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moe_apps.atomic import atomic_write
from moe_apps.vision.data import Split
from moe_apps.vision.task import Predictions

CONFUSION = "confusion.png"
EXPERTS = "experts_by_class.png"
ERRORS = "confident_errors.png"
GRID = (4, 8)


def _figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: Path) -> None:
    atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=100))


def plot_confusion(matrix: np.ndarray, class_names: list[str], path: Path) -> None:
    figure = _figure((7, 6))
    ax = figure.subplots()
    rates = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(class_names)):
        for j in range(len(class_names)):
            if matrix[i, j]:
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"test confusion matrix (accuracy {np.trace(matrix) / max(1, matrix.sum()):.2%})")
    figure.colorbar(image, ax=ax, label="fraction of the true class")
    _save(figure, path)


def plot_experts_by_class(fractions: dict[str, np.ndarray], class_names: list[str], path: Path) -> None:
    """``fractions[stage]`` ``(classes, E)``: share of each class's images routed to each expert."""
    figure = _figure((3 + 1.2 * max(f.shape[1] for f in fractions.values()) * len(fractions), 5))
    axes = np.atleast_1d(figure.subplots(1, len(fractions)))
    for ax, (stage, frac) in zip(axes, fractions.items(), strict=True):
        image = ax.imshow(frac, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        for i in range(frac.shape[0]):
            for e in range(frac.shape[1]):
                ax.text(e, i, f"{frac[i, e]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if frac[i, e] > 0.5 else "white")
        ax.set_xticks(range(frac.shape[1]), [f"e{e}" for e in range(frac.shape[1])])
        ax.set_yticks(range(len(class_names)), class_names)
        ax.set_xlabel("expert")
        ax.set_title(f"{stage}: expert use per class")
        figure.colorbar(image, ax=ax, label="fraction of the class's test images")
    _save(figure, path)


def plot_confident_errors(preds: Predictions, test: Split, class_names: list[str], path: Path) -> int:
    """The wrong predictions with the highest predicted probability, up to 4 x 8; returns how many."""
    predicted = preds.probs_NC.argmax(1)
    confidence = preds.probs_NC.max(1).values
    wrong = (predicted != test.labels).nonzero().squeeze(1)
    order = wrong[confidence[wrong].argsort(descending=True)][: GRID[0] * GRID[1]]
    figure = _figure((GRID[1] * 1.6, GRID[0] * 1.9))
    axes = figure.subplots(*GRID).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, index in zip(axes, order.tolist(), strict=False):
        ax.imshow(test.images[index].permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(f"{class_names[int(test.labels[index])]} -> {class_names[int(predicted[index])]}\n"
                     f"p={float(confidence[index]):.2f}", fontsize=7)
    figure.suptitle(f"most confidently wrong test images ({len(wrong)} wrong of {len(test)})")
    _save(figure, path)
    return len(order)


def expert_fractions(preds: Predictions, labels_N: torch.Tensor, num_classes: int,
                     num_experts: int) -> dict[str, torch.Tensor]:
    """Per expert stage, ``(classes, E)``: the fraction of each class's images sent to each expert."""
    fractions = {}
    for stage, chosen_N in preds.experts.items():
        counts = torch.zeros(num_classes, num_experts)
        counts.index_put_((labels_N, chosen_N), torch.ones(len(chosen_N)), accumulate=True)
        fractions[stage] = counts / counts.sum(1, keepdim=True).clamp_min(1)
    return fractions


def write_eval_plots(preds: Predictions, test: Split, class_names: list[str], run_dir: Path,
                     num_experts: int) -> list[Path]:
    """Write the eval pictures into ``run_dir``; returns their paths."""
    from sklearn.metrics import confusion_matrix

    run_dir = Path(run_dir)
    n = len(class_names)
    matrix = confusion_matrix(test.labels.numpy(), preds.probs_NC.argmax(1).numpy(), labels=list(range(n)))
    plot_confusion(matrix, class_names, run_dir / CONFUSION)
    written = [run_dir / CONFUSION]
    if preds.experts:
        fractions = expert_fractions(preds, test.labels, n, num_experts)
        plot_experts_by_class({k: v.numpy() for k, v in fractions.items()}, class_names, run_dir / EXPERTS)
        written.append(run_dir / EXPERTS)
    plot_confident_errors(preds, test, class_names, run_dir / ERRORS)
    written.append(run_dir / ERRORS)
    return written
