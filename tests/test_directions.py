import pytest
import torch
from conftest import FAMILIES, tiny_hf_model

from lunar_lens.core.errors import LunarError
from lunar_lens.data.prompts import tokenize
from lunar_lens.directions.activations import capture, position_mask, shared_prefix_length, shift_index, token_batches
from lunar_lens.directions.mean_difference import Directions, compute_directions, residual_means
from lunar_lens.model.load import wrap_hf_model
from lunar_lens.model.names import mlp_post, resid_post

QUESTIONS = [
    "Where does Zorvan Kelt live?",
    "What is the job of the very old keeper of the northern lighthouse?",
    "Who?",
    "Which colour does Mira like best of all the colours she has seen?",
    "What pet does Tomas keep?",
]


@pytest.fixture(params=["llama", "gpt2"])
def bridge(request, toy_tokenizer):
    return wrap_hf_model(tiny_hf_model(request.param, len(toy_tokenizer)), toy_tokenizer)


def mean_residuals(bridge, questions: list[str], rule: str = "last", batch_size: int = 32):
    return residual_means(bridge, questions, rule, batch_size=batch_size)[0]  # the prompt means


def mean_answer_residuals(bridge, questions: list[str], answer: str, batch_size: int = 32):
    return residual_means(bridge, questions, "last", answer, batch_size=batch_size)[1]  # the per-answer-token means


def test_batched_padded_activations_equal_per_prompt(bridge):
    names = [mlp_post(1), resid_post(1)]
    batch = tokenize(bridge.tokenizer, QUESTIONS)
    batched = capture(bridge, batch, names, stop_at_layer=2)
    for row, question in enumerate(QUESTIONS):
        single = tokenize(bridge.tokenizer, [question])
        alone = capture(bridge, single, names, stop_at_layer=2)
        real = batch.attention_mask[row].bool()
        for name in names:
            assert torch.allclose(batched[name][row, real], alone[name][0], atol=1e-5), name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stop_at_layer", ["n_layers", None])
def test_a_pass_through_every_block_stops_before_the_unembedding(toy_tokenizer, family, stop_at_layer):
    bridge = wrap_hf_model(tiny_hf_model(family, len(toy_tokenizer)), toy_tokenizer)
    last = bridge.cfg.n_layers - 1
    names = [mlp_post(last), resid_post(last), resid_post(0)]
    batch = tokenize(bridge.tokenizer, QUESTIONS)
    unembedded = []
    handle = bridge.original_model.get_output_embeddings().register_forward_hook(lambda *_: unembedded.append(1))
    try:
        cache = capture(bridge, batch, names, stop_at_layer=bridge.cfg.n_layers if stop_at_layer else None)
    finally:
        handle.remove()
    assert unembedded == []
    _, full = bridge.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask, names_filter=names, return_cache_object=False)
    assert all(torch.equal(cache[name], full[name]) for name in names)


def test_mean_residuals_equal_a_slow_reference(bridge):
    fast = mean_residuals(bridge, QUESTIONS, "last", batch_size=2)
    question_mean = mean_residuals(bridge, QUESTIONS, "question", batch_size=3)
    slow_last = torch.zeros_like(fast)
    slow_question = torch.zeros_like(fast)
    for question in QUESTIONS:
        single = tokenize(bridge.tokenizer, [question])
        _, cache = bridge.run_with_cache(single.input_ids)  # full depth, one prompt, no padding
        for layer in range(bridge.cfg.n_layers):
            h = cache[resid_post(layer)][0].double()
            slow_last[layer] += h[-1]
            slow_question[layer] += h[single.question_mask[0]].mean(0)
    assert torch.allclose(fast, slow_last / len(QUESTIONS), atol=1e-5)
    assert torch.allclose(question_mean, slow_question / len(QUESTIONS), atol=1e-5)


def test_directions_are_reference_minus_forget_and_round_trip(bridge, tmp_path):
    forget, reference = QUESTIONS[:2], QUESTIONS[2:]
    directions = compute_directions(bridge, forget, reference)
    expected = mean_residuals(bridge, reference) - mean_residuals(bridge, forget)
    assert torch.allclose(directions.vectors, expected.float())
    assert directions.vectors.shape == (bridge.cfg.n_layers, bridge.cfg.d_model)
    assert directions.norms == pytest.approx(expected.norm(dim=-1).tolist(), rel=1e-5)
    cosine = directions.cosine_between_layers()
    assert torch.allclose(cosine.diagonal(), torch.ones(bridge.cfg.n_layers), atol=1e-5)
    directions.save(tmp_path / "dirs")
    loaded = Directions.load(tmp_path / "dirs")
    assert torch.equal(loaded.vectors, directions.vectors) and loaded.n_forget == 2 and loaded.n_reference == 3


