"""Expert utilisation plot of a multi-gate recsys run: mean gate weight per task and expert.

MMoE (Ma et al. 2018) gates all see the same experts; a PLE (Tang et al. 2020) task gate sees its
own experts and the shared ones, so cells a task's gate cannot reach are left blank. One heatmap per
evaluation set (validation at the best epoch, test), matplotlib Agg, written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from moe_apps.atomic import atomic_write


def gate_matrix(tasks: list[str], experts: list[list[str]],
                weights: list[list[float]]) -> tuple[np.ndarray, list[str]]:
    """(T, E) matrix over the union of the experts (first-seen order), NaN where unreachable."""
    columns: list[str] = []
    for names in experts:
        columns += [n for n in names if n not in columns]
    matrix = np.full((len(tasks), len(columns)), np.nan)
    for t, (names, row) in enumerate(zip(experts, weights, strict=True)):
        for name, weight in zip(names, row, strict=True):
            matrix[t, columns.index(name)] = weight
    return matrix, columns


def plot_gates(gates: dict[str, Any], path: Path, *, title: str) -> None:
    """Heatmaps of ``gates`` (the gates.json dict: tasks, experts, val, test) into a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    parts = [key for key in ("val", "test") if gates.get(key) is not None]
    figure = Figure(figsize=(4 + 1.1 * max(len(e) for e in gates["experts"]), 1.2 + 1.6 * len(parts)
                             * max(1, len(gates["tasks"])) / 2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(parts), 1, squeeze=False)[:, 0]
    for ax, part in zip(axes, parts, strict=True):
        matrix, columns = gate_matrix(gates["tasks"], gates["experts"], gates[part])
        image = ax.imshow(np.ma.masked_invalid(matrix), cmap="viridis", vmin=0.0,
                          vmax=max(0.5, float(np.nanmax(matrix))), aspect="auto")
        for (t, e), value in np.ndenumerate(matrix):
            if np.isfinite(value):
                ax.text(e, t, f"{value:.2f}", ha="center", va="center",
                        color="white" if value < 0.35 else "black", fontsize=9)
        ax.set_xticks(range(len(columns)), columns)
        ax.set_yticks(range(len(gates["tasks"])), gates["tasks"])
        ax.set_xlabel("expert")
        ax.set_title(f"{title}: mean gate weight ({'validation, best epoch' if part == 'val' else 'test'})")
        figure.colorbar(image, ax=ax)
    atomic_write(Path(path), lambda f: figure.savefig(f, format="png", dpi=100))
