"""Evaluate a model on named QA sets (forget / retain / factual / …): batched greedy answers scored
by ROUGE recall and refusal rate, the model-based answer metrics, KL to a base model, and the
Deviation Score; a before/after markdown table and bar figure; the `evaluate` command."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean

from transformer_lens.model_bridge import TransformerBridge

from lunar_lens import metrics
from lunar_lens.cli import add_device_arguments, whole_number
from lunar_lens.data import QA, load_qa, load_refusals
from lunar_lens.errors import LunarError
from lunar_lens.generation import generate_answers
from lunar_lens.outputs import FORMAT, check_output, write_json

# metric key -> column header, in table order
COLUMNS = {
    "rouge1": "ROUGE-1",
    "rougeL": "ROUGE-L",
    "refusal_rate": "refusal",
    "mrr": "MRR",
    "hit_rate": "hit@1",
    "extraction_strength": "ES",
    "perplexity": "PPL",
    "kl_to_base": "KL to base",
}


@dataclass
class Evaluation:
    """Per-set metric means and sizes, the Deviation Score (when forget and retain were scored) and,
    per set, each example's question, greedy answer, refusal flag, reference and ROUGE-1 recall."""

    scores: dict[str, dict[str, float]]
    sizes: dict[str, int]
    samples: dict[str, list[dict]] = field(default_factory=dict)
    deviation_score: float | None = None

    def to_json(self) -> dict:
        return {"scores": self.scores, "sizes": self.sizes, "deviation_score": self.deviation_score, "samples": self.samples}

    def markdown_table(self, other: Evaluation | None = None, labels: tuple[str, str] = ("before", "after")) -> str:
        """One row per set (and a DS row); with `other`, each cell reads `self → other`."""
        evaluations = [self] if other is None else [self, other]
        sets = list(dict.fromkeys(name for e in evaluations for name in e.scores))
        keys = [k for k in COLUMNS if any(k in e.scores.get(name, {}) for e in evaluations for name in sets)]
        title = "set" if other is None else f"set ({labels[0]} → {labels[1]})"
        lines = ["| " + " | ".join([title] + [COLUMNS[k] for k in keys]) + " |", "|" + "---|" * (len(keys) + 1)]
        for name in sets:
            cells = [_cell([e.scores.get(name, {}).get(k) for e in evaluations]) for k in keys]
            size = next(e.sizes[name] for e in evaluations if name in e.sizes)
            lines.append("| " + " | ".join([f"{name} (n={size})"] + cells) + " |")
        if any(e.deviation_score is not None for e in evaluations):
            ds = _cell([e.deviation_score for e in evaluations], digits=1)
            lines.append("| " + " | ".join(["Deviation Score"] + [ds] + [""] * (len(keys) - 1)) + " |")
        return "\n".join(lines)


def _cell(values: Sequence[float | None], digits: int = 3) -> str:
    return " → ".join("–" if v is None else f"{v:.{digits}f}" for v in values)


def evaluate_sets(
    bridge: TransformerBridge,
    sets: Mapping[str, Sequence[QA]],
    base: TransformerBridge | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 64,
    progress: bool = False,
    model_metrics: bool = True,
    refusals: Sequence[str] = (),
) -> Evaluation:
    """Score `bridge` on each named set.

    Every set gets the refusal rate of its greedy answers (by marker phrases, or similarity to
    `refusals`). Sets whose items all have answers also get ROUGE-1/ROUGE-L recall and, with
    `model_metrics`, the teacher-forced MRR, hit@1, extraction strength and answer perplexity.
    With `base`, KL(base ‖ model) of the first-answer-token distribution. The Deviation Score
    needs sets named "forget" and "retain".
    """
    scores: dict[str, dict[str, float]] = {}
    samples: dict[str, list[dict]] = {}
    for name, items in sets.items():
        if not items:
            raise LunarError(f"the {name} set is empty: give at least one question or leave the set out")
        questions = [qa.question for qa in items]
        answers = generate_answers(bridge, questions, max_new_tokens, batch_size, progress)
        refused = [metrics.is_refusal(a, references=refusals) for a in answers]
        scores[name] = {"refusal_rate": fmean(refused)}
        samples[name] = [{"question": q, "answer": a, "refusal": r} for q, a, r in zip(questions, answers, refused)]
        if base is not None:
            scores[name]["kl_to_base"] = fmean(metrics.kl_to_base(bridge, base, questions, batch_size))
        if any(qa.answer is None for qa in items):
            continue
        references = [qa.answer for qa in items]
        rouge = metrics.rouge_recall(answers, references)
        scores[name] |= {key: fmean(values) for key, values in rouge.items()}
        for sample, reference, rouge1 in zip(samples[name], references, rouge["rouge1"]):
            sample |= {"reference": reference, "rouge1": rouge1}
        if model_metrics:
            ranks, perplexity = metrics.answer_token_scores(bridge, questions, references, batch_size)
            scores[name] |= {key: fmean(values) for key, values in metrics.rank_metrics(ranks).items()}
            scores[name]["perplexity"] = fmean(perplexity)
    deviation = None
    if "rouge1" in scores.get("forget", {}) and "rouge1" in scores.get("retain", {}):
        deviation = metrics.deviation_score(scores["forget"]["rouge1"], scores["retain"]["rouge1"])
    return Evaluation(scores, {name: len(items) for name, items in sets.items()}, samples, deviation)


