"""The frontier of each zoo model: the best W_out-only edit found by long training on behaviour, beside the
tool's automatic result. W_out is trained from ΔW = 0 (c = 0, refinement only, no early stop: a fixed number
of Adam steps) towards the model's own refusal on the forget questions and the given answers on the retain
questions, at one layer (the best single layer of the automatic choice's screening) and at every layer; each
edit is exported and scored as experiments/zoo.py scores the tool's (greedy, 64 new tokens, no keep set).

    .venv/bin/python experiments/frontier.py gpt2-pistol2-light             # after zoo.py train and zoo.py run
    .venv/bin/python experiments/frontier.py gpt2-pistol2-light --steps 300 --lr 3e-3

One row per model and layer set in results/frontier.json (experiments/README.md, "The model zoo").
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from zoo import BY_NAME, HERE, score_export, set_names

from lunar_lens.core.settings import RunSettings
from lunar_lens.edit.layers import EditSettings
from lunar_lens.edit.refine import RefineSettings
from lunar_lens.pipeline.unlearn import unlearn

RESULTS = HERE / "results" / "frontier.json"


def best_single_layer(name: str) -> int | None:
    """The single layer the zoo run's screening ranked first (its choice report), if there is one."""
    folder = BY_NAME[name].folder / "unlearn"
    for path in (folder / "export" / "lunar_report.json", folder / "export.choice.json"):
        if path.exists():
            rows = [row for row in json.loads(path.read_text())["choice"]["screening"] if len(row["layers"]) == 1]
            return min(rows, key=lambda row: row["proxy"])["layers"][0] if rows else None
    return None


def frontier(name: str, steps: int, lr: float, threads: int) -> list[dict]:
    model = BY_NAME[name]
    sets, work = model.folder / "sets", model.folder / "frontier"
    forget, retain = set_names(model)
    depth = model.recipe.shape.get("num_hidden_layers", model.recipe.shape.get("n_layer"))
    single = best_single_layer(name)
    rows = []
    for layers in ([single if single is not None else depth // 2], list(range(depth))):
        out = work / ("layers-" + "-".join(map(str, layers)))
        settings = EditSettings(coeff=0.0, unlisted=0, refine=RefineSettings(steps=steps, lr=lr, check_every=0))
        started = time.perf_counter()
        outcome = unlearn(str(model.folder / "model"), str(sets / f"{forget}.json"), str(sets / f"{retain}.json"), str(sets / "reference.json"),
                          out, layers, settings, RunSettings(force=True, progress=False))
        seconds = time.perf_counter() - started
        assert [layer["layer"] for layer in outcome.report["edit"]["layers"]] == layers
        row = {"model": name, "held_out": model.held_out, "layers": layers, "steps": steps, "lr": lr, "seconds": seconds} | score_export(model, out, threads)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+", help=f"zoo models: {', '.join(BY_NAME)}")
    parser.add_argument("--steps", type=int, default=300, help="Adam steps (no early stop)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    unknown = [name for name in args.names if name not in BY_NAME or not BY_NAME[name].trained]
    if unknown:
        parser.error(f"not a trained zoo model: {unknown} (python experiments/zoo.py list)")
    torch.set_num_threads(args.threads)
    for name in args.names:
        rows = frontier(name, args.steps, args.lr, args.threads)
        kept = [row for row in (json.loads(RESULTS.read_text()) if RESULTS.exists() else []) if row["model"] != name]
        RESULTS.write_text(json.dumps(kept + rows, indent=1))


if __name__ == "__main__":
    main()
