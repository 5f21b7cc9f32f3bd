"""TOFU end to end: forget forget01 / forget05 / forget10 (the last 2 / 10 / 20 fictitious authors;
the rest of the trained authors retained) with lunar-lens (`unlearn --layer auto --coeff auto`) and with
the released recipe's settings at the same layer; evaluate, attack (TOFU's paraphrased questions for the
paraphrase attack), tables and figures (`experiments/real_data.py`).

    .venv/bin/python experiments/run_tofu.py                        # CPU: the subsample below
    .venv/bin/python experiments/run_tofu.py --full --steps 8500 --device cuda --run experiments/runs/tofu-full
                                                                    # every author and question (GPU)

Subsample (CPU, default): the 20 forget10 authors and the first 20 other authors, 10 of each author's 20
questions (`finetune.py --retain-authors 20 --questions 10`): forget01/05/10 hold 20 / 100 / 200 QA.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import real_data
from finetune import TOFU_FORGET_SPLITS


def paraphrases(source: Path, forget: Path, out: Path) -> Path:
    """TOFU's perturbed records (with `paraphrased_question`) of the questions in `forget`, written to `out`."""
    kept = {json.loads(line)["question"] for line in forget.read_text().splitlines() if line.strip()}
    records = [line for line in source.read_text().splitlines() if line.strip() and json.loads(line)["question"].strip() in kept]
    out.write_text("\n".join(records) + "\n")
    return out


def request(sets: Path, split: str) -> real_data.Request:
    """The split's request (files of RUN/sets): its forget set, the matching retain set, its paraphrases."""
    return real_data.Request(split, sets / f"{split}.json", sets / f"{split.replace('forget', 'retain')}.json", sets / f"{split}_paraphrased.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    real_data.add_arguments(parser, "tofu")
    parser.add_argument("--full", action="store_true", help="every TOFU author and question (fine-tuning included; meant for a GPU)")
    parser.add_argument("--steps", type=int, help="fine-tuning steps when the run folder has no model (default: the recipe's)")
    parser.add_argument("--splits", default=",".join(TOFU_FORGET_SPLITS), help="forget splits to run")
    args = parser.parse_args()
    flags = (["--full"] if args.full else []) + (["--steps", str(args.steps)] if args.steps else [])
    finetuned = real_data.ensure_model("tofu", args, flags)
    sets = Path(args.run) / "sets"
    results = {}
    for split in args.splits.split(","):
        this = request(sets, split)
        paraphrases(real_data.finetune.SHARED / "tofu" / f"{split}_perturbed.json", this.forget, this.paraphrases)
        results[split] = real_data.run_request(this, args)
    real_data.write_results("tofu", finetuned, results, args)


if __name__ == "__main__":
    main()
