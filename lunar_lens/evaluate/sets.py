"""Evaluate a model on named QA sets (forget / retain / factual / …): batched greedy answers scored
by ROUGE recall and refusal rate, the model-based answer metrics, KL to a base model, the
Deviation Score (from ROUGE-1 and from ROUGE-L) and TOFU's metrics under open-unlearning's names;
a before/after markdown table and bar figure."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean

import torch
from jaxtyping import Float
from transformer_lens.model_bridge import TransformerBridge

from lunar_lens.core.errors import LunarError
from lunar_lens.core.progress import Stages
from lunar_lens.data.qa import QA
from lunar_lens.metrics import logits as logit_metrics
from lunar_lens.metrics import text as text_metrics
from lunar_lens.model.generation import generate_answers

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
# open-unlearning's prefixes for TOFU's general-knowledge sets (every other set keeps its own name)
TOFU_PREFIXES = {"real_authors": "ra", "world_facts": "wf"}


@dataclass
class Evaluation:
    """Per-set metric means and sizes, the Deviation Score from ROUGE-1 and from ROUGE-L (when forget
    and retain were scored), TOFU's metrics under open-unlearning's names (`tofu`: forget_quality,
    model_utility, forget_truth_ratio, forget_Q_A_Prob, forget_Q_A_ROUGE, retain_…, ra_…, wf_…) and,
    per set, each example's question, greedy answer, refusal flag, reference, ROUGE-1 recall,
    answer probability and truth ratio."""

    scores: dict[str, dict[str, float]]
    sizes: dict[str, int]
    samples: dict[str, list[dict]] = field(default_factory=dict)
    deviation_score: float | None = None
    deviation_score_rougeL: float | None = None
    tofu: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "scores": self.scores, "sizes": self.sizes, "deviation_score": self.deviation_score,
            "deviation_score_rougeL": self.deviation_score_rougeL, "tofu": self.tofu, "samples": self.samples,
        }

    def markdown_table(self, other: Evaluation | None = None, labels: tuple[str, str] = ("before", "after")) -> str:
        """One row per set (and DS rows), then a table of TOFU's metrics when there are any; with
        `other`, each cell reads `self → other`."""
        evaluations = [self] if other is None else [self, other]
        sets = list(dict.fromkeys(name for e in evaluations for name in e.scores))
        keys = [k for k in COLUMNS if any(k in e.scores.get(name, {}) for e in evaluations for name in sets)]
        title = "set" if other is None else f"set ({labels[0]} → {labels[1]})"
        lines = ["| " + " | ".join([title] + [COLUMNS[k] for k in keys]) + " |", "|" + "---|" * (len(keys) + 1)]
        for name in sets:
            cells = [_cell([e.scores.get(name, {}).get(k) for e in evaluations]) for k in keys]
            size = next(e.sizes[name] for e in evaluations if name in e.sizes)
            lines.append("| " + " | ".join([f"{name} (n={size})"] + cells) + " |")
        for label, attribute in (("Deviation Score", "deviation_score"), ("Deviation Score (ROUGE-L)", "deviation_score_rougeL")):
            if any(getattr(e, attribute) is not None for e in evaluations):
                ds = _cell([getattr(e, attribute) for e in evaluations], spec=".1f")
                lines.append("| " + " | ".join([label] + [ds] + [""] * (len(keys) - 1)) + " |")
        tofu = list(dict.fromkeys(key for e in evaluations for key in e.tofu))
        if tofu:
            lines += ["", f"| TOFU metric (open-unlearning) | {'value' if other is None else ' → '.join(labels)} |", "|---|---|"]
            for key in tofu:  # p-values can be tiny: significant digits
                lines.append(f"| {key} | {_cell([e.tofu.get(key) for e in evaluations], spec='.3g' if key == 'forget_quality' else '.3f')} |")
        return "\n".join(lines)


def _cell(values: Sequence[float | None], spec: str = ".3f") -> str:
    return " → ".join("–" if v is None else f"{v:{spec}}" for v in values)


def answer_options(qa: QA) -> list[str]:
    """The truth ratio's options: [true answer, false answers…]; the true answer is the paraphrase when
    the record has one (TOFU's forget and retain sets), else the answer (real authors, world facts)."""
    return [qa.paraphrased_answer or qa.answer, *qa.perturbed_answers]


def truth_ratios(bridge: TransformerBridge, items: Sequence[QA], batch_size: int = 32) -> list[float]:
    """TOFU's truth ratio of each record that carries perturbed answers (`logit_metrics.truth_ratios`), in order."""
    scored, options = _option_probabilities(bridge, items, batch_size)
    if not scored:
        raise LunarError("no record carries a perturbed_answer: truth ratios need TOFU's perturbed records (paraphrased_answer, perturbed_answer)")
    return logit_metrics.truth_ratios(options).tolist()


def evaluate_sets(
    bridge: TransformerBridge,
    sets: Mapping[str, Sequence[QA]],
    base: TransformerBridge | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 64,
    progress: bool = False,
    model_metrics: bool = True,
    refusals: Sequence[str] = (),
    retain_model_truth_ratios: Sequence[float] | None = None,
) -> Evaluation:
    """Score `bridge` on each named set.

    Every set gets the refusal rate of its greedy answers (by marker phrases, or similarity to
    `refusals`). Sets whose items all have answers also get ROUGE-1/ROUGE-L recall and, with
    `model_metrics`, the teacher-forced MRR, hit@1, extraction strength and answer perplexity.
    With `base`, KL(base ‖ model) of the first-answer-token distribution. The Deviation Scores
    need sets named "forget" and "retain".

    TOFU's metrics (`Evaluation.tofu`, open-unlearning's names; sets named real_authors / world_facts
    are `ra` / `wf`): each answered set's `_Q_A_ROUGE` (stemmed ROUGE-L recall) and, with
    `model_metrics`, `_Q_A_Prob` (mean length-normalised answer probability); where records carry
    `perturbed_answers`, the truth ratio (`forget_truth_ratio`, closer to 1 is better; `_Truth_Ratio`
    elsewhere, true is better) and, without paraphrased answers, `_Q_A_Prob_normalised`.
    `model_utility`: harmonic mean of probability (normalised where there is one), ROUGE and truth
    ratio over every answered set but forget, when all have truth ratios. `forget_quality`: needs the
    forget set's truth ratios under a retain model, `retain_model_truth_ratios` (`truth_ratios`).
    """
    if retain_model_truth_ratios is not None and not model_metrics:
        raise LunarError("retain_model_truth_ratios needs model_metrics=True: forget quality compares the two models' truth ratios")
    scores: dict[str, dict[str, float]] = {}
    samples: dict[str, list[dict]] = {}
    tofu: dict[str, float] = {}
    utility: dict[str, list[float] | None] = {}  # per answered non-forget set: its model-utility terms
    forget_ratios: list[float] | None = None
    for name, items in sets.items():
        if not items:
            raise LunarError(f"the {name} set is empty: give at least one question or leave the set out")
        questions = [qa.question for qa in items]
        with Stages(progress)("generate", f"answered the {name} set ({len(items)} questions)"):
            answers = generate_answers(bridge, questions, max_new_tokens, batch_size, progress)
        refused = [text_metrics.is_refusal(a, references=refusals) for a in answers]
        scores[name] = {"refusal_rate": fmean(refused)}
        samples[name] = [{"question": q, "answer": a, "refusal": r} for q, a, r in zip(questions, answers, refused)]
        if base is not None:
            scores[name]["kl_to_base"] = fmean(logit_metrics.kl_to_base(bridge, base, questions, batch_size))
        if any(qa.answer is None for qa in items):
            continue
        references = [qa.answer for qa in items]
        rouge = text_metrics.rouge_recall(answers, references)
        scores[name] |= {key: fmean(values) for key, values in rouge.items()}
        for sample, reference, rouge1 in zip(samples[name], references, rouge["rouge1"]):
            sample |= {"reference": reference, "rouge1": rouge1}
        prefix = TOFU_PREFIXES.get(name, name)
        entry = {"rouge": fmean(text_metrics.rouge_recall(answers, references, stemmer=True)["rougeL"])}
        if model_metrics:
            ranks, perplexity = logit_metrics.answer_token_scores(bridge, questions, references, batch_size)
            scores[name] |= {key: fmean(values) for key, values in logit_metrics.rank_metrics(ranks).items()}
            scores[name]["perplexity"] = fmean(perplexity)
            entry["probability"] = fmean(1 / p for p in perplexity)  # P(answer)^(1/|answer|) = 1 / perplexity
            for sample, p in zip(samples[name], perplexity):
                sample["probability"] = 1 / p
            ratios, terms = _truth_ratio_terms(bridge, name, items, batch_size)
            entry |= terms
            for index, ratio in ratios.items():
                samples[name][index]["truth_ratio"] = ratio
            if name == "forget" and ratios:
                forget_ratios = list(ratios.values())
        names = {
            "truth_ratio": "forget_truth_ratio" if name == "forget" else f"{prefix}_Truth_Ratio",
            "probability": f"{prefix}_Q_A_Prob", "normalised": f"{prefix}_Q_A_Prob_normalised", "rouge": f"{prefix}_Q_A_ROUGE",
        }
        tofu |= {names[key]: entry[key] for key in names if key in entry}
        if name != "forget":
            utility[name] = [entry.get("normalised", entry.get("probability")), entry["rouge"], entry["truth_ratio"]] if "truth_ratio" in entry else None
    headline = {}
    if retain_model_truth_ratios is not None:
        if forget_ratios is None:
            raise LunarError(
                "retain_model_truth_ratios needs a set named forget whose records carry perturbed_answer "
                "(TOFU's *_perturbed.json): give such a forget set, or leave retain_model_truth_ratios out"
            )
        headline["forget_quality"] = logit_metrics.forget_quality(forget_ratios, retain_model_truth_ratios)
    if utility and all(terms is not None for terms in utility.values()):
        headline["model_utility"] = logit_metrics.model_utility([term for terms in utility.values() for term in terms])
    deviation = {}
    for key in ("rouge1", "rougeL"):
        if key in scores.get("forget", {}) and key in scores.get("retain", {}):
            deviation[key] = text_metrics.deviation_score(scores["forget"][key], scores["retain"][key])
    sizes = {name: len(items) for name, items in sets.items()}
    return Evaluation(scores, sizes, samples, deviation.get("rouge1"), deviation.get("rougeL"), headline | tofu)


def _truth_ratio_terms(
    bridge: TransformerBridge, name: str, items: Sequence[QA], batch_size: int
) -> tuple[dict[int, float], dict[str, float]]:
    """Each record's truth ratio (by index; records that carry perturbed answers) and the set's
    aggregate, plus its normalised probability when no record has a paraphrase (a multiple-choice set)."""
    scored, options = _option_probabilities(bridge, items, batch_size)
    if not scored:
        return {}, {}
    if len(scored) < len(items):
        warnings.warn(f"the {name} set: truth ratio over {len(scored)} of {len(items)} records (the others carry no perturbed_answer)", stacklevel=3)
    ratios = logit_metrics.truth_ratios(options)
    terms = {"truth_ratio": logit_metrics.truth_ratio_score(ratios, forget=name == "forget")}
    if not any(items[index].paraphrased_answer for index in scored):
        terms["normalised"] = logit_metrics.normalised_probability(options).mean().item()
    return dict(zip(scored, ratios.tolist())), terms


def _option_probabilities(
    bridge: TransformerBridge, items: Sequence[QA], batch_size: int
) -> tuple[list[int], list[Float[torch.Tensor, " _options"]]]:
    """Indices of the records that carry perturbed answers, and the probabilities of their `answer_options`."""
    scored = [index for index, qa in enumerate(items) if qa.perturbed_answers]
    if not scored:
        return [], []
    chosen = [items[index] for index in scored]
    return scored, logit_metrics.option_probabilities(bridge, [qa.question for qa in chosen], [answer_options(qa) for qa in chosen], batch_size)


def plot_before_after(
    before: Evaluation, after: Evaluation, path: str | Path, labels: tuple[str, str] = ("before", "after"), force: bool = False
) -> Path:
    """Grouped bars of ROUGE-1 recall and refusal rate per set, before and after; DS in the title. PNG."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend and open figures stay as they are

    from lunar_lens.core.figures import save

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
