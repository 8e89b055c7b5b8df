"""One house style for icp_lens's figures: readable on their own, without the text around them.

Every figure icp_lens draws goes through these helpers: ``style(ax, ...)`` (title, axis
labels, a light horizontal grid behind the data, no top/right frame), ``label_bars(ax)``
(the value on every bar, so a bar at 0.0 is still visible as "0.00"), ``reference_line``
(a named horizontal or vertical line, e.g. the oracle's accuracy) and ``legend_outside``
(the legend right of the axes, never over a bar). ``COLORS`` fixes the colour of each
role: the model before an edit, after it, and the oracle.
"""

from __future__ import annotations

from typing import Any

__all__ = ["COLORS", "style", "label_bars", "reference_line", "legend_outside", "pyplot"]

#: the colour of each role in every figure
COLORS = {"before": "#9e9e9e", "after": "#2b7bba", "oracle": "#d62728", "exact": "#2b7bba", "estimate": "#9e9e9e"}


def pyplot() -> Any:
    """``matplotlib.pyplot`` on a non-interactive backend outside notebooks; ``None`` without matplotlib."""
    try:
        import matplotlib
    except ImportError:  # the `plot` extra is not installed
        return None
    import sys

    if "ipykernel" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def style(ax: Any, *, title: str | None = None, xlabel: str | None = None, ylabel: str | None = None,
          grid: str = "y") -> Any:  # fmt: skip
    """Title, labels, a light grid on ``grid`` ("x", "y" or "") behind the data, no top/right frame."""
    if title:
        ax.set_title(title, fontsize=11)
    if xlabel is not None:
        ax.set_xlabel(xlabel)
    if ylabel is not None:
        ax.set_ylabel(ylabel)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if grid:
        ax.grid(axis=grid, color="#e0e0e0", linewidth=0.8)
        ax.set_axisbelow(True)
    return ax


def label_bars(ax: Any, fmt: str = "{:.2f}", *, fontsize: float = 7.5) -> None:
    """Write each bar's value at its end (vertical or horizontal bars)."""
    for container in ax.containers:
        if hasattr(container, "datavalues"):
            ax.bar_label(container, labels=[fmt.format(v) for v in container.datavalues], padding=2,
                         fontsize=fontsize)  # fmt: skip


def reference_line(ax: Any, value: float, label: str, *, color: str = COLORS["oracle"], vertical: bool = False) -> None:
    """A dashed line at ``value`` named in the legend (e.g. the oracle's accuracy)."""
    line = ax.axvline if vertical else ax.axhline
    line(value, color=color, linestyle="--", linewidth=1.2, label=f"{label} ({value:.2f})")


def legend_outside(ax: Any) -> None:
    """The legend right of the axes, clear of the data."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8.5)
