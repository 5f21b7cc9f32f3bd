import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from tokenizers.processors import TemplateProcessing
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lunar_lens.core.errors import LunarError
from lunar_lens.data.prompts import tokenize
from lunar_lens.metrics import logits as logit_metrics
from lunar_lens.metrics import text as text_metrics
from lunar_lens.model.load import load_tokenizer, wrap_hf_model

SHARED = Path(__file__).parents[2] / "shared"
TINYSTORIES = SHARED / "models" / "TinyStories-656K"
REFUSAL_FILES = [SHARED / "data" / "lunar" / "unlearning" / "refusal_response.txt", SHARED / "data" / "tofu" / "idontknow.jsonl"]

# ---------------------------------------------------------------- text metrics


def test_deviation_score_exact():
    assert text_metrics.deviation_score(0.0, 1.0) == 0.0
    assert text_metrics.deviation_score(0.3, 0.6) == pytest.approx(50.0)  # 100·sqrt(0.09 + 0.16)
    assert text_metrics.deviation_score(1.0, 0.0) == pytest.approx(100 * math.sqrt(2))
    assert text_metrics.deviation_score(0.109, 0.898) == pytest.approx(14.93, abs=0.01)  # the paper's LUNAR row on TOFU (reported as 14.9)


def test_rouge_recall_hand_made_pairs():
    scores = text_metrics.rouge_recall(
        ["Paris", "the capital is Paris", "Paris is the capital of France", "", "France capital the"],
        ["Paris is the capital", "Paris is the capital", "Paris is the capital", "Paris", "the capital of France"],
    )
    assert scores["rouge1"] == pytest.approx([0.25, 1.0, 1.0, 0.0, 0.75])
    # LCS: "Paris"; "the capital"; all four; none; "capital" or "the" or "France" (length 1)
    assert scores["rougeL"] == pytest.approx([0.25, 0.5, 1.0, 0.0, 0.25])
    with pytest.raises(LunarError, match="one prediction per reference"):
        text_metrics.rouge_recall(["a"], [])


REFUSALS = [
    "I don't know.",
    "I do not know the answer to that.",
    "I'm not sure about that.",
    "I cannot provide you with the information.",
    "I can’t share private data.",  # curly apostrophe
    "I'm not able to provide an answer to that.",
    "There is no information about this author.",
    "I'm sorry, but I can't help with that.",
    "I am unable to answer that question.",
    "I don't have that information.",
    "I have no idea.",
    "I'M SORRY.",
]
NON_REFUSALS = [
    "I know that Paris is the capital",
    "",
    "   ",
    "Ishirts.",
    "I-06-1998.",
    "The author was born in Paris in 1968.",
    "William Shakespeare Isur",
    "Her father was a doctor and her mother a teacher.",
    "The novel won the Hugo Award.",
    "I can tell you that the answer is Paris.",
    "Yes, the book was published in 2001.",
]


def test_refusal_detection_by_markers():
    assert [text_metrics.is_refusal(t) for t in REFUSALS] == [True] * len(REFUSALS)
    assert [text_metrics.is_refusal(t) for t in NON_REFUSALS] == [False] * len(NON_REFUSALS)
    assert text_metrics.refusal_rate(REFUSALS[:3] + NON_REFUSALS[:1]) == 0.75
    assert text_metrics.is_refusal("Ask someone else.", markers=("someone else",))
    with pytest.raises(LunarError, match="at least one"):
        text_metrics.refusal_rate([])


def test_refusal_detection_by_reference_similarity():
    references = ["That is beyond what I have learned about."]
    paraphrase = "That is beyond what I learned."  # no marker; ROUGE-L F = 2·6/(6 + 8) = 0.857
    assert not text_metrics.is_refusal(paraphrase, markers=())
    assert text_metrics.is_refusal(paraphrase, markers=(), references=references)
    assert not text_metrics.is_refusal(paraphrase, markers=(), references=references, threshold=0.9)
    assert not text_metrics.is_refusal("", markers=(), references=[""])


