"""What the automatic choice costs: `unlearn` with `--layer auto --coeff auto` against `unlearn` at the
setting it chose (one edit: the same refusal, directions, statistics and refinement), side by side in one
run, each repeated; in-memory (no export), one torch thread. Writes results/bench_choice_NAME.json.

    .venv/bin/python experiments/bench_choice.py --run experiments/runs/tofu --forget forget10.json --retain retain10.json --name tofu
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import real_data
import torch

from lunar_lens.core.settings import RunSettings
from lunar_lens.data.qa import load_qa
from lunar_lens.edit.layers import EditSettings
from lunar_lens.model.load import load_model
from lunar_lens.pipeline.unlearn import unlearn

HERE = Path(__file__).resolve().parent


def timed(run: Path, sets: dict, layers: list[int] | None = None, coeff: float | None = None) -> tuple[float, dict]:
    bridge = load_model(run / "model")  # a fresh model each time: unlearn edits in place
    started = time.perf_counter()
    outcome = unlearn(
        bridge, sets["forget"], sets["retain"], sets["reference"], layers=layers, settings=EditSettings(coeff=coeff), run=RunSettings(progress=False)
    )
    return time.perf_counter() - started, outcome.report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    real_data.add_run_arguments(parser)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run = Path(args.run)
    sets = {name: load_qa(run / "sets" / file) for name, file in (("forget", args.forget), ("retain", args.retain), ("reference", "reference.json"))}
    rows = []
    for repeat in range(args.repeats):
        auto_seconds, report = timed(run, sets)
        one_seconds, _ = timed(run, sets, layers=report["layers"], coeff=report["coeff"])
        rows.append({"repeat": repeat, "auto_s": auto_seconds, "one_edit_s": one_seconds, "ratio": auto_seconds / one_seconds,
                     "layers": report["layers"], "coeff": report["coeff"], "auto_timings": report["timings_s"]})
        print(json.dumps(rows[-1]), flush=True)
    summary = {"median_ratio": statistics.median(row["ratio"] for row in rows), "rows": rows}
    out = HERE / "results" / f"bench_choice_{args.name}.json"
    out.write_text(json.dumps(summary, indent=1))
    print(f"median auto / one edit: {summary['median_ratio']:.2f}x; wrote {out}")


if __name__ == "__main__":
    main()