def test_position_rules(toy_tokenizer):
    batch = tokenize(toy_tokenizer, QUESTIONS[:3], ["I don't know."] * 3)
    prefix = shared_prefix_length([tokenize(toy_tokenizer, QUESTIONS)])
    assert prefix >= 2  # BOS and the template's "User:" are shared by every prompt
    real = batch.attention_mask.bool()
    assert torch.equal(position_mask(batch, "all"), real)
    last = position_mask(batch, "last")
    assert last.sum() == 3 and torch.equal(last.nonzero()[:, 1], batch.last_prompt_index)
    suffix = position_mask(batch, "suffix", prefix)
    assert int(suffix.sum()) == int(real.sum()) - 3 * prefix
    assert torch.equal(position_mask(batch, "question"), batch.question_mask)
    assert torch.equal(position_mask(batch, "last+answer"), last | batch.answer_mask)
    with pytest.raises(LunarError, match="unknown position rule"):
        position_mask(batch, "middle")
    index = shift_index(batch, "last+answer", prefix, n_answer=2)
    assert torch.equal(index == 0, last)
    answer_offsets = [index[row][batch.answer_mask[row]].tolist() for row in range(3)]
    n_answer_tokens = int(batch.answer_mask[0].sum())
    assert all(offsets == [1, 2] + [-1] * (n_answer_tokens - 2) for offsets in answer_offsets)
    assert torch.equal(shift_index(batch, "last", prefix) >= 0, last)


def test_answer_directions_equal_a_slow_reference(bridge):
    refusal = "I don't know."
    fast = mean_answer_residuals(bridge, QUESTIONS, refusal, batch_size=2)
    slow = None
    for question in QUESTIONS:
        single = tokenize(bridge.tokenizer, [question], [refusal])
        _, cache = bridge.run_with_cache(single.input_ids)
        h = torch.stack([cache[resid_post(l)][0][single.answer_mask[0]].double() for l in range(bridge.cfg.n_layers)])
        slow = h if slow is None else slow + h
    assert fast.shape == slow.shape
    assert torch.allclose(fast, slow / len(QUESTIONS), atol=1e-5)
    directions = compute_directions(bridge, QUESTIONS[:2], QUESTIONS[2:], refusal=refusal)
    # one pass with the refusal appended gives the prompt direction too (causal: prompt positions unchanged)
    assert torch.allclose(directions.vectors, compute_directions(bridge, QUESTIONS[:2], QUESTIONS[2:]).vectors, atol=1e-5)
    table = directions.shift_table(1, 3.0)
    assert table.shape == (1 + fast.shape[1], bridge.cfg.d_model)
    assert torch.allclose(table[0], 3.0 * directions[1])


def test_directions_stop_at_the_deepest_layer(bridge):
    refusal = "I don't know."
    full = compute_directions(bridge, QUESTIONS[:2], QUESTIONS[2:], refusal=refusal)
    shallow = compute_directions(bridge, QUESTIONS[:2], QUESTIONS[2:], refusal=refusal, deepest_layer=0)
    assert shallow.vectors.shape == (1, bridge.cfg.d_model)
    assert torch.allclose(shallow.vectors, full.vectors[:1], atol=1e-6)
    assert torch.allclose(shallow.shift_table(0, 2.0), full.shift_table(0, 2.0), atol=1e-5)
    with pytest.raises(LunarError, match="cover layers 0..0, not layer 1"):
        shallow.shift_table(1, 2.0)
    with pytest.raises(LunarError, match="outside the model's layers"):
        compute_directions(bridge, QUESTIONS[:2], QUESTIONS[2:], deepest_layer=bridge.cfg.n_layers)


def test_token_batches_cover_every_question(toy_tokenizer):
    batches = list(token_batches(toy_tokenizer, QUESTIONS, batch_size=2))
    assert [len(b.input_ids) for b in batches] == [2, 2, 1]


def test_empty_set_is_a_clear_error(bridge):
    with pytest.raises(LunarError, match="empty set"):
        mean_residuals(bridge, [])