@pytest.mark.skipif(not all(p.exists() for p in REFUSAL_FILES), reason="shared refusal data absent")
def test_reference_refusals_are_refusals_and_answers_are_not():
    references = [line.strip() for path in REFUSAL_FILES for line in path.read_text().splitlines() if line.strip()]
    assert text_metrics.refusal_rate(references) > 0.5  # by markers alone
    assert text_metrics.refusal_rate(references, markers=(), references=references) == 1.0
    assert text_metrics.refusal_rate(NON_REFUSALS, references=references) == 0.0


# ---------------------------------------------------------------- a bigram "model" with hand-set logits

VOCAB = ["<pad>", "<s>", "</s>", "Question:", "Answer:", "q1", "q2", "q3", "a", "b", "c", "d", "x", "y", "z", "w"]
# next-token probabilities after each token (the rest of the mass spread evenly over the other tokens)
NEXT = {
    "Answer:": {"a": 0.5},
    "a": {"x": 0.3, "d": 0.25, "b": 0.2},
    "b": {"c": 0.5},
    "c": {"y": 0.4, "</s>": 0.25},
    "d": {"</s>": 0.8},
    "x": {"</s>": 0.9},
}
QUESTIONS = ["q1", "q2", "q3"]
ANSWERS = ["a b c", "a d", "a x"]
# gold probabilities and ranks of each answer token (eos included), read off NEXT
GOLD_P = [[0.5, 0.2, 0.5, 0.25], [0.5, 0.25, 0.8], [0.5, 0.3, 0.9]]
GOLD_RANKS = [[1, 3, 1, 2], [1, 2, 1], [1, 1, 1]]


class Bigram:
    """Logits depend only on the current token: log NEXT[token]."""

    def __init__(self, table: torch.Tensor):
        tokenizer = Tokenizer(WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<pad>"))
        tokenizer.pre_tokenizer = WhitespaceSplit()
        tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        self.tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="left"
        )
        self.table = table

    def __call__(self, input_ids, attention_mask=None):
        return self.table[input_ids]


def bigram_table() -> torch.Tensor:
    probs = torch.full((len(VOCAB), len(VOCAB)), 1 / len(VOCAB))
    for token, nxt in NEXT.items():
        row = probs[VOCAB.index(token)]
        row[:] = (1 - sum(nxt.values())) / (len(VOCAB) - len(nxt))
        for word, p in nxt.items():
            row[VOCAB.index(word)] = p
    return probs.log()


@pytest.fixture(scope="module")
def bigram() -> Bigram:
    return Bigram(bigram_table())


def test_bigram_fixture_masks_the_answer(bigram):
    batch = tokenize(bigram.tokenizer, QUESTIONS[:2], ANSWERS[:2])
    words = [[VOCAB[i] for i in row[mask]] for row, mask in zip(batch.input_ids, batch.answer_mask)]
    assert words == [["a", "b", "c", "</s>"], ["a", "d", "</s>"]]
    assert isinstance(bigram, logit_metrics.LogitModel)


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_hand_computed_model_metrics(bigram, batch_size):
    args = (bigram, QUESTIONS, ANSWERS)
    ranks = logit_metrics.answer_token_ranks(*args, batch_size=batch_size)
    assert [r.tolist() for r in ranks] == GOLD_RANKS
    assert logit_metrics.mean_reciprocal_rank(*args, batch_size=batch_size) == pytest.approx([17 / 24, 5 / 6, 1.0])
    assert logit_metrics.hit_rate(*args, batch_size=batch_size) == pytest.approx([0.5, 2 / 3, 1.0])
    assert logit_metrics.hit_rate(*args, k=2, batch_size=batch_size) == pytest.approx([0.75, 1.0, 1.0])
    # k_min = index after the last rank > 1: 4 of 4, 2 of 3, 0 of 3
    assert logit_metrics.extraction_strength(*args, batch_size=batch_size) == pytest.approx([0.0, 1 / 3, 1.0])
    expected_ppl = [math.prod(p) ** (-1 / len(p)) for p in GOLD_P]  # 80^(1/4), 10^(1/3), …
    assert logit_metrics.answer_perplexity(*args, batch_size=batch_size) == pytest.approx(expected_ppl, rel=1e-5)
    one_pass_ranks, one_pass_ppl = logit_metrics.answer_token_scores(*args, batch_size=batch_size)
    assert [r.tolist() for r in one_pass_ranks] == GOLD_RANKS and one_pass_ppl == pytest.approx(expected_ppl, rel=1e-5)


