import pytest
import torch

from lunar_lens.data import QA
from lunar_lens.errors import LunarError
from lunar_lens.model import load_model
from lunar_lens.qa_model import build_tokenizer, score_qa_model, train_qa_model

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
    out = train_qa_model(tmp_path / "m", EXAMPLES[:-1] + EXAMPLES[-1:] * 2, tokenizer, SHAPE, steps=120, batch_size=8, lr=1e-2, progress=False)
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
