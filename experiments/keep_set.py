"""Does a keep set protect knowledge the user did not list? `unlearn --layer auto --coeff auto` with and
without `--keep`, side by side, on the realistic models (finetune.py runs: varied refusals, reference as
questions only), and the released recipe's settings at the layers the keep run chose, each exported checkpoint
scored by `lunar-lens evaluate` (greedy).

The factual set (knowledge the model was trained on that neither forget nor retain names) is split by
position: the odd questions, **questions only**, are the keep set (the model's own answers fill them);
the even ones, never shown to the edit, are scored as "factual (held out)". Writes RUN/keep/* and
results/keep_set_TASK.json, and prints a markdown table.

    .venv/bin/python experiments/keep_set.py --run experiments/runs/tofu --forget forget10.json --retain retain10.json --name tofu_forget10
    .venv/bin/python experiments/keep_set.py --run experiments/runs/pistol --name pistol
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import real_data

from lunar_lens.data.qa import load_qa

HERE = Path(__file__).resolve().parent
VARIANTS = ("without", "with", "release")  # auto choice without / with --keep; the released settings at the latter's layers


def split_factual(factual: Path, folder: Path) -> tuple[Path, Path]:
    """(keep questions, held-out factual QA) files under `folder`: odd positions → keep, even → scored."""
    records = load_qa(factual, require_answers=True)
    keep, scored = folder / "keep.json", folder / "factual_heldout.json"
    keep.write_text(json.dumps([{"question": qa.question} for qa in records[1::2]], indent=0))
    scored.write_text(json.dumps([{"question": qa.question, "answer": qa.answer} for qa in records[::2]], indent=0))
    return keep, scored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    real_data.add_run_arguments(parser)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--table-only", action="store_true", help="print the table of every results/keep_set_*.json and stop")
    args = parser.parse_args()
    if args.table_only:
        print(table({path.stem.removeprefix("keep_set_"): json.loads(path.read_text())["rows"] for path in sorted((HERE / "results").glob("keep_set_*.json"))}))
        return
    run = Path(args.run)
    sets, folder = run / "sets", run / "keep" / args.name
    folder.mkdir(parents=True, exist_ok=True)
    keep, scored = split_factual(sets / "factual.json", folder)
    data = ["--forget", str(sets / args.forget), "--retain", str(sets / args.retain), "--reference", str(sets / "reference.json")]
    refusals = real_data.finetune.SHARED / "lunar" / "unlearning" / "refusal_response.txt"
    rows = {}
    for variant in VARIANTS:
        out = folder / variant
        flags = {
            "without": ["--layer", "auto", "--coeff", "auto"], "with": ["--keep", str(keep), "--layer", "auto", "--coeff", "auto"],
            "release": ["--layer", ",".join(map(str, rows.get("with", {}).get("layers", []))), *real_data.RELEASE_FLAGS],
        }[variant]
        seconds = real_data.lunar_lens(
            ["unlearn", "--model", str(run / "model"), *data, *flags, "--out", str(out), "--force"], folder / f"unlearn_{variant}.log", args.threads,
        )
        evaluation = folder / f"evaluate_{variant}.json"
        real_data.lunar_lens(
            ["evaluate", "--model", str(out), "--forget", str(sets / args.forget), "--retain", str(sets / args.retain),
             "--factual", str(scored), "--refusals", str(refusals), "--max-new-tokens", str(args.max_new_tokens),
             "--no-model-metrics", "--out", str(evaluation), "--force"],
            folder / f"evaluate_{variant}.log", args.threads,
        )
        report, scores = json.loads((out / "lunar_report.json").read_text()), json.loads(evaluation.read_text())["evaluation"]
        rows[variant] = {
            "layers": report["layers"], "coeff": report["coeff"], "seconds_unlearn": seconds,
            "predicted": (report["choice"] or {}).get("predicted"), "cells": (report["choice"] or {}).get("cells"),
            "forget_rouge1": real_data._score(scores, "forget", "rouge1"), "forget_refusal": real_data._score(scores, "forget", "refusal_rate"),
            "retain_rouge1": real_data._score(scores, "retain", "rouge1"), "factual_heldout_rouge1": real_data._score(scores, "factual", "rouge1"),
            "deviation_score": scores.get("deviation_score"),
        }
        print(json.dumps({variant: rows[variant]}, default=str), flush=True)
    result = HERE / "results" / f"keep_set_{args.name}.json"
    result.write_text(json.dumps({"run": str(run), "forget": args.forget, "retain": args.retain, "rows": rows}, indent=1))
    print(table({args.name: rows}))
    print(f"wrote {result}")


def table(results: dict[str, dict]) -> str:
    """One markdown row per request and edit (the exported checkpoints' scores, and the choice's prediction)."""
    lines = ["| request | edit | layers | c | forget refusal ↑ | forget ROUGE-1 ↓ | retain ROUGE-1 ↑ | factual (held out) ROUGE-1 ↑ | DS ↓ "
             "| predicted forget R1 / refusal / retain / keep |", "|---" * 10 + "|"]
    for name, rows in results.items():
        for variant, row in rows.items():
            predicted = row.get("predicted")
            guess = "–" if not predicted else " / ".join("–" if predicted[k] is None else f"{predicted[k]:.3f}"
                                                        for k in ("forget_rouge1", "forget_refusal", "retain_rouge1", "keep_rouge1"))
            edit = {"without": "auto, no keep set", "with": "auto, `--keep`", "release": "released settings"}[variant]
            lines.append(f"| {name} | {edit} | {','.join(map(str, row['layers']))} | {row['coeff']:g} | {row['forget_refusal']:.3f} | "
                         f"{row['forget_rouge1']:.3f} | {row['retain_rouge1']:.3f} | {row['factual_heldout_rouge1']:.3f} | "
                         f"{row['deviation_score']:.1f} | {guess} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
