"""What run_tofu.py and run_pistol.py share: fine-tune the model when the run folder has none, then for
each forget request run, through the `lunar-lens` command line,

1. `unlearn --layer auto --coeff auto --localisation DIR` (lunar-lens; DIR gets the layer-profile figure);
2. `unlearn` with the released recipe's settings at the same layer: every forget position shifted,
   c = 2, AdamW, retain prompts without their answers (`--positions all --coeff 2 --solver adamw
   --no-retain-answers`);
3. `evaluate` (forget / retain / factual ROUGE-1, refusal rate, DS, MRR, before → after; on TOFU also
   its forget quality, model utility and forget truth ratio) and `attack` on both edited models;

and write the markdown tables (experiments/results/TASK.md, .json) and figures (figures/TASK_*.png).
Every command's output is logged under RUN/REQUEST/*.log.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import finetune  # noqa: E402

METHODS = {"lunar-lens": "lunar-lens (auto layer, auto c)", "release": "released settings (all positions, c = 2, AdamW)"}
RELEASE_FLAGS = ["--coeff", "2", "--positions", "all", "--solver", "adamw", "--no-retain-answers", "--refine-steps", "0"]
ATTACKS = ("layer_skip", "reverse_direction", "abliteration", "quantise_int8", "quantise_int4", "paraphrase", "prefix_injection")


@dataclass
class Request:
    """One unlearning request: set files under RUN/sets (paraphrases: TOFU's perturbed questions);
    `evaluation`: `evaluate`'s set flags when they are not --forget, --retain and RUN/sets/factual.json
    (TOFU: its perturbed records, real authors, world facts and the split's retain model)."""

    name: str
    forget: Path
    retain: Path
    paraphrases: Path | None = None
    evaluation: list[str] | None = None


def add_arguments(parser: argparse.ArgumentParser, task: str) -> None:
    parser.add_argument("--run", default=str(ROOT / "experiments" / "runs" / task), help="run folder (model, sets, outputs)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per command")
    parser.add_argument("--device", default="cpu", help="cpu or cuda, for every command")
    parser.add_argument("--max-new-tokens", type=int, default=finetune.RECIPES[task].max_new_tokens)
    parser.add_argument("--results", default=str(ROOT / "experiments" / "results" / f"{task}.md"), help="markdown tables to write")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """A finetune.py run folder, the request's set files in its sets/, and a name for the results."""
    parser.add_argument("--run", required=True, help="a finetune.py run folder (model/, sets/)")
    parser.add_argument("--forget", default="forget.json")
    parser.add_argument("--retain", default="retain.json")
    parser.add_argument("--name", required=True)


def ensure_model(task: str, args: argparse.Namespace, finetune_flags: list[str]) -> dict:
    """RUN/finetune.json, training the model first when RUN/model is missing."""
    run = Path(args.run)
    options = finetune.build_parser().parse_args([task, "--out", str(run), "--threads", str(args.threads), "--device", args.device, *finetune_flags])
    if not (run / "model").exists():
        finetune.finetune(options)
    finetuned = json.loads((run / "finetune.json").read_text())
    wanted = finetune.data_options(options)
    if finetuned.get("data", wanted) != wanted:
        raise SystemExit(f"{run} holds a model trained on other data ({finetuned['data']}, wanted {wanted}): pass another --run")
    return finetuned


def lunar_lens(arguments: list[str], log: Path, threads: int) -> float:
    """Run `python -m lunar_lens ARGUMENTS` (its output to `log`); seconds taken."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    started = time.perf_counter()
    with log.open("w") as handle:
        done = subprocess.run([sys.executable, "-m", "lunar_lens", *arguments], stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"lunar-lens {arguments[0]} failed (exit {done.returncode}); its output:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - started


def run_request(request: Request, args: argparse.Namespace) -> dict:
    """Localise, unlearn (lunar-lens and the released settings), evaluate and attack one request."""
    run = Path(args.run)
    sets, base, out = run / "sets", run / "model", run / request.name
    out.mkdir(parents=True, exist_ok=True)
    refusals = finetune.SHARED / "lunar" / "unlearning" / "refusal_response.txt"
    data = ["--forget", str(request.forget), "--retain", str(request.retain), "--reference", str(sets / "reference.json")]
    common = ["--device", args.device]
    seconds = {"lunar-lens": lunar_lens(
        ["unlearn", "--model", str(base), *data, "--out", str(out / "lunar-lens"), "--layer", "auto", "--coeff", "auto",
         "--localisation", str(out / "localise"), "--force", *common],
        out / "unlearn_lunar-lens.log", args.threads,
    )}
    report = json.loads((out / "lunar-lens" / "lunar_report.json").read_text())
    layer = ",".join(str(layer) for layer in report["layers"])
    seconds["release"] = lunar_lens(
        ["unlearn", "--model", str(base), *data, "--out", str(out / "release"), "--layer", layer, *RELEASE_FLAGS, "--force", *common],
        out / "unlearn_release.log", args.threads,
    )
    results = {"layers": report["layers"], "coeff": report["coeff"], "seconds_cli": seconds, "methods": {}, "choice": report["choice"],
               "refusal": report["refusal"]}
    for method in METHODS:
        model = out / method
        edit = json.loads((model / "lunar_report.json").read_text())
        evaluation, attacks = out / f"evaluate_{method}.json", out / f"attacks_{method}.json"
        scored = request.evaluation or ["--forget", str(request.forget), "--retain", str(request.retain), "--factual", str(sets / "factual.json")]
        lunar_lens(
            ["evaluate", "--model", str(model), "--base", str(base), *scored, "--refusals", str(refusals),
             "--max-new-tokens", str(args.max_new_tokens), "--out", str(evaluation), "--force", *common],
            out / f"evaluate_{method}.log", args.threads,
        )
        paraphrases = ["--paraphrases", str(request.paraphrases)] if request.paraphrases else []
        lunar_lens(
            ["attack", "--model", str(model), "--base", str(base), *data, *paraphrases, "--refusals", str(refusals),
             "--max-new-tokens", str(args.max_new_tokens), "--out", str(attacks), "--force", *common],
            out / f"attacks_{method}.log", args.threads,
        )
        results["methods"][method] = {
            "coeff": edit["coeff"],
            "seconds_edit": edit["timings_s"].get("edit"),
            "seconds_localise": edit["timings_s"].get("directions", 0) + edit["timings_s"].get("localise", 0),  # as before: both
            "evaluation": json.loads(evaluation.read_text()),
            "attacks": json.loads(attacks.read_text())["attacks"],
        }
    return results


# ---------------------------------------------------------------- tables and figures

def _score(evaluation: dict, name: str, key: str) -> float | None:
    """A set's mean `key`; "factual" is every set but forget and retain, weighted by size (one factual set,
    or TOFU's real_authors and world_facts)."""
    scores, sizes = evaluation.get("scores", {}), evaluation.get("sizes", {})
    names = [n for n in scores if n not in ("forget", "retain")] if name == "factual" else [name]
    names = [n for n in names if key in scores.get(n, {})]
    return sum(scores[n][key] * sizes[n] for n in names) / sum(sizes[n] for n in names) if names else None


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "–" if value is None else f"{value:{spec}}"


# TOFU's metrics (open-unlearning's names) -> column, when the evaluations have them
TOFU_COLUMNS = {"forget_quality": "forget quality ↑", "model_utility": "model utility ↑", "forget_truth_ratio": "forget truth ratio ↑"}


def results_table(results: dict[str, dict]) -> str:
    """One row per request × (base, lunar-lens, released settings)."""
    rows = []
    for name, result in results.items():
        first = result["methods"]["lunar-lens"]["evaluation"]["before"]
        rows += [(name, "base (fine-tuned)", "–", "–", first)] + [
            (name, method, ",".join(map(str, result["layers"])), f"{entry['coeff']:g}", entry["evaluation"]["after"])
            for method, entry in result["methods"].items()
        ]
    tofu = [key for key in TOFU_COLUMNS if any(key in row[-1].get("tofu", {}) for row in rows)]
    header = ("| request | model | layer | c | forget ROUGE-1 ↓ | forget refusal ↑ | retain ROUGE-1 ↑ | factual ROUGE-1 ↑ | forget MRR | DS ↓ "
              "| DS (ROUGE-L) ↓ |"
              + "".join(f" {TOFU_COLUMNS[key]} |" for key in tofu))
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for name, model, layer, coeff, evaluation in rows:
        cells = [_score(evaluation, "forget", "rouge1"), _score(evaluation, "forget", "refusal_rate"), _score(evaluation, "retain", "rouge1"),
                 _score(evaluation, "factual", "rouge1"), _score(evaluation, "forget", "mrr")]
        cells = [_fmt(value) for value in cells] + [_fmt(evaluation.get(key), ".1f") for key in ("deviation_score", "deviation_score_rougeL")]
        cells += [_fmt(evaluation.get("tofu", {}).get(key), ".3g" if key == "forget_quality" else ".3f") for key in tofu]  # p-values: significant digits
        lines.append(f"| {name} | {model} | {layer} | {coeff} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def prediction_table(results: dict[str, dict]) -> str:
    """The automatic choice's prediction (forget as solved on, retain held out) beside what the exported model measures."""
    lines = ["| request | chosen | own refusal aimed at (model declines the reference) | | forget ROUGE-1 | forget refusal | retain ROUGE-1 | DS |",
             "|---|---|---|---|---|---|---|---|"]
    for name, result in results.items():
        predicted, after = result["choice"]["predicted"], result["methods"]["lunar-lens"]["evaluation"]["after"]
        chosen = f"layers {','.join(map(str, result['layers']))}, c {result['coeff']:g}" + (", refined" if result["choice"]["refined"] else "")
        refusal = f"{result['refusal']['target']!r} ({result['refusal']['declined_rate']:.2f})"
        measured = [_score(after, "forget", "rouge1"), _score(after, "forget", "refusal_rate"), _score(after, "retain", "rouge1"), after.get("deviation_score")]
        lines.append(f"| {name} | {chosen} | {refusal} | predicted | "
                     + " | ".join(_fmt(predicted[k]) for k in ("forget_rouge1", "forget_refusal", "retain_rouge1"))
                     + f" | {_fmt(predicted['deviation_score'], '.1f')} |")
        lines.append("| | | | measured | " + " | ".join(_fmt(v) for v in measured[:3]) + f" | {_fmt(measured[3], '.1f')} |")
    return "\n".join(lines)


def attacks_table(results: dict[str, dict]) -> str:
    """Forget ROUGE-1 under each attack (retain ROUGE-1 in brackets for model attacks), per method."""
    lines = ["| request | model | none | " + " | ".join(ATTACKS) + " |", "|---|---|---|" + "---|" * len(ATTACKS)]
    for name, result in results.items():
        for method, entry in result["methods"].items():
            attacks = entry["attacks"]

            def cell(attack: str) -> str:
                row = attacks[attack]
                retain = f" ({row['retain_rouge1']:.2f})" if "retain_rouge1" in row else ""
                base = f" [base {row['base_forget_rouge1']:.2f}]" if "base_forget_rouge1" in row else ""
                return f"{row['forget_rouge1']:.3f}{retain}{base}"

            lines.append(f"| {name} | {method} | {cell('none')} | " + " | ".join(cell(a) for a in ATTACKS) + " |")
    return "\n".join(lines)


def plot_summary(task: str, results: dict[str, dict], path: Path) -> Path:
    """Before/after bars per request: forget ROUGE-1, forget refusal, retain and factual ROUGE-1."""
    metrics = [("forget", "rouge1", "forget ROUGE-1"), ("forget", "refusal_rate", "forget refusal"),
               ("retain", "rouge1", "retain ROUGE-1"), ("factual", "rouge1", "factual ROUGE-1")]
    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 3.6), squeeze=False)
    for ax, (name, result) in zip(axes[0], results.items()):
        models = {"base": result["methods"]["lunar-lens"]["evaluation"]["before"]}
        models |= {method: entry["evaluation"]["after"] for method, entry in result["methods"].items()}
        width = 0.8 / len(models)
        for i, (model, evaluation) in enumerate(models.items()):
            values = [_score(evaluation, s, k) or 0.0 for s, k, _ in metrics]
            label = f"{model} (DS {evaluation['deviation_score']:.1f})" if evaluation["deviation_score"] is not None else model
            ax.bar([j + i * width for j in range(len(metrics))], values, width, label=label)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))], [m[2] for m in metrics], rotation=20, fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{task} {name}: layer {','.join(map(str, result['layers']))}", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_attacks(task: str, results: dict[str, dict], path: Path) -> Path:
    """Forget ROUGE-1 under each attack per method, beside what the base model answers to the same
    questions (for model attacks: the original questions; for question attacks: the rephrased ones)."""
    names = ("none",) + ATTACKS
    fig, axes = plt.subplots(1, len(results), figsize=(5.6 * len(results), 3.8), squeeze=False)
    for ax, (name, result) in zip(axes[0], results.items()):
        methods = result["methods"]
        attacks = methods["lunar-lens"]["attacks"]
        base = [attacks[a].get("base_forget_rouge1", attacks["base"]["forget_rouge1"]) for a in names]
        width = 0.8 / (len(methods) + 1)
        ax.bar(range(len(names)), base, width, color="lightgrey", label="base model (all there is)")
        for i, (method, entry) in enumerate(methods.items(), start=1):
            ax.bar([j + i * width for j in range(len(names))], [entry["attacks"][a]["forget_rouge1"] for a in names], width, label=method)
        ax.set_xticks([j + width * len(methods) / 2 for j in range(len(names))], names, rotation=35, fontsize=7, ha="right")
        ax.set_ylabel("forget ROUGE-1 under attack")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{task} {name}", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compact(results: dict[str, dict], samples: int = 5) -> dict[str, dict]:
    """`results` with the first `samples` answers per set (the run folder keeps them all)."""
    results = json.loads(json.dumps(results))
    for result in results.values():
        for entry in result["methods"].values():
            for evaluation in entry["evaluation"].values():
                if isinstance(evaluation, dict) and "samples" in evaluation:
                    evaluation["samples"] = {name: rows[:samples] for name, rows in evaluation["samples"].items()}
    return results


