"""Headless matplotlib figures, saved atomically as PNG."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from implicit_lm.files import atomic_write

logger = logging.getLogger(__name__)


def save_figure(figure: Any, path: str | os.PathLike) -> None:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    try:
        atomic_write(Path(path), lambda temp: figure.savefig(temp, format="png", dpi=120, bbox_inches="tight"))
    finally:
        plt.close(figure)
    logger.info("Wrote %s", path)


def new_figure(columns: int = 1, width: float = 6.0, height: float = 4.0, rows: int = 1) -> tuple[Any, Any]:
    """A headless matplotlib figure of `rows` x `columns` panels (Agg backend: no display needed); the axes are a
    2-D array in every case. The constrained layout keeps a row's axis labels off the next row's titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False, layout="constrained")
