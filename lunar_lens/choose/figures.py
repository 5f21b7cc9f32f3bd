"""The choice's and the probes' figures (layer scores, patching map, the choice's screening and candidates) and
the localisation folder (`save_localisation`: its JSON and figures)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lunar_lens.core.figures import heatmap, lines, new_figure, save

if TYPE_CHECKING:
    from lunar_lens.choose.probes import Localisation


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
    from lunar_lens.core.atomic import FORMAT, atomic_output, write_manifest

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
