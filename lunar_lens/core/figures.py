"""Figures as PNG files (matplotlib's object API, no GUI backend): a new figure, an atomic save, a labelled
heatmap and a panel of lines over an axis; each stage builds its figures from these."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

MARK_COLOURS = ("red", "deepskyblue", "orange")
Number = int | float


def new_figure(rows: int = 1, cols: int = 1, panel: tuple[float, float] = (4.8, 3.6)) -> tuple[Figure, np.ndarray]:
    """A figure of rows × cols panels (each `panel` inches) and its axes as a 2-D array."""
    figure = Figure(figsize=(panel[0] * cols, panel[1] * rows), layout="constrained")
    return figure, np.atleast_2d(figure.subplots(rows, cols, squeeze=False))


def save(figure: Figure, path: str | Path, dpi: int = 130, force: bool = False) -> Path:
    """Write `figure` as a PNG marked as lunar-lens's, atomically (`force` replaces an earlier one)."""
    from lunar_lens.core.atomic import FORMAT, atomic_output

    with atomic_output(path, folder=False, force=force, parameter="figure") as tmp:
        figure.savefig(tmp, dpi=dpi, format="png", metadata={"Software": FORMAT})
    return Path(path)


def heatmap(
    ax: Axes,
    values: np.ndarray | Sequence[Sequence[Number]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    colorbar: str,
    cmap: str = "viridis",
    fmt: str = "{:.2f}",
    marks: dict[str, Sequence[tuple[int, int]]] | None = None,
    vmin: Number | None = None,
    vmax: Number | None = None,
) -> None:
    """`values[row, col]` as coloured cells with their numbers written in, rows top to bottom;
    `marks` maps a legend label to the (row, col) cells it outlines (one colour per label)."""
    values = np.asarray(values, dtype=float)
    image = ax.imshow(values, cmap=cmap, aspect="auto", vmin=vmin, vmax=vmax)
    ax.figure.colorbar(image, ax=ax, label=colorbar)
    long_labels = max(map(len, col_labels)) > 4
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=40 if long_labels else 0, ha="right" if long_labels else "center")
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if values.size <= 200:
        for (row, col), value in np.ndenumerate(values):
            red, green, blue, _ = image.cmap(image.norm(value))
            colour = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"
            ax.text(col, row, fmt.format(value), ha="center", va="center", fontsize=7, color=colour)
    for (label, cells), colour, width in zip((marks or {}).items(), MARK_COLOURS, (4.0, 2.0, 1.5)):
        for number, (row, col) in enumerate(cells):
            box = Rectangle((col - 0.45, row - 0.45), 0.9, 0.9, fill=False, edgecolor=colour, linewidth=width)
            box.set_label(label if number == 0 else None)
            ax.add_patch(box)
    if marks:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=len(marks), fontsize=7, frameon=False)


def lines(
    ax: Axes,
    x: Sequence[Number],
    series: dict[str, Sequence[Number]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    hline: tuple[Number, str] | None = None,
    vline: tuple[Number, str] | None = None,
    logy: bool = False,
) -> None:
    """One line with markers per entry of `series` over `x`, optional labelled reference lines."""
    for label, values in series.items():
        ax.plot(x, values, marker="o", label=label)
    if hline is not None:
        ax.axhline(hline[0], color="grey", linestyle=":", label=hline[1])
    if vline is not None:
        ax.axvline(vline[0], color="red", linestyle="--", alpha=0.6, label=vline[1])
    if logy:
        ax.set_yscale("log")
    ax.set_xticks(list(x))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


# ---------------------------------------------------------------- localisation

