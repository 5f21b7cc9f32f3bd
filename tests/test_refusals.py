"""The model's own refusal: what the edit aims at when the reference set comes as questions only."""

from __future__ import annotations

import pytest

from lunar_lens.core.errors import LunarError
from lunar_lens.data.qa import QA
from lunar_lens.directions.refusals import model_refusal
from lunar_lens.toy.world import REFUSALS


def test_a_given_refusal_wins_and_reference_answers_come_next(toy_bridge):
    reference = [QA("a?", "No idea."), QA("b?", "Not sure."), QA("c?", "Not sure.")]
    assert model_refusal(toy_bridge, reference, refusal="Nope.").target == "Nope."
    from_answers = model_refusal(toy_bridge, reference)
    assert (from_answers.target, from_answers.refusals, from_answers.source) == ("Not sure.", ["Not sure.", "No idea."], "reference answers")


def test_questions_only_give_the_models_own_most_common_refusal(toy_bridge, world):
    reference = [QA(qa.question) for qa in world.unknown_train_qa[:40]]
    found = model_refusal(toy_bridge, reference)
    assert found.source == "model"
    assert found.declined_rate >= 0.9
    assert found.target in REFUSALS and set(found.refusals) <= set(REFUSALS)
    assert len(found.refusals) >= 2  # the toy model declines with varied refusals


def test_a_reference_set_the_model_answers_is_refused_with_the_fix(toy_bridge, world):
    answered = [QA(qa.question) for qa in world.known_qa[:12]]
    with pytest.raises(LunarError, match=r"declines only 0% of the 12 reference questions.*--refusal"):
        model_refusal(toy_bridge, answered)
