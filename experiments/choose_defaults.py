"""Measure the edit's design choices on the toy world: which forget positions are redirected, the
coefficient c, the ridge, and whether retain answers are kept — the numbers behind `EditSettings`'s
defaults.

    .venv/bin/python experiments/choose_defaults.py [--layers 1,2] [--entities 2]

Writes experiments/results/choose_defaults.json and prints a markdown table (forget / retain ROUGE-1
recall, forget refusal rate, Deviation Score) per setting.
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import replace
from pathlib import Path

import torch

from lunar_lens.directions.mean_difference import compute_directions
from lunar_lens.directions.refusals import model_refusal
from lunar_lens.edit.layers import EditSettings, edit_layers
from lunar_lens.edit.refine import RefineSettings
from lunar_lens.evaluate.sets import evaluate_sets
from lunar_lens.model.load import load_model
from lunar_lens.model.weights import w_out
from lunar_lens.toy.world import build_world, checkpoint_path

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="0,1,2,3")
    parser.add_argument("--entities", type=int, default=2)
    parser.add_argument("--positions", default="all,suffix,last,last+answer,question+answer")
    parser.add_argument("--coeffs", default="1,2,4,8")
    parser.add_argument("--retain-answers", default="true,false", help="keep retain answers as well as prompts")
    parser.add_argument("--retain-stride", type=int, default=3, help="evaluate every k-th retain question (all are kept by the edit)")
    args = parser.parse_args()
    world = build_world(0)
    forget, retain, reference = world.split(world.entities[: args.entities])
    bridge = load_model(checkpoint_path())
    refusal = model_refusal(bridge, reference).target  # the model's own most common refusal
    directions = compute_directions(bridge, [q.question for q in forget], [q.question for q in reference], refusal=refusal)
    originals = {layer: w_out(bridge, layer).detach().clone() for layer in range(bridge.cfg.n_layers)}
    sets = {"forget": forget, "retain": retain[:: args.retain_stride]}
    rows = []
    grid = itertools.product(
        [int(l) for l in args.layers.split(",")], args.positions.split(","), [float(c) for c in args.coeffs.split(",")],
        [flag == "true" for flag in args.retain_answers.split(",")],
    )
    for layer, positions, coeff, retain_answers in grid:
        settings = replace(EditSettings(refusal=refusal, refine=RefineSettings(steps=0)), positions=positions, coeff=coeff, retain_answers=retain_answers)
        result = edit_layers(bridge, forget, retain, reference, [layer], settings, directions=directions)
        evaluation = evaluate_sets(bridge, sets, model_metrics=False)
        with torch.no_grad():
            w_out(bridge, layer).copy_(originals[layer])  # undo the edit for the next setting
        row = {
            "layer": layer, "positions": positions, "coeff": coeff, "retain_answers": retain_answers,
            "forget_rouge1": evaluation.scores["forget"]["rouge1"], "retain_rouge1": evaluation.scores["retain"]["rouge1"],
            "forget_refusal": evaluation.scores["forget"]["refusal_rate"], "deviation_score": evaluation.deviation_score,
            "objective_after": result.layers[0].objective_after, "forget_samples": [s["answer"] for s in evaluation.samples["forget"][:3]],
        }
        rows.append(row)
        print(
            f"| {layer} | {positions:15s} | {coeff:4g} | {retain_answers!s:5s} | {row['forget_rouge1']:.3f} | "
            f"{row['retain_rouge1']:.3f} | {row['forget_refusal']:.2f} | {row['deviation_score']:.1f} | {row['forget_samples'][0]!r}",
            flush=True,
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "choose_defaults.json").write_text(json.dumps(rows, indent=2))
    best = min(rows, key=lambda r: (r["deviation_score"], -r["forget_refusal"]))
    print("best:", {k: best[k] for k in ("layer", "positions", "coeff", "retain_answers", "deviation_score", "forget_refusal")})


if __name__ == "__main__":
    main()
