"""TOFU end to end: forget forget01 / forget05 / forget10 (the last 2 / 10 / 20 fictitious authors;
the rest of the trained authors retained) with lunar-lens (`unlearn --layer auto --coeff auto`) and with
the released recipe's settings at the same layer; evaluate, attack (TOFU's paraphrased questions for the
paraphrase attack), tables and figures (`experiments/real_data.py`).

`evaluate` also reports TOFU's own metrics: the forget and retain sets carry TOFU's paraphrased and
perturbed answers (RUN/sets/*_perturbed.json), the factual sets are its real_authors / world_facts
perturbed files, and each split's retain model (RUN/retain_model_SPLIT: `finetune.py --without SPLIT`,
trained when missing, as long as the model itself) gives forget quality.

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

TOFU = real_data.finetune.SHARED / "tofu"


def perturbed(kept: Path) -> Path:
    """Where `with_perturbed` writes a set file's copy: NAME_perturbed.json beside it."""
    return kept.with_name(f"{kept.stem}_perturbed.json")


def with_perturbed(kept: Path) -> Path:
    """The records of `kept`, each with the fields of TOFU's perturbed record of the same question where
    one exists (paraphrased_question, paraphrased_answer, perturbed_answer), written to `perturbed(kept)`."""
    tofu = [record for source in sorted(TOFU.glob("*_perturbed.json")) for record in json_lines(source)]
    by_question = {record["question"].strip(): record for record in tofu}
    out = perturbed(kept)
    out.write_text("".join(json.dumps(by_question.get(record["question"], {}) | record) + "\n" for record in json_lines(kept)))
    return out


def json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def retain_model_run(run: Path, split: str) -> Path:
    """The run folder of the split's retain model (TOFU's: trained on every question but the split's)."""
    return run / f"retain_model_{split}"


def request(sets: Path, split: str, retain_model: bool = True) -> real_data.Request:
    """The split's request (files of RUN/sets): its forget set, the matching retain set, its paraphrases, and
    what `evaluate` scores (both sets with TOFU's perturbed answers, real authors, world facts, the retain model)."""
    forget, retain = sets / f"{split}.json", sets / f"{split.replace('forget', 'retain')}.json"
    evaluation = [
        "--forget", str(perturbed(forget)), "--retain", str(perturbed(retain)),
        "--factual", str(TOFU / "real_authors_perturbed.json"), "--factual", str(TOFU / "world_facts_perturbed.json"),
    ] + (["--retain-model", str(retain_model_run(sets.parent, split) / "model")] if retain_model else [])
    return real_data.Request(split, forget, retain, perturbed(forget), evaluation)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    real_data.add_arguments(parser, "tofu")
    parser.add_argument("--full", action="store_true", help="every TOFU author and question (fine-tuning included; meant for a GPU)")
    parser.add_argument("--steps", type=int, help="fine-tuning steps when the run folder has no model (default: the recipe's)")
    parser.add_argument("--splits", default=",".join(TOFU_FORGET_SPLITS), help="forget splits to run")
    parser.add_argument("--no-retain-model", action="store_true", help="skip each split's retain model (and so forget quality)")
    args = parser.parse_args()
    flags = (["--full"] if args.full else []) + (["--steps", str(args.steps)] if args.steps else [])
    finetuned = real_data.ensure_model("tofu", args, flags)
    sets = Path(args.run) / "sets"
    results = {}
    for split in args.splits.split(","):
        this = request(sets, split, retain_model=not args.no_retain_model)
        for kept in (this.forget, this.retain):
            with_perturbed(kept)
        if not args.no_retain_model:
            retain_model = argparse.Namespace(**vars(args) | {"run": str(retain_model_run(Path(args.run), split))})
            real_data.ensure_model("tofu", retain_model, [*flags, "--without", split])
        results[split] = real_data.run_request(this, args)
    real_data.write_results("tofu", finetuned, results, args)


if __name__ == "__main__":
    main()
