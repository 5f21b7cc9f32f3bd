"""Exhaustive layer × coefficient sweep of the W_out edit on the toy world (or any model and sets),
against the automatic choice (`--layer auto --coeff auto`, `lunar_lens.choose.probes.localise`'s rule).

    .venv/bin/python experiments/sweep_layers.py [--entities 2] [--coeffs 1,2,3,4,6,8] [--retain-eval 192]
    .venv/bin/python experiments/sweep_layers.py --name pistol --model experiments/runs/pistol/model \
        --forget experiments/runs/pistol/sets/forget.json --retain experiments/runs/pistol/sets/retain.json \
        --reference experiments/runs/pistol/sets/reference.json --coeffs 2,4,6,8,12,16 --layer-sets '2,3;3,4;2,3,4'

For every layer and c: edit a freshly loaded model (default `EditSettings` otherwise, full retain set
kept), answer forget and retain questions greedily, and score ROUGE-1 recall and the Deviation Score.
Retain answers are scored on an evenly spread subsample (`--retain-eval`) to keep the run to minutes;
the edit itself keeps the whole retain set. Writes experiments/results/sweep_layers[_NAME].json and
figures/sweep_layers[_NAME].png, and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from lunar_lens.choose.figures import save_localisation
from lunar_lens.choose.probes import DEFAULT_COEFFS, LocaliseSettings, localise
from lunar_lens.core.figures import heatmap, new_figure, save
from lunar_lens.data.qa import check_disjoint, load_qa, spread
from lunar_lens.directions.mean_difference import compute_directions
from lunar_lens.directions.refusals import refusal_target
from lunar_lens.edit.layers import EditSettings, edit_layers
from lunar_lens.evaluate.sets import evaluate_sets
from lunar_lens.model.load import load_model
from lunar_lens.model.names import n_layers
from lunar_lens.toy.world import build_world, checkpoint_path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"


def evaluate_edit(model, forget, retain, reference, retain_eval, directions, layers: list[int], coeff: float) -> dict:
    """Edit a fresh copy of `model` at `layers` with c = `coeff` and score it."""
    bridge = load_model(model)
    edit_layers(bridge, forget, retain, reference, layers, replace(EditSettings(), coeff=coeff), directions=directions)
    evaluation = evaluate_sets(bridge, {"forget": forget, "retain": retain_eval}, model_metrics=False)
    scores = evaluation.scores
    return {
        "layer": layers[0] if len(layers) == 1 else layers,
        "coeff": coeff,
        "forget_rouge1": scores["forget"]["rouge1"],
        "retain_rouge1": scores["retain"]["rouge1"],
        "forget_refusal": scores["forget"]["refusal_rate"],
        "deviation_score": evaluation.deviation_score,
        "forget_sample": evaluation.samples["forget"][0]["answer"],
    }


def spearman(ranking: list[int], other: list[int]) -> float:
    """Spearman rank correlation of two orderings of the same layers."""
    n = len(ranking)
    gaps = sum((ranking.index(layer) - other.index(layer)) ** 2 for layer in ranking)
    return 1 - 6 * gaps / (n * (n * n - 1))


def plot(rows: list[dict], layers: list[int], coeffs: list[float], best: dict, auto: dict, title: str, path: Path) -> Path:
    figure, axes = new_figure(1, 3, panel=(4.6, 3.4))
    cell = {(r["layer"], r["coeff"]): r for r in rows}
    marks = {
        "best of the sweep": [(layers.index(best["layer"]), coeffs.index(best["coeff"]))],
        "automatic choice": [(layers.index(auto["layer"]), coeffs.index(auto["coeff"]))],
    }
    panels = [
        ("deviation_score", "Deviation Score (lower is better)", "DS", "viridis_r", "{:.1f}"),
        ("forget_rouge1", "Forget ROUGE-1 recall (lower is better)", "ROUGE-1 recall", "viridis_r", "{:.2f}"),
        ("retain_rouge1", "Retain ROUGE-1 recall (higher is better)", "ROUGE-1 recall", "viridis", "{:.3f}"),
    ]
    for ax, (key, title, label, cmap, fmt) in zip(axes[0], panels):
        values = [[cell[(layer, coeff)][key] for coeff in coeffs] for layer in layers]
        heatmap(ax, values, [str(layer) for layer in layers], [f"{c:g}" for c in coeffs], title=title,
                xlabel="coefficient c", ylabel="edited layer", colorbar=label, cmap=cmap, fmt=fmt, marks=marks)
    figure.suptitle(f"W_out edit on {title}, every layer × c (auto: layer {auto['layer']}, c = {auto['coeff']:g}, "
                    f"DS {auto['deviation_score']:.1f}; best DS {best['deviation_score']:.1f})")
    return save(figure, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entities", type=int, default=2, help="forget the first N entities of the world")
    parser.add_argument("--coeffs", default=",".join(f"{c:g}" for c in DEFAULT_COEFFS))
    parser.add_argument("--retain-eval", type=int, default=192, help="retain questions scored (evenly spread)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared)")
    parser.add_argument("--name", help="suffix of the output files (with --model and the three sets)")
    parser.add_argument("--model", help="model folder (default: the toy world's)")
    parser.add_argument("--layer-sets", type=lambda text: [[int(l) for l in group.split(",")] for group in text.split(";")], default=[],
                        help="also edit several layers at once, e.g. '2,3;3,4' (a table row per set × c; not plotted)")
    for name in ("forget", "retain", "reference"):
        parser.add_argument(f"--{name}", help=f"{name} set (with --model)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if args.model:
        if not (args.name and args.forget and args.retain and args.reference):
            parser.error("--model needs --name, --forget, --retain and --reference")
        model, title = args.model, args.name
        forget, reference = load_qa(args.forget), load_qa(args.reference)
        retain = check_disjoint(forget, load_qa(args.retain))
    else:
        world = build_world(0)
        forget, retain, reference = world.split(world.entities[: args.entities])
        model, title = checkpoint_path(), "the toy world"
    suffix = f"_{args.name}" if args.name else ""
    retain_eval = spread(retain, args.retain_eval)
    coeffs = [float(c) for c in args.coeffs.split(",")]

    bridge = load_model(model)
    layers = list(range(n_layers(bridge)))
    refusal = refusal_target(bridge, reference, EditSettings())
    directions = compute_directions(bridge, [qa.question for qa in forget], [qa.question for qa in reference], refusal=refusal)
    localisation = localise(bridge, forget, retain, reference, coeffs, settings=LocaliseSettings(figure_probes=True), directions=directions)
    auto_layers, auto_coeff = [localisation.best_layer], localisation.best_coeff
    save_localisation(localisation, RESULTS / f"sweep_layers{suffix}_localisation")
    seconds_localise = time.perf_counter() - started

    rows = []
    print("| layer | c | forget R1 | retain R1 | forget refusal | DS | first forget answer |\n|---|---|---|---|---|---|---|")
    for layer in layers:
        for coeff in coeffs:
            row = evaluate_edit(model, forget, retain, reference, retain_eval, directions, [layer], coeff)
            rows.append(row)
            print(f"| {layer} | {coeff:g} | {row['forget_rouge1']:.3f} | {row['retain_rouge1']:.3f} | {row['forget_refusal']:.2f} | "
                  f"{row['deviation_score']:.1f} | {row['forget_sample']!r} |", flush=True)
    multi_rows = [
        evaluate_edit(model, forget, retain, reference, retain_eval, directions, layer_set, coeff)
        for layer_set in args.layer_sets for coeff in coeffs
    ]
    for row in multi_rows:
        print(f"| {','.join(map(str, row['layer']))} | {row['coeff']:g} | {row['forget_rouge1']:.3f} | {row['retain_rouge1']:.3f} | "
              f"{row['forget_refusal']:.2f} | {row['deviation_score']:.1f} | {row['forget_sample']!r} |", flush=True)
    best = min(rows, key=lambda r: r["deviation_score"])
    best_per_layer = {layer: min(r["deviation_score"] for r in rows if r["layer"] == layer) for layer in layers}
    sweep_ranking = sorted(layers, key=best_per_layer.get)
    auto = next(r for r in rows if r["layer"] == auto_layers[0] and r["coeff"] == auto_coeff)
    gap = auto["deviation_score"] - best["deviation_score"]
    passed = gap <= max(2.0, 0.1 * best["deviation_score"])
    summary = {
        "best": best,
        "auto": auto,
        "auto_ranking": localisation.ranking,
        "probe_ranking": localisation.decision["probe_ranking"],
        "sweep_ranking": sweep_ranking,  # layers by their best DS over c
        "probe_vs_sweep_spearman": spearman(localisation.decision["probe_ranking"], sweep_ranking),
        "auto_vs_sweep_spearman": spearman(localisation.ranking, sweep_ranking),
        "gap": gap,
        "within_10_percent_or_2_points": passed,
        "seconds_localise": seconds_localise,
        "seconds_total": time.perf_counter() - started,
        "sizes": {"forget": len(forget), "retain_edit": len(retain), "retain_eval": len(retain_eval), "reference": len(reference)},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"sweep_layers{suffix}.json").write_text(json.dumps({"summary": summary, "rows": rows, "multi_layer_rows": multi_rows}, indent=2))
    plot(rows, layers, coeffs, best, auto, title, ROOT / "figures" / f"sweep_layers{suffix}.png")
    print(f"best: layer {best['layer']}, c = {best['coeff']:g}, DS {best['deviation_score']:.1f}; "
          f"auto: layer {auto['layer']}, c = {auto['coeff']:g}, DS {auto['deviation_score']:.1f} "
          f"(gap {gap:.1f}, {'within' if passed else 'NOT within'} 10% / 2 points); sweep ranking {sweep_ranking}, "
          f"auto ranking {localisation.ranking} (Spearman {summary['auto_vs_sweep_spearman']:.2f}); "
          f"localisation {seconds_localise:.0f} s, total {summary['seconds_total']:.0f} s")


if __name__ == "__main__":
    main()