def plot_before_after(
    before: Evaluation, after: Evaluation, path: str | Path, labels: tuple[str, str] = ("before", "after"), force: bool = False
) -> Path:
    """Grouped bars of ROUGE-1 recall and refusal rate per set, before and after; DS in the title. PNG."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend and open figures stay as they are

    from lunar_lens.figures import save

    panels = [("rouge1", "ROUGE-1 recall"), ("refusal_rate", "refusal rate")]
    fig = Figure(figsize=(4.5 * len(panels), 3.8))
    axes = fig.subplots(1, len(panels), sharey=True)
    width = 0.38
    for ax, (key, label) in zip(axes, panels):
        sets = [name for name, scores in before.scores.items() if key in scores and key in after.scores.get(name, {})]
        for offset, (evaluation, name, colour) in enumerate(zip((before, after), labels, ("#9aa5b1", "#d1495b"))):
            xs = [i + (offset - 0.5) * width for i in range(len(sets))]
            bars = ax.bar(xs, [evaluation.scores[s][key] for s in sets], width, label=name, color=colour)
            ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
        ax.set_xticks(range(len(sets)), sets)
        ax.set_title(label)
        ax.set_ylim(0, 1.1)
        ax.spines[["top", "right"]].set_visible(False)
    axes[0].set_ylabel("mean over the set")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=2, frameon=False)
    if before.deviation_score is not None and after.deviation_score is not None:
        fig.suptitle(f"Deviation Score {before.deviation_score:.1f} → {after.deviation_score:.1f} (lower is better)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return save(fig, path, dpi=150, force=force)


# ---------------------------------------------------------------- command line

def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Generation, loading and output flags shared by `evaluate` and `attack`."""
    parser.add_argument("--max-new-tokens", type=whole_number(), default=64, help="longer answers are cut (and score lower recall)")
    parser.add_argument("--batch-size", type=whole_number(), default=32, help="prompts per generation and scoring batch")
    parser.add_argument("--refusals", help="reference refusal responses, one per line (refusal detection by similarity)")
    parser.add_argument("--force", action="store_true", help="replace an earlier lunar-lens report (and figure) at --out")
    add_device_arguments(parser)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="ROUGE recall, refusal rate, Deviation Score and more for any checkpoint",
        description="Score a Hugging Face checkpoint on forget / retain / factual sets; with --base, "
        "also the base model (a before/after table and figure) and KL to it.",
    )
    parser.add_argument("--model", required=True, help="HF model folder or hub id (e.g. the output of `lunar-lens unlearn`)")
    parser.add_argument("--base", help="the model before unlearning: adds a before column, KL to base and a figure")
    parser.add_argument("--forget", required=True, help="forgotten questions with answers (JSON, JSONL, CSV, HF dataset)")
    parser.add_argument("--retain", required=True, help="retained questions with answers")
    parser.add_argument("--factual", help="general-knowledge questions with answers (optional)")
    parser.add_argument("--out", required=True, help="report JSON to write")
    parser.add_argument("--figure", help="before/after PNG (default: --out with .png, when --base is given)")
    parser.add_argument("--no-model-metrics", action="store_true", help="skip MRR, hit@1, ES and perplexity")
    add_common_arguments(parser)
    parser.set_defaults(func=run_cli)


def load_sets(args: argparse.Namespace) -> dict[str, list[QA]]:
    names = ("forget", "retain", "factual")
    return {name: load_qa(getattr(args, name), require_answers=True) for name in names if getattr(args, name, None)}


def check_report_target(args: argparse.Namespace, *inputs: str | None) -> list[str]:
    """Refuse `--out` (a JSON report) before anything loads; returns the inputs it must stay out of."""
    inputs = [path for path in inputs if path]
    check_output(args.out, folder=False, force=args.force, inputs=inputs)
    return inputs


def run_cli(args: argparse.Namespace) -> None:
    from lunar_lens.model import load_model

    sets = load_sets(args)
    refusals = load_refusals(args.refusals) if args.refusals else ()
    options = dict(
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=True,
        model_metrics=not args.no_model_metrics, refusals=refusals,
    )
    inputs = check_report_target(args, args.model, args.base, args.forget, args.retain, args.factual, args.refusals)
    figure = (args.figure or Path(args.out).with_suffix(".png")) if args.base else None
    if figure is not None:
        check_output(figure, folder=False, force=args.force, inputs=inputs + [args.out], parameter="figure")
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    base = load_model(args.base, device=args.device, dtype=args.dtype) if args.base else None
    after = evaluate_sets(model, sets, base=base, **options)
    report: dict = {"format": f"{FORMAT} evaluate 1", "model": args.model, "base": args.base, "settings": options | {"refusals": args.refusals}}
    if base is None:
        report["evaluation"] = after.to_json()
        print(after.markdown_table())
    else:
        before = evaluate_sets(base, sets, **options)
        report |= {"before": before.to_json(), "after": after.to_json()}
        print(before.markdown_table(after))
        report["figure"] = str(plot_before_after(before, after, figure, force=args.force))
    write_json(args.out, report, force=args.force, inputs=inputs)
    print(f"wrote {args.out}")
