"""Two forget requests in a row on the toy world: where should the second request's directions come from?

    .venv/bin/python experiments/sequential_requests.py

Request 1 forgets the first entity at layer 0 (the second entity is in its retain set); request 2 forgets
the second entity at layer 1, keeping request 1's questions forgotten. Request 2's directions are read
either from the already-edited model or from the unedited base (what `lunar_lens.unlearn` does). Prints
refusal rate and ROUGE-1 recall per set; writes results/sequential_requests.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lunar_lens.directions.mean_difference import directions_for
from lunar_lens.edit.layers import EditSettings, edit_layers
from lunar_lens.evaluate.sets import evaluate_sets
from lunar_lens.model.load import load_model
from lunar_lens.toy.world import build_world, checkpoint_path


def main() -> None:
    torch.set_num_threads(1)
    world = build_world(0)
    first, second = (world.facts_about(name) for name in world.entities[:2])
    retain = [qa for name in world.entities[2:] for qa in world.facts_about(name)][::4]
    reference = world.unknown_train_qa[::4]
    settings = EditSettings(coeff=6.0)
    base_directions = directions_for(load_model(checkpoint_path()), second, reference, settings)
    rows = {}
    for source in ("edited model", "unedited base"):
        bridge = load_model(checkpoint_path())
        edit_layers(bridge, first, second + retain, reference, [0], settings)
        directions = base_directions if source == "unedited base" else None
        edit_layers(bridge, second, retain, reference, [1], settings, directions, keep_forgotten=first)
        scores = evaluate_sets(bridge, {"first": first, "second": second, "retain": retain[::3]}, model_metrics=False, max_new_tokens=16).scores
        rows[source] = {name: {"refusal_rate": s["refusal_rate"], "rouge1": s["rouge1"]} for name, s in scores.items()}
        print(f"directions from the {source}: "
              + ", ".join(f"{n} refusal {s['refusal_rate']:.2f} / ROUGE-1 {s['rouge1']:.2f}" for n, s in rows[source].items()))
    out = Path(__file__).parent / "results" / "sequential_requests.json"
    out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
