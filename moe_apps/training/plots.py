"""curves.png of a run: the training loss and the monitored validation metric, per epoch."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from moe_apps.atomic import atomic_write


def plot_curves(
    history: Sequence[dict[str, float]], path: Path, *, monitor: str, best_epoch: int | None
) -> None:
    """Draw train loss (and val loss when logged) and ``val_<monitor>`` against the epoch into a PNG
    (matplotlib Agg, no pyplot state), written atomically to ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [row["epoch"] for row in history]
    figure = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(figure)
    loss_ax, metric_ax = figure.subplots(1, 2)
    loss_ax.plot(epochs, [row["train_loss"] for row in history], marker="o", label="train loss")
    if monitor != "loss" and all("val_loss" in row for row in history):
        loss_ax.plot(epochs, [row["val_loss"] for row in history], marker="o", label="val loss")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss")
    loss_ax.set_title("training loss (task + weighted aux)")
    loss_ax.legend()
    key = f"val_{monitor}"
    metric_ax.plot(epochs, [row.get(key, float("nan")) for row in history], marker="o", color="C2")
    if best_epoch is not None:
        best_value = next(row.get(key) for row in history if row["epoch"] == best_epoch)
        metric_ax.scatter([best_epoch], [best_value], s=120, facecolors="none", edgecolors="C3",
                          label=f"best (epoch {best_epoch})", zorder=3)
        metric_ax.legend()
    metric_ax.set_xlabel("epoch")
    metric_ax.set_ylabel(key)
    metric_ax.set_title(f"validation {monitor}")
    for ax in (loss_ax, metric_ax):
        ax.grid(alpha=0.3)
    atomic_write(Path(path), lambda f: figure.savefig(f, format="png", dpi=100))
