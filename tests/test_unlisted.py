"""Knowledge nobody listed (`lunar_lens.choose.unlisted`): the packaged general-knowledge questions, their filters,
and what keeping them does to answers no set listed."""

import json
from pathlib import Path

import pytest
from conftest import TINYSTORIES

from lunar_lens.choose.unlisted import general_questions, unlisted_keep, unlisted_questions
from lunar_lens.core.settings import RunSettings
from lunar_lens.edit.layers import EditSettings
from lunar_lens.edit.refine import RefineSettings
from lunar_lens.metrics.text import is_refusal, rouge1, rouge_recall
from lunar_lens.model.generation import generate_answers

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_the_packaged_set_is_a_hundred_distinct_questions():
    questions = general_questions()
    assert len(questions) == len(set(questions)) == 100 and all(q.endswith("?") for q in questions)


def test_listed_questions_and_ones_close_to_a_forget_question_are_dropped():
    packaged = general_questions()
    forget = [packaged[3].replace("?", " exactly?"), "How many contracts does Company A hold?"]
    chosen = unlisted_questions(100, forget, listed=[packaged[5]])
    assert packaged[3] not in chosen and packaged[5] not in chosen and len(chosen) == 98
    assert unlisted_questions(10, forget, listed=[packaged[5]]) == [q for i, q in enumerate(packaged[:12]) if i not in (3, 5)]


@pytest.mark.skipif(not SHARED.exists(), reason="shared data folder absent")
def test_no_packaged_question_asks_what_the_evaluations_factual_sets_ask():
    factual = [qa["question"] for qa in json.loads((SHARED / "lunar" / "unlearning" / "factual_data.json").read_text())]
    for split in ("world_facts", "real_authors"):
        factual += [json.loads(line)["question"] for line in (SHARED / "tofu" / f"{split}.json").read_text().splitlines() if line.strip()]
    closest = max(max(rouge1([q] * len(factual), factual)) for q in general_questions())
    assert closest < 0.9  # shared question frames ("What is the capital of …?") score up to 0.86; the same fact asked scored 1.0


def test_only_answers_the_model_is_sure_of_are_kept_and_the_edit_keeps_them(world, fresh_toy_bridge):
    from lunar_lens.model.load import load_model
    from lunar_lens.pipeline.unlearn import unlearn
    from lunar_lens.toy.world import checkpoint_path

    sure = unlisted_keep(fresh_toy_bridge, 100, [])
    assert len(sure) == 26 and all(is_refusal(qa.answer) for qa in sure)  # the toy model surely declines these; the other 74 it is unsure of
    forget, retain, reference = world.split(world.entities[:1])
    kept = {}
    for n, bridge in ((100, fresh_toy_bridge), (0, load_model(str(checkpoint_path())))):
        settings = EditSettings(coeff=6.0, unlisted=n, refine=RefineSettings(steps=0))
        outcome = unlearn(bridge, forget, retain[::4], reference[::4], layers=[0], settings=settings, run=RunSettings(progress=False))
        assert outcome.report["sizes"]["unlisted"] == (26 if n else 0) and outcome.report["settings"]["unlisted"] == n
        after = generate_answers(bridge, [qa.question for qa in sure])
        kept[n] = sum(rouge_recall(after, [qa.answer for qa in sure])["rouge1"]) / len(sure)
    assert kept[100] > 0.95 and kept[100] > kept[0]


@pytest.mark.skipif(not TINYSTORIES.exists(), reason="shared TinyStories model absent")
def test_a_model_that_knows_no_general_knowledge_keeps_none_of_it():
    from lunar_lens.model.load import load_model

    assert unlisted_keep(load_model(TINYSTORIES), 100, []) == []  # a children's-story model: every answer a guess
