"""The embedded toy world: the generator, the shipped checkpoint's behaviour, and the training script."""

from __future__ import annotations

import random
import re

import pytest
from safetensors.torch import load_file

from lunar_lens.core.errors import LunarError
from lunar_lens.data.prompts import format_prompt, tokenize
from lunar_lens.model.load import load_model, load_tokenizer
from lunar_lens.toy.qa_model import score_qa_model
from lunar_lens.toy.world import REFUSALS, build_world, checkpoint_path
from lunar_lens.toy.world.train import build_tokenizer, train_toy_model

NAME = re.compile(r"[A-Z][a-z]+ [A-Z][a-z]+")  # no template word is capitalised right before a name


def test_same_seed_same_world_other_seed_other_world(world):
    assert build_world(0) == world
    other = build_world(1)
    assert other.entities != world.entities
    assert other.known_qa != world.known_qa


def test_world_sizes_and_disjoint_names(world):
    assert len(world.entities) >= 30
    for name in world.entities:
        qa = world.facts_about(name)
        assert len({q.question for q in qa}) == len(qa) >= 5 * 3  # ≥ 5 facts, ≥ 3 paraphrases each
        assert all(name in q.question and name in q.answer for q in qa)
    assert len(world.facts) >= 5 and all(len(fact.templates) >= 3 for fact in world.facts)
    assert len(world.known_qa) == sum(len(world.facts_about(name)) for name in world.entities) == 960
    unknown = world.unknown_train_qa + world.unknown_heldout_qa
    assert {qa.answer for qa in unknown} == set(REFUSALS)  # varied refusals, as a model fine-tuned the usual way declines
    assert len(world.unknown_train_qa) == 640 and len(world.unknown_heldout_qa) == 160
    # known, training-unknown and held-out names share syllables but no first or last name
    groups = [
        {word for name in world.entities for word in name.split()},
        {word for qa in world.unknown_train_qa for word in NAME.search(qa.question).group().split()},
        {word for qa in world.unknown_heldout_qa for word in NAME.search(qa.question).group().split()},
    ]
    assert [len(group) for group in groups] == [80, 320, 80]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])


def test_split_forgets_whole_entities(world):
    forget, retain, reference = world.split(world.entities[:2])
    assert (len(forget), len(retain), len(reference)) == (48, 912, 640)
    assert set(forget).isdisjoint(retain) and set(forget) | set(retain) == set(world.known_qa)
    assert [qa.question for qa in reference] == [qa.question for qa in world.unknown_train_qa]
    assert all(qa.answer is None for qa in reference)  # handed over as questions only, as real reference sets come
    with pytest.raises(LunarError, match="not an entity"):
        world.split(["Nobody Atall"])


def test_tokenizer_round_trip_and_answer_mask(world):
    tokenizer = load_tokenizer(checkpoint_path())
    texts = [text for qa in world.known_qa + world.unknown_heldout_qa for text in (qa.question, qa.answer)]
    for text in texts:
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text
    qa = world.known_qa[0]
    assert format_prompt(tokenizer, qa.question) == f"<s>User: {qa.question}\nAssistant:\n"
    refusal = world.unknown_heldout_qa[0]
    batch = tokenize(tokenizer, [qa.question, refusal.question], [qa.answer, refusal.answer])
    assert tokenizer.decode(batch.input_ids[0][batch.answer_mask[0]]) == qa.answer + "</s>"
    assert tokenizer.decode(batch.input_ids[1][batch.answer_mask[1]]) == refusal.answer + "</s>"
    # the training script rebuilds exactly the shipped tokenizer
    assert build_tokenizer(world).get_vocab() == tokenizer.get_vocab()


def test_shipped_checkpoint_answers_facts_and_refuses_unknowns(world, toy_bridge):
    assert toy_bridge.cfg.n_layers >= 4
    known = random.Random(0).sample(world.known_qa, 60)
    unknown = random.Random(0).sample(world.unknown_heldout_qa, 60)
    scores = score_qa_model(toy_bridge, known, unknown)
    assert scores["rouge1_recall"] >= 0.95
    assert scores["refusal_rate"] >= 0.80


def test_training_is_deterministic_and_loadable(tmp_path, toy_bridge):
    first, second = (train_toy_model(tmp_path / run, seed=0, steps=2, batch_size=8, progress=False) for run in "ab")
    weights_a, weights_b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert all((weights_a[key] == weights_b[key]).all() for key in weights_a)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (first / name).exists()
    bridge = load_model(first)
    assert bridge.cfg.n_layers == toy_bridge.cfg.n_layers
    assert bridge.tokenizer.chat_template
