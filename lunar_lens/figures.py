"""Figures as PNG files (matplotlib's object API, no GUI backend): generic helpers — a labelled
heatmap, a panel of lines over an axis — the figures built from them, and the localisation folder
(`save_localisation`: its JSON and figures)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

MARK_COLOURS = ("red", "deepskyblue", "orange")
Number = int | float

if TYPE_CHECKING:
    from lunar_lens.localise import Localisation


def new_figure(rows: int = 1, cols: int = 1, panel: tuple[float, float] = (4.8, 3.6)) -> tuple[Figure, np.ndarray]:
    """A figure of rows × cols panels (each `panel` inches) and its axes as a 2-D array."""
    figure = Figure(figsize=(panel[0] * cols, panel[1] * rows), layout="constrained")
    return figure, np.atleast_2d(figure.subplots(rows, cols, squeeze=False))


def save(figure: Figure, path: str | Path, dpi: int = 130, force: bool = False) -> Path:
    """Write `figure` as a PNG marked as lunar-lens's, atomically (`force` replaces an earlier one)."""
    from lunar_lens.outputs import FORMAT, atomic_output

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

def plot_layer_scores(loc: "Localisation", path: str | Path) -> Path:
    """Per-layer score curves of every probe (one line per coefficient), then the edit check of the
    best-ranked layers over the coefficient grid; the chosen layer and c are marked."""
    figure, axes = new_figure(3, 3)
    per_c = lambda scores: {f"c = {c:g}": scores[:, i].tolist() for i, c in enumerate(loc.coeffs)}  # noqa: E731
    per_layer = lambda scores: {f"layer {layer}": scores[i].tolist() for i, layer in enumerate(loc.edit_layers)}  # noqa: E731
    by_layer = dict(xlabel="layer", vline=(loc.best_layer, f"chosen layer {loc.best_layer}"))
    by_coeff = dict(xlabel="coefficient c", vline=(loc.best_coeff, f"chosen c = {loc.best_coeff:g}"))
    lines(axes[0, 0], loc.layers, per_c(loc.steer_refusal_rate.numpy()), title="Steering: forget refusal rate",
          ylabel="refusal rate of greedy answers", hline=(loc.baseline_refusal_rate, "no steering"), **by_layer)
    lines(axes[0, 1], loc.layers, per_c(loc.steer_forget_rouge1.numpy()), title="Steering: forget answer kept",
          ylabel="ROUGE-1 recall of the answer", hline=(loc.baseline_forget_rouge1, "no steering"), **by_layer)
    lines(axes[0, 2], loc.layers, per_c(loc.steer_logodds.numpy()), title="Steering: refusal vs answer log-odds",
          ylabel="log p(refusal) − log p(answer), nats/token", hline=(loc.baseline_logodds, "no steering"), **by_layer)
    lines(axes[1, 0], loc.layers, per_c(loc.steer_retain_kl.numpy()), title="Side effect of steering retain prompts",
          ylabel="KL(clean ‖ steered), nats/token", logy=True, **by_layer)
    lines(axes[1, 1], loc.layers, {"refusal log-prob drop (reference)": loc.ablation_drop.tolist(),
                                   "retain KL": loc.ablation_retain_kl.tolist()},
          title="Directional ablation of r_l", ylabel="nats per token", **by_layer)
    lines(axes[1, 2], loc.layers, {"last prompt token": loc.patching[:, -1].tolist(),
                                   "best position": loc.patching.max(dim=1).values.tolist()},
          title="Activation patching reference → forget", ylabel="recovered refusal logit difference", **by_layer)
    lines(axes[2, 0], loc.coeffs, per_layer(loc.edit_forget_rouge1.numpy()), title="Edit check: forget answer kept",
          ylabel="ROUGE-1 recall of the answer", **by_coeff)
    lines(axes[2, 1], loc.coeffs, per_layer(loc.edit_refusal_rate.numpy()), title="Edit check: forget refusal rate",
          ylabel="refusal rate of greedy answers", **by_coeff)
    budget = loc.settings.kl_budget
    lines(axes[2, 2], loc.coeffs, per_layer(loc.edit_retain_kl.numpy()), title="Edit check: retain side effect",
          ylabel="KL(clean ‖ edited), nats/token", hline=(budget, f"budget {budget:g}"), **by_coeff)
    figure.suptitle(f"Layer localisation: chosen layer {loc.best_layer}, c = {loc.best_coeff:g}, ranking {loc.ranking} "
                    f"(forget {loc.sizes['forget']}, retain {loc.sizes['retain']}, reference {loc.sizes['reference']} prompts)")
    return save(figure, path)


