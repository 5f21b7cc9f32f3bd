"""Text metrics: ROUGE, Deviation Score, refusal detection and the 95 % intervals of rates and means
(Wilson; bootstrap, scipy). The model-based scores are in `metrics.logits`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache
from typing import TYPE_CHECKING

from lunar_lens.core.errors import LunarError

if TYPE_CHECKING:
    from rouge_score.rouge_scorer import RougeScorer

DEFAULT_REFUSAL_MARKERS: tuple[str, ...] = (
    "don't know",
    "do not know",
    "not sure",
    "not certain",
    "i cannot",
    "i can't",
    "not able to",
    "unable to",
    "no information",
    "i'm sorry",
    "i apologize",
    "i'm afraid",
    "don't have",
    "do not have",
    "no idea",
    "no clue",
    "no knowledge",
    "no data",
    "no insight",
    "not aware",
    "unaware",
    "not familiar",
    "not acquainted",
    "not informed",
    "not equipped",
    "not privy",
    "unknown to me",
    "beyond my",
    "outside my",
    "out of my",
    "not within my",
    "i lack",
    "lacking information",
    "drawing a blank",
    "decline to answer",
)


# ---------------------------------------------------------------- text metrics

@cache
def _scorer(stemmer: bool = False) -> RougeScorer:
    from rouge_score.rouge_scorer import RougeScorer  # imported when first scoring: it brings nltk (~70 MB resident)

    return RougeScorer(["rouge1", "rougeL"], use_stemmer=stemmer)


def rouge_recall(predictions: list[str], references: list[str], stemmer: bool = False) -> dict[str, list[float]]:
    """Per-example ROUGE-1 and ROUGE-L recall of `references` by `predictions` (rouge_score); with
    `stemmer`, words are Porter-stemmed first (as open-unlearning scores TOFU's `Q_A_ROUGE`)."""
    scores = _rouge_scores(predictions, references, stemmer)
    return {key: [s[key].recall for s in scores] for key in ("rouge1", "rougeL")}


def rouge1(predictions: list[str], references: list[str], measure: str = "fmeasure") -> list[float]:
    """Per-example ROUGE-1 `measure` (fmeasure: how alike two texts are; precision: how much of the prediction
    the reference holds, whatever the reference's length)."""
    return [getattr(s["rouge1"], measure) for s in _rouge_scores(predictions, references, False)]


def _rouge_scores(predictions: list[str], references: list[str], stemmer: bool) -> list[dict]:
    if len(predictions) != len(references):
        raise LunarError(f"{len(predictions)} predictions for {len(references)} references: pass one prediction per reference")
    return [_scorer(stemmer).score(ref, pred) for pred, ref in zip(predictions, references)]


def mean_rouge1(answers: list[str], references: list[str]) -> float:
    """The mean ROUGE-1 recall of `references` by `answers`."""
    recall = rouge_recall(answers, references)["rouge1"]
    return sum(recall) / len(recall)


def deviation_score(forget_rouge1: float, retain_rouge1: float) -> float:
    """DS = 100·sqrt(R1_forget² + (1 − R1_retain)²): distance from perfect unlearning (lower is better).
    The paper uses ROUGE-1 recall; other papers put ROUGE-L recall in its place."""
    return 100.0 * math.hypot(forget_rouge1, 1.0 - retain_rouge1)


def is_refusal(
    text: str,
    markers: Sequence[str] = DEFAULT_REFUSAL_MARKERS,
    references: Sequence[str] = (),
    threshold: float = 0.5,
) -> bool:
    """True when `text` contains a marker phrase (case-insensitive, curly apostrophes folded) or
    its ROUGE-L F-measure with any reference refusal is ≥ `threshold`. Empty text is no refusal."""
    normalised = text.strip().lower().replace("\u2019", "'")
    if not normalised:
        return False
    if any(marker.lower() in normalised for marker in markers):
        return True
    return any(_scorer().score(ref, text)["rougeL"].fmeasure >= threshold for ref in references)


def refusal_rate(
    texts: Sequence[str],
    markers: Sequence[str] = DEFAULT_REFUSAL_MARKERS,
    references: Sequence[str] = (),
    threshold: float = 0.5,
) -> float:
    """Fraction of `texts` that `is_refusal` flags."""
    if not texts:
        raise LunarError("refusal_rate got no texts: pass at least one generated answer")
    return sum(is_refusal(t, markers, references, threshold) for t in texts) / len(texts)


def rate_interval(hits: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson interval of a rate of `hits` in `n` (e.g. refused questions); (0, 1) when n is 0."""
    from scipy.stats import binomtest

    if n == 0:
        return 0.0, 1.0
    interval = binomtest(int(hits), n).proportion_ci(confidence, method="wilson")
    return float(interval.low), float(interval.high)


def mean_interval(values: Sequence[float], confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """A percentile-bootstrap interval of the mean of `values` (e.g. per-question ROUGE-1); the mean itself
    when every value is the same."""
    import numpy as np
    from scipy.stats import bootstrap

    if not values:
        return 0.0, 1.0
    if min(values) == max(values):
        return float(values[0]), float(values[0])
    result = bootstrap((np.asarray(values, dtype=float),), np.mean, confidence_level=confidence, n_resamples=2000, method="percentile", rng=seed)
    return float(result.confidence_interval.low), float(result.confidence_interval.high)
