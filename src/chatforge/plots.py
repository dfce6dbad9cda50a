"""One way to draw a figure to a PNG file: without a display (matplotlib's Agg backend), tight
layout, the figure closed whatever happens (training stages, the scaling fit)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402


@contextlib.contextmanager
def figure(path: Path, figsize: tuple[float, float] = (7, 4), dpi: int = 100):
    """`with figure(path) as (fig, ax): ...` draws one figure and writes it to `path` when the
    block ends."""
    fig, ax = plt.subplots(figsize=figsize)
    try:
        yield fig, ax
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)


def colors(n: int, cmap: str = "viridis", span: float = 0.85) -> list:
    """`n` colours spread over a colormap (one per series)."""
    return [matplotlib.colormaps[cmap](span * i / max(n - 1, 1)) for i in range(n)]