def plot_patching_map(loc: "Localisation", path: str | Path) -> Path:
    """The layer × position activation-patching map."""
    figure, axes = new_figure(1, 1, panel=(max(6.0, 0.6 * len(loc.patch_labels) + 2), 0.6 * len(loc.layers) + 2.2))
    heatmap(axes[0, 0], loc.patching.numpy(), [str(layer) for layer in loc.layers], loc.patch_labels,
            title="Activation patching: reference resid_post → forget run", xlabel="prompt position (from the end) and token",
            ylabel="layer", colorbar="recovered fraction of the refusal logit difference", cmap="RdBu_r", vmin=-1, vmax=1)
    return save(figure, path)


def plot_choice(summary: dict, path: str | Path) -> Path:
    """The automatic choice (`choice.Choice.summary()`): the screening proxy of every layer set × c (the
    candidates outlined) and each judged candidate's held-out generations."""
    sets = list(dict.fromkeys(tuple(row["layers"]) for row in summary["screening"]))
    coeffs = sorted({row["coeff"] for row in summary["screening"]})
    proxy = np.full((len(sets), len(coeffs)), np.nan)
    for row in summary["screening"]:
        proxy[sets.index(tuple(row["layers"])), coeffs.index(row["coeff"])] = row["proxy"]
    labels = [",".join(map(str, layer_set)) for layer_set in sets]
    screened = [sets.index(tuple(cell["layers"])) for cell in summary["cells"] if tuple(cell["layers"]) in sets]  # not behaviour-only sets beyond them
    judged = [(row, int(np.nanargmin(proxy[row]))) for row in dict.fromkeys(screened)]
    chosen = [cell for cell in judged if sets[cell[0]] == tuple(summary["layers"])][:1]
    figure, axes = new_figure(1, 2, panel=(5.2, max(3.6, 0.28 * len(sets))))
    heatmap(
        axes[0, 0], proxy, labels, [f"{c:g}" for c in coeffs], title="screening (held-out, teacher-forced)", xlabel="c",
        ylabel="layer set", colorbar="refusal loss + retain weight × retain rise", cmap="viridis_r", marks={"judged": judged, "chosen": chosen},
    )
    ax = axes[0, 1]
    names = [f"{','.join(map(str, cell['layers']))} c{cell['coeff']:g}" + (" refined" if cell["refined"] else "") for cell in summary["cells"]]
    bars = [("forget_refusal", "forget refusal ↑"), ("forget_rouge1", "forget ROUGE-1 ↓"), ("retain_rouge1", "retain ROUGE-1 ↑")]
    bars += [("keep_rouge1", "keep ROUGE-1 ↑")] if any(cell.get("keep_rouge1") is not None for cell in summary["cells"]) else []
    width, x = 0.8 / len(bars), np.arange(len(names))
    for offset, (key, label) in enumerate(bars):
        ax.bar(x + (offset - (len(bars) - 1) / 2) * width, [cell.get(key) or 0.0 for cell in summary["cells"]], width, label=label)
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_title("candidates, greedy answers to held-out questions")
    ax.legend(fontsize=7, loc="lower right")
    return save(figure, path)


def save_localisation(loc: Localisation | None, out_dir: str | Path, force: bool = False, choice: dict | None = None) -> dict[str, Path]:
    """Write `localisation.json` (every score, the ranking, the decision) and the two probe figures (when `loc`
    is given), and the automatic choice's figure (`choice`: `choice.Choice.summary()`), into the folder
    `out_dir`, atomically (`force` replaces an earlier lunar-lens output there)."""
    from lunar_lens.outputs import FORMAT, atomic_output, write_manifest

    names = {}
    with atomic_output(out_dir, folder=True, force=force) as tmp:
        if loc is not None:
            (tmp / "localisation.json").write_text(json.dumps(loc.to_json(), indent=2))
            plot_layer_scores(loc, tmp / "localisation_layers.png")
            plot_patching_map(loc, tmp / "localisation_patching.png")
            names |= {"json": "localisation.json", "layer_scores": "localisation_layers.png", "patching": "localisation_patching.png"}
        if choice is not None:
            plot_choice(choice, tmp / "choice.png")
            names["choice"] = "choice.png"
        write_manifest(tmp, {"format": f"{FORMAT} localisation 1"})
    return {kind: Path(out_dir) / name for kind, name in names.items()}