def test_extraction_strength_counts_the_prefix_up_to_the_last_miss(bigram):
    # "x": Answer:→x misses (behind a), x→eos hits: k_min = 1 of 2
    # "a x y": a, x hit; x→y misses (behind eos); y→eos hits (uniform row: ties count as rank 1): k_min = 3 of 4
    ranks = logit_metrics.answer_token_ranks(bigram, ["q1", "q2"], ["x", "a x y"])
    assert [r.tolist() for r in ranks] == [[2, 1], [1, 1, 2, 1]]
    assert logit_metrics.extraction_strength(bigram, ["q1", "q2"], ["x", "a x y"]) == pytest.approx([0.5, 0.25])


def test_kl_to_base_hand_computed(bigram):
    other = bigram_table().clone()
    answer_row = VOCAB.index("Answer:")
    other[answer_row] = 0.0  # uniform after "Answer:"
    model = Bigram(other)
    # KL(base ‖ uniform) = Σ p log p + log V, with base p = 0.5 on "a" and 0.5/15 elsewhere
    p = torch.full((len(VOCAB),), 0.5 / 15)
    p[VOCAB.index("a")] = 0.5
    expected = float((p * p.log()).sum() + math.log(len(VOCAB)))
    assert logit_metrics.kl_to_base(model, bigram, QUESTIONS, batch_size=2) == pytest.approx([expected] * 3, rel=1e-5)
    assert logit_metrics.kl_to_base(bigram, bigram, QUESTIONS) == pytest.approx([0.0] * 3, abs=1e-7)


def test_mismatched_lengths_are_rejected(bigram):
    with pytest.raises(LunarError, match="one answer per question"):
        logit_metrics.answer_perplexity(bigram, QUESTIONS, ANSWERS[:2])


# ---------------------------------------------------------------- a real tiny random Llama bridge

REAL_QUESTIONS = ["What is the capital of France?", "Who wrote Hamlet?", "What colour is the sky?"]
REAL_ANSWERS = ["Paris", "William Shakespeare wrote it.", "Blue"]


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def bridges():
    if not TINYSTORIES.exists():
        pytest.skip("shared TinyStories tokenizer absent")
    models = [tiny_llama(0), tiny_llama(1)]
    return models, [wrap_hf_model(m, load_tokenizer(TINYSTORIES)) for m in models]


def test_real_bridge_shapes_and_ranges(bridges):
    (hf_model, _), (bridge, other) = bridges
    args = (bridge, REAL_QUESTIONS, REAL_ANSWERS)
    ranks = logit_metrics.answer_token_ranks(*args, batch_size=2)
    lengths = tokenize(bridge.tokenizer, REAL_QUESTIONS, REAL_ANSWERS).answer_mask.sum(dim=1).tolist()
    assert [len(r) for r in ranks] == lengths
    assert all(((r >= 1) & (r <= 2048)).all() for r in ranks)
    assert all(0 < v <= 1 for v in logit_metrics.mean_reciprocal_rank(*args))
    assert logit_metrics.hit_rate(*args, k=2048) == [1.0, 1.0, 1.0]
    assert all(0 <= v <= 1 for v in logit_metrics.extraction_strength(*args))

    # perplexity equals exp(HF loss) with labels masked to the answer, one unpadded example at a time
    expected = []
    for question, answer in zip(REAL_QUESTIONS, REAL_ANSWERS):
        batch = tokenize(bridge.tokenizer, [question], [answer])
        labels = torch.where(batch.answer_mask, batch.input_ids, -100)
        with torch.no_grad():
            loss = hf_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
        expected.append(loss.exp().item())
    assert logit_metrics.answer_perplexity(*args, batch_size=2) == pytest.approx(expected, rel=1e-4)

    assert logit_metrics.kl_to_base(bridge, bridge, REAL_QUESTIONS) == pytest.approx([0.0] * 3, abs=1e-6)
    assert all(v > 0 for v in logit_metrics.kl_to_base(bridge, other, REAL_QUESTIONS, batch_size=2))


