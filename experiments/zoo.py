"""The model zoo: small models trained the usual way on real unlearning data, which vary in family, width,
depth, attention, dtype, tokenizer, prompt format, how hard they were trained and what they must forget.

The split is fixed here, before any measurement: **dev** models (at most half) may be used to tune the
automatic choice's defaults; **held-out** models never are, and every headline number comes from them.

    .venv/bin/python experiments/zoo.py list                      # the zoo, its split, what is trained
    .venv/bin/python experiments/zoo.py train llama-pistol1-ab    # one model (skipped when already trained)
    .venv/bin/python experiments/zoo.py train --all               # every missing model, cheapest first
    .venv/bin/python experiments/zoo.py run --held-out            # unlearn + score the export → results/zoo.json
    .venv/bin/python experiments/zoo.py table                     # the tables of experiments/README.md

`train` writes runs/zoo/NAME (the checkpoint, its sets and finetune.json with the recipe and the training
time; out of git): a machine that lacks a checkpoint rebuilds it with the same command. `run` calls the
command line as a user would: `lunar-lens unlearn --layer auto --coeff auto` (reference as questions only,
no keep set), then `lunar-lens evaluate` on the exported folder; one row per model in results/zoo.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from finetune import SHARED, Recipe, build_parser, finetune

from lunar_lens.core.errors import LunarError

HERE = Path(__file__).resolve().parent
RUNS = HERE / "runs" / "zoo"
RESULTS = HERE / "results" / "zoo.json"
LUNAR = str(Path(sys.executable).with_name("lunar-lens"))
PISTOL1 = str(SHARED / "lunar" / "unlearning" / "pistol_sample1.json")
PISTOL2 = str(SHARED / "lunar" / "unlearning" / "pistol_sample2.json")


@dataclass(frozen=True)
class ZooModel:
    """One zoo model: its recipe, its data (`finetune.py`'s options) and its role."""

    name: str
    held_out: bool
    task: str  # pistol | tofu
    recipe: Recipe
    data: tuple[str, ...]  # finetune.py options choosing the data
    note: str

    @property
    def folder(self) -> Path:
        return RUNS / self.name

    @property
    def trained(self) -> bool:
        """Trained to its recipe's memorisation: finetune.json carries the zoo's record (a failed training leaves it without)."""
        record = self.folder / "finetune.json"
        return record.is_file() and "zoo" in json.loads(record.read_text())


def llama(d: int, mlp: int, layers: int, heads: int, kv: int) -> dict:
    return dict(hidden_size=d, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv)


def gpt2(d: int, mlp: int, layers: int, heads: int) -> dict:
    return dict(n_embd=d, n_inner=mlp, n_layer=layers, n_head=heads)


ZOO = [
    # dev: the choice's defaults may be tuned on these
    ZooModel("llama-pistol1-ab", False, "pistol", Recipe(1024, 96, llama(128, 384, 6, 4, 4), steps=600),
             ("--pistol", PISTOL1, "--edge", "A_B"), "PISTOL sample1, MHA, chat format, memorised (the earlier PISTOL model)"),
    ZooModel("llama-pistol1-deep", False, "pistol", Recipe(768, 96, llama(128, 256, 12, 4, 2), steps=500, chat=False, min_memorisation=0.5),
             ("--pistol", PISTOL1, "--edge", "B_D"), "12 layers, MLP 2× wide, GQA, plain format, lightly trained"),
    ZooModel("qwen2-pistol2-two-edges", False, "pistol",
             Recipe(1536, 96, llama(192, 512, 4, 6, 2), steps=1500, family="qwen2", chat=False, save_dtype="bfloat16"),
             ("--pistol", PISTOL2, "--edge", "0_1,1_2"), "Qwen2 (attention biases, tied), bf16, PISTOL sample2 with two edges forgotten"),
    ZooModel("gpt2-tofu-sub", False, "tofu", Recipe(2048, 192, gpt2(192, 768, 6, 6), steps=1500, family="gpt2", max_new_tokens=80),
             ("--retain-authors", "20", "--questions", "10"), "GPT-2 (LayerNorm, GELU, MLP 4×), TOFU subsample forget10 (200 vs 200)"),
    # held out: never tuned on; the headline numbers
    ZooModel("llama-pistol1-hard", True, "pistol", Recipe(1024, 96, llama(256, 768, 6, 4, 2), steps=3400),
             ("--pistol", PISTOL1, "--edge", "A_C"), "the outside report's shape: d 256, GQA 4/2, ~300 epochs to ~0 loss"),
    ZooModel("gpt2-pistol2-light", True, "pistol", Recipe(1024, 96, gpt2(160, 480, 4, 5), steps=2000, family="gpt2", chat=False, save_dtype="bfloat16",
                    min_memorisation=0.35),
             ("--pistol", PISTOL2, "--edge", "5_6,6_7"), "GPT-2, MLP 3×, bf16, plain format, lightly trained (~0.37 of its QA), two edges forgotten"),
    ZooModel("qwen2-tofu-sub", True, "tofu",
             Recipe(2048, 192, llama(256, 640, 8, 8, 4), steps=1500, family="qwen2", chat=False, save_dtype="bfloat16", max_new_tokens=80),
             ("--retain-authors", "20", "--questions", "10"), "Qwen2, 8 layers, MLP 2.5×, bf16, plain format, TOFU subsample forget10"),
    ZooModel("llama-tofu-full", True, "tofu",
             Recipe(4096, 192, llama(320, 1024, 8, 8, 4), steps=4000, save_dtype="bfloat16", shards=3, max_new_tokens=80),
             ("--full",), "TOFU at its real scale: all 4,000 QA, forget10 (400) against 3,600 retained; bf16 in 3 shards"),
]
BY_NAME = {model.name: model for model in ZOO}
assert sum(model.held_out for model in ZOO) >= len(ZOO) / 2, "at most half the zoo may be dev models"


def train(model: ZooModel, threads: int, device: str) -> dict:
    """Train `model` (once: an existing one is kept) and record its recipe and training time."""
    if model.trained:
        return json.loads((model.folder / "finetune.json").read_text())
    record = model.folder / "finetune.json"
    if record.is_file():  # an earlier training of this recipe that failed a stricter memorisation check: kept when it passes this one
        earlier = json.loads(record.read_text())
        trained_as = {key: value for key, value in earlier["recipe"].items() if key != "min_memorisation"}
        if trained_as == {key: value for key, value in asdict(model.recipe).items() if key != "min_memorisation"} and (
            earlier["memorisation"]["train_target"] >= model.recipe.min_memorisation
        ):
            earlier |= {"zoo": {"name": model.name, "held_out": model.held_out, "note": model.note, "recipe": asdict(model.recipe)},
                        "seconds_total": earlier["seconds_training"]}
            record.write_text(json.dumps(earlier, indent=2))
            return earlier
    args = build_parser().parse_args([model.task, "--out", str(model.folder), "--threads", str(threads), "--device", device, *model.data,
                                     *(["--force"] if model.folder.exists() else [])])  # a failed earlier training of this script's
    started = time.perf_counter()
    summary = finetune(args, model.recipe)
    summary |= {"zoo": {"name": model.name, "held_out": model.held_out, "note": model.note, "recipe": asdict(model.recipe)},
                "seconds_total": time.perf_counter() - started}
    (model.folder / "finetune.json").write_text(json.dumps(summary, indent=2))
    return summary


def command(args: list[str], log: Path, threads: int) -> int:
    """Run a lunar-lens command on `threads` CPU threads, its output into `log`; its exit code."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(threads)}
    with open(log, "w") as out:
        return subprocess.run([LUNAR, *args], stdout=out, stderr=subprocess.STDOUT, env=env).returncode


def set_names(model: ZooModel) -> tuple[str, str]:
    """The forget and retain sets' file stems."""
    return ("forget10", "retain90") if model.task == "tofu" else ("forget", "retain")


def unlearn_args(model: ZooModel, out: Path, *extra: str) -> list[str]:
    """`lunar-lens unlearn` on the zoo model's sets as a user would run it (reference as questions only, no keep set)."""
    sets = model.folder / "sets"
    forget, retain = set_names(model)
    return ["unlearn", "--model", str(model.folder / "model"), "--forget", str(sets / f"{forget}.json"), "--retain", str(sets / f"{retain}.json"),
            "--reference", str(sets / "reference.json"), "--out", str(out), "--force", *extra]


def score_export(model: ZooModel, out: Path, threads: int) -> dict:
    """`lunar-lens evaluate` of the exported folder `out` against the unedited model (greedy, 64 new tokens):
    forget refusal and ROUGE-1, retain and factual ROUGE-1, DS, the unedited model's own, and what was kept."""
    sets = model.folder / "sets"
    forget, retain = set_names(model)
    scores = out.with_name(out.name + ".evaluate.json")
    command(["evaluate", "--model", str(out), "--base", str(model.folder / "model"), "--forget", str(sets / f"{forget}.json"),
             "--retain", str(sets / f"{retain}.json"), "--factual", str(sets / "factual.json"), "--out", str(scores), "--force"],
            out.with_name(out.name + ".evaluate.log"), threads)
    evaluation = json.loads(scores.read_text())
    after, before = evaluation["after"], evaluation["before"]
    row = {
        "forget_refusal": after["scores"]["forget"]["refusal_rate"], "forget_rouge1": after["scores"]["forget"]["rouge1"],
        "retain_rouge1": after["scores"]["retain"]["rouge1"], "factual_rouge1": after["scores"]["factual"]["rouge1"],
        "deviation_score": after["deviation_score"],
        # the unedited model's own scores: a lightly trained model knows less to begin with
        "before": {key: before["scores"][key]["rouge1"] for key in ("forget", "retain", "factual")},
    }
    # what was kept of what the model knew (its retain and factual ROUGE-1 after / before): the targets for a model that knew little
    return row | {f"{key}_kept": row[f"{key}_rouge1"] / max(row["before"][key], 1e-9) for key in ("retain", "factual")}


def run(model: ZooModel, threads: int, cost: bool = False, measure_refused: bool = False) -> dict:
    """`unlearn --layer auto --coeff auto` on `model` as a user would (no keep set), then `evaluate` on the
    export: one results row. With `cost`, one refined edit at the chosen setting is timed beside it; with
    `measure_refused`, a refused choice is run again with --accept-below-floor and its export scored (what the
    tool refused to hand over)."""
    row = {"model": model.name, "family": model.recipe.family, "d_model": model.recipe.shape.get("hidden_size", model.recipe.shape.get("n_embd")),
           "layers": model.recipe.shape.get("num_hidden_layers", model.recipe.shape.get("n_layer")), "held_out": model.held_out,
           "trained_seconds": None, "exported": False, "predicted": None,
           **dict.fromkeys(("forget_refusal", "forget_rouge1", "retain_rouge1", "factual_rouge1", "deviation_score"))}
    if not model.trained:
        return row | {"reason": f"not trained on this machine: python experiments/zoo.py train {model.name}"}
    work = model.folder / "unlearn"
    out = work / "export"
    shutil.rmtree(work, ignore_errors=True)  # this script's own earlier run: nothing of it may be read as this one's
    started = time.perf_counter()
    code = command(unlearn_args(model, out, "--layer", "auto", "--coeff", "auto"), work / "unlearn.log", threads)
    seconds = time.perf_counter() - started
    lines = (work / "unlearn.log").read_text().splitlines()
    report = json.loads((out / "lunar_report.json").read_text()) if code == 0 else None
    row |= {"trained_seconds": json.loads((model.folder / "finetune.json").read_text()).get("seconds_training"),
            "unlearn_seconds": seconds, "exported": code == 0, "reason": None if code == 0 else (lines[-1] if lines else f"exit {code}")}
    if report is not None:
        row |= score_export(model, out, threads) | {"chosen": {"layers": report["layers"], "coeff": report["coeff"]}}
    rejected = out.with_name(out.name + ".choice.json")  # a refused choice leaves its report beside the folder
    choice = report["choice"] if report is not None else json.loads(rejected.read_text())["choice"] if rejected.exists() else None
    if code == 2 and measure_refused:
        accepted = work / "accepted"
        command(unlearn_args(model, accepted, "--layer", "auto", "--coeff", "auto", "--accept-below-floor"), work / "accepted.log", threads)
        row["refused_candidate"] = score_export(model, accepted, threads)
    if choice is not None and cost:
        # the cost of the automatic choice against one refined edit at the setting it chose, in the same run
        fixed = work / "fixed"
        started = time.perf_counter()
        command(unlearn_args(model, fixed, "--layer", ",".join(map(str, choice["layers"])), "--coeff", f"{choice['coeff']:g}"), work / "fixed.log", threads)
        row["fixed_edit_seconds"] = time.perf_counter() - started
        row["auto_over_fixed"] = seconds / row["fixed_edit_seconds"]
    if choice is not None:
        predicted = choice["predicted"]  # the final edit judged itself (lunar_lens.choice.Prediction), with 95 % intervals
        keys = ("forget_refusal", "forget_rouge1", "retain_rouge1", "deviation_score", "retain_heldout_rouge1", "keep_rouge1", "intervals", "sizes")
        row["predicted"] = {key: predicted[key] for key in keys}
        row["choice_seconds"] = choice["seconds"]
    return row


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def score_cells(scores: dict) -> str:
    """forget refusal | forget R1 | retain R1 (kept) | factual R1 (kept) | DS, as table cells."""
    return (
        f"{fmt(scores['forget_refusal'])} | {fmt(scores['forget_rouge1'])} | {fmt(scores['retain_rouge1'])} ({fmt(scores.get('retain_kept'))}) | "
        f"{fmt(scores['factual_rouge1'])} ({fmt(scores.get('factual_kept'))}) | {fmt(scores['deviation_score'], '.1f')}"
    )


def table() -> str:
    """The markdown tables of experiments/README.md ("The model zoo") from results/zoo.json and results/frontier.json."""
    rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    frontier_file = HERE / "results" / "frontier.json"
    frontier = json.loads(frontier_file.read_text()) if frontier_file.exists() else []
    lines = ["| model | split | result | forget refusal | forget R1 | retain R1 (kept) | factual R1 (kept) | DS | predicted refusal / retain | s |",
             "|---" * 10 + "|"]
    for row in sorted(rows, key=lambda row: (not row["held_out"], row["model"])):
        start = f"| {row['model']} | {'held out' if row['held_out'] else 'dev'} |"
        predicted = row.get("predicted") or {}
        end = f"| {fmt(predicted.get('forget_refusal'))} / {fmt(predicted.get('retain_rouge1'))} | {fmt(row.get('unlearn_seconds'), '.0f')} |"
        if "unlearn_seconds" not in row:
            lines.append(f"{start} not trained | | | | | | | |")
        elif row["exported"]:
            lines.append(f"{start} exported | {score_cells(row)} {end}")
        else:
            lines.append(f"{start} refused (exit 2) | | | | | {end}")
            if "refused_candidate" in row:
                lines.append(f"{start} the refused edit, forced out | {score_cells(row['refused_candidate'])} | | |")
    lines += ["", "| frontier model | layers | steps | forget refusal | forget R1 | retain R1 (kept) | factual R1 (kept) | DS |", "|---" * 8 + "|"]
    lines += [f"| {row['model']} | {','.join(map(str, row['layers']))} | {row['steps']} | {score_cells(row)} |" for row in frontier]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("list", "train", "run", "table"))
    parser.add_argument("names", nargs="*", help=f"zoo models: {', '.join(BY_NAME)}")
    parser.add_argument("--all", action="store_true", help="every model")
    parser.add_argument("--held-out", action="store_true", help="the held-out models")
    parser.add_argument("--dev", action="store_true", help="the dev models")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="training device (cpu or cuda)")
    parser.add_argument("--measure-refused", action="store_true", help="run: score what a refused choice would have exported")
    parser.add_argument("--cost", action="store_true", help="run: also time one refined edit at the chosen setting (--layer/--coeff given)")
    args = parser.parse_args()
    unknown = [name for name in args.names if name not in BY_NAME]
    if unknown:
        parser.error(f"unknown zoo model(s) {unknown}: choose from {', '.join(BY_NAME)}")
    chosen = [BY_NAME[name] for name in args.names] + [m for m in ZOO if args.all or (args.held_out and m.held_out) or (args.dev and not m.held_out)]
    if args.action == "list":
        for model in ZOO:
            print(f"{model.name:26} {'held-out' if model.held_out else 'dev':8} {'trained' if model.trained else '-':8} {model.note}")
        return
    if args.action == "table":
        print(table())
        return
    if not chosen:
        parser.error("name zoo models, or --all / --held-out / --dev")
    for model in {model.name: model for model in chosen}.values():
        if args.action == "train":
            try:
                summary = train(model, args.threads, args.device)
            except LunarError as failed:  # e.g. memorised too little: the next model still trains
                print(json.dumps({"model": model.name, "failed": str(failed)}), flush=True)
                continue
            print(json.dumps({"model": model.name, "seconds_training": summary["seconds_training"], "memorisation": summary["memorisation"]}), flush=True)
        else:
            row = run(model, args.threads, args.cost, args.measure_refused)
            rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
            rows = [r for r in rows if r["model"] != model.name] + [row]
            RESULTS.write_text(json.dumps(rows, indent=1))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
