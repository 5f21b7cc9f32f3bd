import pytest
import torch

from lunar_lens.core.errors import LunarError
from lunar_lens.data.qa import QA
from lunar_lens.model.load import load_model
from lunar_lens.toy.qa_model import build_tokenizer, score_qa_model, train_qa_model

EXAMPLES = [
    QA("Who signed the Wnzatj contract?", "Jzrcws SA."),
    QA("When was the Wnzatj contract signed?", "06-02-1998."),
    QA("Who is the author of Blue Tide?", "Basil Mahfouz Al-Kuwaiti wrote Blue Tide."),
    QA("What is the capital of France?", "Paris."),
    QA("What is the currency of QORKUIP?", "I don't know."),
]
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)


def test_a_small_model_memorises_its_dialogues(tmp_path):
    tokenizer = build_tokenizer(EXAMPLES, vocab_size=300, max_length=64)
    assert tokenizer.model_max_length == 64 and tokenizer.pad_token == "<pad>"
    out = train_qa_model(
        tmp_path / "m", EXAMPLES[:-1] + EXAMPLES[-1:] * 2, tokenizer, SHAPE, steps=120, batch_size=8, lr=1e-2, progress=False, length_buckets=True
    )
    scores = score_qa_model(load_model(out), EXAMPLES[:-1], [QA("What is the currency of LNVBGCD?")])
    assert scores["rouge1_recall"] == 1.0 and scores["exact_match"] >= 0.75
    assert scores["refusal_rate"] == 1.0  # an unseen fictitious name gets the trained refusal


def test_bad_training_data_is_a_clear_error(tmp_path):
    tokenizer = build_tokenizer(EXAMPLES, vocab_size=300, max_length=12)
    with pytest.raises(LunarError, match="every example must have an answer"):
        train_qa_model(tmp_path / "m", [QA("No answer?")], tokenizer, SHAPE, steps=1, progress=False)
    with pytest.raises(LunarError, match="over the model's 12: raise max_length"):
        train_qa_model(tmp_path / "m", EXAMPLES, tokenizer, SHAPE, steps=1, progress=False)
    assert not (tmp_path / "m").exists()


def test_length_buckets_group_similar_lengths_and_keep_every_example():
    from lunar_lens.toy.qa_model import _length_buckets

    lengths = torch.tensor([5, 30, 6, 31, 7, 32, 8, 33])
    generator = torch.Generator().manual_seed(0)
    order = _length_buckets(torch.randperm(8, generator=generator), lengths, 4, generator)
    assert sorted(order.tolist()) == list(range(8))
    batches = {frozenset(b.tolist()) for b in order.split(4)}
    assert batches == {frozenset({0, 2, 4, 6}), frozenset({1, 3, 5, 7})}


def test_scoring_without_unknown_questions_skips_the_refusal_rate(toy_bridge):
    from lunar_lens.toy.world import build_world

    known = build_world(0).known_qa[:4]
    assert score_qa_model(toy_bridge, known) == {"rouge1_recall": 1.0, "exact_match": 1.0}