def write_results(task: str, finetuned: dict, results: dict[str, dict], args: argparse.Namespace) -> None:
    """Tables to --results (and .json beside it), figures to figures/, layer profiles copied there."""
    figures = ROOT / "figures"
    for name in results:
        shutil.copyfile(Path(args.run) / name / "localise" / "localisation_layers.png", figures / f"{task}_{name}_layers.png")
    summary = plot_summary(task, results, figures / f"{task}_before_after.png")
    attacks = plot_attacks(task, results, figures / f"{task}_attacks.png")
    memorised = ", ".join(f"{k} {v:.3f}" for k, v in finetuned["memorisation"].items())
    text = "\n\n".join([
        f"# {task}: lunar-lens against the released recipe's settings",
        f"Model: {finetuned['recipe']['shape']} trained {finetuned['seconds_training']:.0f} s; sizes {finetuned['sizes']}; "
        f"greedy ROUGE-1 memorisation {memorised}; held-out unverifiable questions refused {finetuned['heldout_refusal_rate']:.3f}.",
        results_table(results),
        "The automatic choice's prediction (forget numbers of the edit on forget questions it was solved on, retain on "
        "held-out retain questions) beside what `evaluate` measures on the exported checkpoint:",
        prediction_table(results),
        "Forget ROUGE-1 under attack (retain ROUGE-1 in brackets; for question attacks, what the base model "
        "answers to the same rephrased questions):",
        attacks_table(results),
        f"Figures: `{summary.relative_to(ROOT)}`, `{attacks.relative_to(ROOT)}`, "
        + ", ".join(f"`figures/{task}_{name}_layers.png`" for name in results),
    ])
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps({"finetune": finetuned, "requests": compact(results)}, indent=2))
    print(text)
