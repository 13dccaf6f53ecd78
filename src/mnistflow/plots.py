"""Matplotlib for the entry points that draw: no display, and PNGs written atomically."""

from __future__ import annotations

from .atomic import atomic_path


def pyplot():
    """matplotlib.pyplot on the Agg backend (jobs have no display), imported when first drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path) -> None:
    """Lay out, write atomically, close."""
    with atomic_path(path) as tmp:
        fig.tight_layout()
        fig.savefig(tmp, format="png", dpi=100)
    pyplot().close(fig)
