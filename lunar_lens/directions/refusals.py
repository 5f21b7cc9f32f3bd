"""The model's own refusal: what the model answers to the reference questions, which it already declines.

A reference set often comes as questions only (the LUNAR release's `splits/unverified.json`), and a model
fine-tuned the usual way declines with varied refusals. Aiming the edit at a sentence the model never says
leaves the forget set answered (measured: refusal rate 0.0), so the edit aims at what the model says."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from transformer_lens.model_bridge import TransformerBridge

from lunar_lens.core.errors import LunarError
from lunar_lens.data.qa import QA, spread
from lunar_lens.metrics.text import is_refusal
from lunar_lens.model.generation import generate_answers

MIN_DECLINED = 0.5  # below this share of declined reference questions the reference set is not one


@dataclass
class ModelRefusal:
    """The refusal(s) the edit aims at, and how the model answered the reference questions."""

    target: str  # the most common refusal: the forget prompts' teacher-forced target
    refusals: list[str]  # every distinct refusal the model gave, most common first
    declined_rate: float  # share of reference questions the model declines
    source: str  # "reference answers" (given with the set) or "model" (generated)

    def summary(self) -> dict:
        return {"target": self.target, "refusals": self.refusals[:10], "declined_rate": self.declined_rate, "source": self.source}


def most_common(texts: Sequence[str]) -> list[str]:
    """Distinct texts, most common first (ties: first seen)."""
    return [text for text, _ in Counter(texts).most_common()]


def model_refusal(
    bridge: TransformerBridge,
    reference: Sequence[QA],
    max_new_tokens: int = 32,
    batch_size: int = 32,
    refusal: str | None = None,
    max_prompts: int = 64,
) -> ModelRefusal:
    """What the edit should make the model say. `refusal` (given by the user) wins; a reference set with
    answers gives its most common answer; otherwise the model's greedy answers to (at most `max_prompts`,
    evenly spread) reference questions, of which at least half must be refusals (`metrics.is_refusal`)."""
    if refusal:
        return ModelRefusal(refusal, [refusal], float("nan"), "given")
    if not reference:
        raise LunarError("the reference set is empty: give questions the model already declines")
    given = [qa.answer for qa in reference if qa.answer]
    if given:
        ranked = most_common(given)
        return ModelRefusal(ranked[0], ranked, float("nan"), "reference answers")
    answers = generate_answers(bridge, [qa.question for qa in spread(reference, max_prompts)], max_new_tokens, batch_size)
    declined = [answer for answer in answers if is_refusal(answer)]
    rate = len(declined) / len(answers)
    if rate < MIN_DECLINED:
        examples = "; ".join(repr(a[:60]) for a in answers[:3])
        raise LunarError(
            f"the model declines only {rate:.0%} of the {len(answers)} reference questions (e.g. {examples}): give reference "
            "questions it already declines, or pass the refusal to aim at (refusal=..., --refusal TEXT), or reference records with answers"
        )
    ranked = most_common(declined)
    return ModelRefusal(ranked[0], ranked, rate, "model")


@runtime_checkable
class DirectionRequest(Protocol):
    """What the directions of an edit depend on (`edit.layers.EditSettings` has these fields)."""

    refusal: str | None
    positions: str
    direction_rule: str
    batch_size: int


def refusal_target(bridge: TransformerBridge, reference: Sequence[QA], settings: DirectionRequest) -> str:
    """The response forget prompts are redirected towards: the setting, else the reference set's most common
    answer, else the model's own most common refusal to the reference questions (`refusals.model_refusal`)."""
    return settings.refusal or model_refusal(bridge, reference).target
