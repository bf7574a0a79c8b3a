"""Plots of a translation run: the expert load of every MoE layer (matplotlib, Agg backend).

``routing.png``: one row per MoE layer (encoder.0, ..., decoder.N), one column per expert, the
share of the layer's token assignments each expert got on the validation set; a uniform router
gives 1/E everywhere, a collapsed one a single bright cell per row.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

from moe_apps.atomic import atomic_write


def plot_expert_load(load: Mapping[str, Sequence[float]], path: Path, *, title: str) -> None:
    """Write a heatmap of ``{layer: fraction per expert}`` to ``path`` (PNG, atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not load:
        raise ValueError("no MoE layers to plot")
    names = list(load)
    grid = np.array([list(load[name]) for name in names], dtype=float)
    E = grid.shape[1]
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * E, 1.0 + 0.45 * len(names)))
    image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=max(2.0 / E, float(grid.max())), aspect="auto")
    ax.set_xticks(range(E), [str(e) for e in range(E)])
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("expert")
    for (row, col), value in np.ndenumerate(grid):
        ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=7,
                color="white" if value < grid.max() * 0.6 else "black")
    fig.colorbar(image, ax=ax, label="share of assignments (uniform = 1/E)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    data = buffer.getvalue()
    atomic_write(Path(path), lambda f: f.write(data))