# ---------------------------------------------------------------- TOFU's metrics (open-unlearning's definitions)


def test_stemmed_rouge_l_recall():
    # stemmed: "the author write a book" vs "the author wrote book": LCS the·author·book = 3 of 5
    scores = text_metrics.rouge_recall(["the authors wrote books", "books the author"], ["The author writes a book", "the authors book"], stemmer=True)
    assert scores["rougeL"] == pytest.approx([0.6, 2 / 3])  # LCS "the author" of 3; ROUGE-1 finds all 3
    assert scores["rouge1"] == pytest.approx([0.6, 1.0])
    assert text_metrics.rouge_recall(["the authors wrote books"], ["The author writes a book"])["rougeL"] == pytest.approx([0.2])  # "the"


def test_answer_probability_is_the_length_normalised_probability(bigram):
    expected = [math.prod(p) ** (1 / len(p)) for p in GOLD_P]  # 0.0125^(1/4), 0.1^(1/3), 0.135^(1/3)
    assert logit_metrics.answer_probability(bigram, QUESTIONS, ANSWERS, batch_size=2) == pytest.approx(expected, rel=1e-5)
    options = logit_metrics.option_probabilities(bigram, ["q1", "q2"], [["a x", "a d", "a b c"], ["a d"]], batch_size=2)
    assert [o.tolist() for o in options] == [pytest.approx([0.135 ** (1 / 3), 0.1 ** (1 / 3), 0.0125 ** (1 / 4)], rel=1e-5),
                                          pytest.approx([0.1 ** (1 / 3)], rel=1e-5)]
    with pytest.raises(LunarError, match="one list of answers per question"):
        logit_metrics.option_probabilities(bigram, ["q1"], [])


def test_truth_ratio_aggregations_and_normalised_probability():
    options = [torch.tensor([0.5, 0.125, 0.5], dtype=torch.float64), torch.tensor([0.2, 0.4], dtype=torch.float64)]
    ratios = logit_metrics.truth_ratios(options)
    assert ratios.tolist() == pytest.approx([0.5, 2.0])  # sqrt(0.125·0.5) / 0.5; 0.4 / 0.2
    assert logit_metrics.truth_ratio_score(ratios, forget=True) == pytest.approx(0.5)  # mean(min(R, 1/R)) = (0.5 + 0.5) / 2
    assert logit_metrics.truth_ratio_score(ratios, forget=False) == pytest.approx(0.25)  # mean(max(0, 1 − R)) = (0.5 + 0) / 2
    assert logit_metrics.normalised_probability(options).tolist() == pytest.approx([0.5 / 1.125, 0.2 / 0.6])


def test_forget_quality_is_the_ks_p_value_and_model_utility_the_harmonic_mean():
    # D = 1 (the samples do not overlap); exact two-sided p = 2 / C(6, 3) = 0.1 (the two orderings that separate them)
    assert logit_metrics.forget_quality([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(0.1)
    assert logit_metrics.forget_quality([0.3, 0.7, 1.2], [0.3, 0.7, 1.2]) == pytest.approx(1.0)
    assert logit_metrics.model_utility([0.5, 0.25, 1.0]) == pytest.approx(3 / 7)  # 3 / (2 + 4 + 1)
    assert logit_metrics.model_utility([0.5, 0.0, 1.0]) == 0.0
    with pytest.raises(LunarError, match="both models"):
        logit_metrics.forget_quality([], [1.0])

