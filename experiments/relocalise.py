"""Re-run `--layer auto --coeff auto`'s localisation (with the figure probes, as `unlearn --localisation`
does) on the real-data runs of `run_pistol.py` / `run_tofu.py`, and compare it with the localisation.json
each run stored: the same choice and ranking, and the largest difference per score. It checks that a change
to `lunar_lens.localise` (a speed-up, say) moves no decision on real data.

    .venv/bin/python experiments/relocalise.py [--runs experiments/runs] [--threads 1]

Requests whose run folder is missing are skipped. Writes experiments/results/relocalise.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import run_pistol
import run_tofu
import torch
from finetune import TOFU_FORGET_SPLITS
from real_data import Request

from lunar_lens.choose.probes import LocaliseSettings, localise
from lunar_lens.data.qa import check_disjoint, load_qa
from lunar_lens.model.load import load_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results" / "relocalise.json"
SCORES = ("steer_logodds", "steer_retain_kl", "steer_refusal_rate", "steer_forget_rouge1", "ablation_drop", "patching",
          "edit_forget_rouge1", "edit_refusal_rate", "edit_retain_kl", "direction_norms")


def requests(runs: Path) -> list[tuple[Path, Request]]:
    """(run folder, request) of every request `run_pistol.py` and `run_tofu.py` make."""
    pistol, tofu = runs / "pistol", runs / "tofu"
    return [(pistol, run_pistol.request(pistol / "sets"))] + [(tofu, run_tofu.request(tofu / "sets", s)) for s in TOFU_FORGET_SPLITS]


def relocalise(run: Path, request: Request) -> dict:
    stored = json.loads((run / request.name / "localise" / "localisation.json").read_text())
    forget, retain, reference = (load_qa(path) for path in (request.forget, request.retain, run / "sets" / "reference.json"))
    bridge = load_model(run / "model")
    started = time.perf_counter()
    loc = localise(bridge, forget, check_disjoint(forget, retain), reference, settings=LocaliseSettings(figure_probes=True))
    seconds = time.perf_counter() - started
    new = loc.to_json()
    differences = {key: float((torch.tensor(stored[key], dtype=torch.float64) - torch.tensor(new[key], dtype=torch.float64)).abs().max())
                   for key in SCORES}
    return {"seconds": seconds, "stored": [stored["best_layer"], stored["best_coeff"], stored["ranking"]],
            "new": [new["best_layer"], new["best_coeff"], new["ranking"]], "max_abs_difference": differences}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=str(ROOT / "experiments" / "runs"), help="folder holding the pistol/ and tofu/ runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for run, request in requests(Path(args.runs)):
        name = f"{run.name}/{request.name}"
        if not (run / request.name / "localise" / "localisation.json").exists():
            print(f"skipped {name}: no stored localisation under {run} (run experiments/run_{run.name}.py first)")
            continue
        results[name] = relocalise(run, request)
    if not results:
        raise SystemExit("no stored real-data run to compare with")
    RESULTS.write_text(json.dumps(results, indent=2))
    print("\n| request | stored (layer, c, ranking) | now | same | largest score difference | seconds now |\n|---|---|---|---|---|---|")
    for name, result in results.items():
        worst = max(result["max_abs_difference"].items(), key=lambda item: item[1])
        print(f"| {name} | {result['stored']} | {result['new']} | {result['stored'] == result['new']} | {worst[1]:.1e} ({worst[0]}) "
              f"| {result['seconds']:.1f} |")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
