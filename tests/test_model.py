import copy
import re
from pathlib import Path

import pytest
import torch
import transformers
from conftest import FAMILIES, TINYSTORIES, tiny_config, tiny_hf_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import lunar_lens.model.load as model_module
from lunar_lens.cli import main
from lunar_lens.core.errors import LunarError
from lunar_lens.data.prompts import add_special_tokens, first_answer_tokens, format_answer, format_prompt, tokenize
from lunar_lens.model.generation import generate_answers
from lunar_lens.model.load import SUPPORTED_TRANSFORMERS, check_transformers, load_model, loaded_from, parse_dtype, wrap_hf_model
from lunar_lens.model.names import mlp_out, mlp_post, resid_post, resid_pre
from lunar_lens.model.weights import add_to_w_out, w_out, w_out_tensor_name
from lunar_lens.toy.world import checkpoint_path

QUESTIONS = ["Where does Zorvan Kelt live?", "What is the favourite colour of the tall baker from the valley?", "Who?"]


@pytest.fixture(params=FAMILIES)
def pair(request, toy_tokenizer):
    """(bridge, an independent plain-HF copy of the same weights)."""
    hf = tiny_hf_model(request.param, len(toy_tokenizer))
    reference = copy.deepcopy(hf)
    return wrap_hf_model(hf, toy_tokenizer), reference


def resid_mid(layer: int) -> str:  # the library needs no name for it; the test checks the stream's algebra
    return f"blocks.{layer}.hook_resid_mid"


def b_out(bridge, layer: int):
    return getattr(bridge.blocks[layer].mlp.out.original_component, "bias", None)


def test_bridge_logits_equal_plain_transformers(pair):
    bridge, reference = pair
    batch = tokenize(bridge.tokenizer, QUESTIONS)
    with torch.no_grad():
        ours = bridge(batch.input_ids, attention_mask=batch.attention_mask)
        for row, question in enumerate(QUESTIONS):  # unpadded, one prompt at a time
            single = tokenize(bridge.tokenizer, [question])
            theirs = reference(input_ids=single.input_ids).logits[0]
            real = batch.attention_mask[row].bool()
            assert (ours[row, real] - theirs).abs().max() <= 1e-5


def test_hook_points_expose_what_lunar_needs(pair):
    bridge, _ = pair
    batch = tokenize(bridge.tokenizer, QUESTIONS)
    names = [f(1) for f in (resid_pre, resid_mid, resid_post, mlp_post, mlp_out)]
    _, cache = bridge.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask, names_filter=names)
    bias = b_out(bridge, 1)
    predicted = cache[mlp_post(1)] @ w_out(bridge, 1) + (0 if bias is None else bias)
    assert torch.allclose(predicted, cache[mlp_out(1)], atol=1e-5)
    assert torch.allclose(cache[resid_mid(1)] + cache[mlp_out(1)], cache[resid_post(1)], atol=1e-5)
    assert w_out(bridge, 1).shape == (bridge.cfg.d_mlp, bridge.cfg.d_model)


def test_w_out_is_a_live_view_of_the_checkpoint_tensor(pair):
    bridge, _ = pair
    name = w_out_tensor_name(bridge, 2)
    assert name.endswith(("mlp.down_proj.weight", "mlp.c_proj.weight")) and ".2." in name
    params = dict(bridge.original_model.named_parameters())  # each parameter once
    before = {k: v.detach().clone() for k, v in params.items()}
    delta = torch.randn(bridge.cfg.d_mlp, bridge.cfg.d_model)
    add_to_w_out(bridge, 2, delta)
    changed = [k for k in params if not torch.equal(before[k], params[k])]
    assert [k.replace("._original_component", "") for k in changed] == [name]
    key = changed[0]
    expected = before[key] + (delta.T if before[key].shape == delta.T.shape else delta)
    assert torch.allclose(params[key], expected)


def test_batched_generation_equals_plain_hf_generate(pair):
    bridge, reference = pair
    ours = generate_answers(bridge, QUESTIONS, max_new_tokens=8)
    for question, answer in zip(QUESTIONS, ours):
        single = tokenize(bridge.tokenizer, [question])
        output = reference.generate(
            input_ids=single.input_ids, attention_mask=single.attention_mask, max_new_tokens=8, do_sample=False,
            pad_token_id=bridge.tokenizer.pad_token_id, eos_token_id=bridge.tokenizer.eos_token_id,
        )
        expected = bridge.tokenizer.decode(output[0, single.input_ids.shape[1] :], skip_special_tokens=True).strip()
        assert answer == expected


def test_transformerlens_generate_matches_hf(toy_tokenizer):
    """The bridge's own KV-cache generation (broken by transformers 5.24) agrees with HF."""
    hf = tiny_hf_model("llama", len(toy_tokenizer))
    reference = copy.deepcopy(hf)
    bridge = wrap_hf_model(hf, toy_tokenizer)
    single = tokenize(toy_tokenizer, [QUESTIONS[0]])
    ours = bridge.generate(single.input_ids, max_new_tokens=10, do_sample=False, return_type="tokens", verbose=False, stop_at_eos=False)
    theirs = reference.generate(input_ids=single.input_ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(ours[0], theirs[0])


def test_load_model_from_folder_and_dtypes(tmp_path, toy_tokenizer):
    hf = tiny_hf_model("qwen2", len(toy_tokenizer))
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    toy_tokenizer.save_pretrained(tmp_path / "sharded")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    bridge = load_model(tmp_path / "sharded", dtype="bfloat16")
    assert w_out(bridge, 0).dtype == torch.bfloat16
    assert loaded_from(bridge) == str(tmp_path / "sharded")
    assert bridge.tokenizer.padding_side == "left" and bridge.tokenizer.pad_token is not None


def test_prompt_format_uses_the_chat_template_or_the_plain_format(toy_tokenizer, plain_tokenizer):
    chat = format_prompt(toy_tokenizer, "Who?")
    assert "Who?" in chat and chat != "Question: Who?\nAnswer:"
    assert format_prompt(plain_tokenizer, "Who?") == "Question: Who?\nAnswer:"
    batch = tokenize(plain_tokenizer, ["Who?"], ["Nobody."])
    answer = plain_tokenizer.decode(batch.input_ids[0][batch.answer_mask[0]], skip_special_tokens=True)
    assert answer.strip() == "Nobody."


def row_masks(tokenizer, question: str, answer: str | None) -> tuple[list[bool], list[bool]]:
    """Question and prompt masks of one unpadded row, token by token from its character spans."""
    prompt = format_prompt(tokenizer, question)
    text = prompt if answer is None else prompt + format_answer(tokenizer, answer)
    spans = tokenizer(text, return_offsets_mapping=True, add_special_tokens=add_special_tokens(tokenizer))["offset_mapping"]
    q_start = prompt.rfind(question)
    answer_start = len(prompt) if answer is not None else len(text) + 1
    question = [start < q_start + len(question) and end > q_start and end > start for start, end in spans]
    return question, [end <= answer_start for _, end in spans]


@pytest.mark.parametrize("with_answers", [False, True])
def test_batched_masks_equal_token_by_token_masks(toy_tokenizer, plain_tokenizer, with_answers):
    answers = ["Nobody knows.", "Green, with a ü.", "I'm not able to answer that."] if with_answers else None
    for tokenizer in (toy_tokenizer, plain_tokenizer):
        batch = tokenize(tokenizer, QUESTIONS, answers)
        for row, question in enumerate(QUESTIONS):
            real = batch.attention_mask[row].bool()
            question_mask, prompt_mask = row_masks(tokenizer, question, None if answers is None else answers[row])
            assert batch.question_mask[row][real].tolist() == question_mask
            assert batch.prompt_mask[row][real].tolist() == prompt_mask
            assert batch.answer_mask[row][real].tolist() == [not p for p in prompt_mask]
            assert not (batch.question_mask[row] | batch.prompt_mask[row] | batch.answer_mask[row])[~real].any()
        assert sum(batch.question_mask[0]) > 0


def test_first_answer_tokens_keep_each_prompt_and_k_answer_tokens(toy_tokenizer):
    answers = ["No.", "It is a long answer about the favourite colour, which is green.", "Nobody knows who."]
    full = tokenize(toy_tokenizer, QUESTIONS, answers)
    cut = first_answer_tokens(full, 3, toy_tokenizer.pad_token_id)
    assert cut.input_ids.shape[1] < full.input_ids.shape[1]
    for row in range(len(QUESTIONS)):
        real, kept = full.attention_mask[row].bool(), cut.attention_mask[row].bool()
        n_prompt = int(full.prompt_mask[row].sum())
        n_kept = n_prompt + min(3, int(full.answer_mask[row].sum()))
        for name in ("input_ids", "question_mask", "prompt_mask", "answer_mask"):
            assert torch.equal(getattr(cut, name)[row][kept], getattr(full, name)[row][real][:n_kept])
        assert not kept[: len(kept) - n_kept].any() and kept[len(kept) - n_kept :].all()  # left padding
        assert (cut.input_ids[row][~kept] == toy_tokenizer.pad_token_id).all()


def test_bad_model_inputs_are_clear_errors(tmp_path):
    with pytest.raises(LunarError, match="does not exist"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LunarError, match="no config.json"):
        load_model(tmp_path / "empty")
    with pytest.raises(LunarError, match="unknown dtype"):
        parse_dtype("float8")
    if not torch.cuda.is_available():
        with pytest.raises(LunarError, match="no CUDA"):
            load_model(tmp_path / "empty", device="cuda")


@pytest.mark.skipif(not TINYSTORIES.exists(), reason="../shared/models/TinyStories-656K is absent")
def test_tinystories_continuation_matches_plain_transformers():
    bridge = load_model(TINYSTORIES)
    reference = AutoModelForCausalLM.from_pretrained(TINYSTORIES).eval()
    tokenizer = AutoTokenizer.from_pretrained(TINYSTORIES)
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    ours = bridge.original_model.generate(input_ids=ids, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    theirs = reference.generate(input_ids=ids, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert torch.equal(ours, theirs)
    with torch.no_grad():
        assert (bridge(ids) - reference(ids).logits).abs().max() <= 1e-5


def test_the_declared_transformers_range_is_checked_at_load(monkeypatch, tmp_path, capsys):
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert f'"transformers{SUPPORTED_TRANSFORMERS}"' in pyproject  # one range, declared and checked
    for supported in ("5.9.0", "5.23.0", transformers.__version__):
        check_transformers(supported)
    for unsupported in ("5.8.1", "5.24.0", "5.24.0.dev0", "6.0.0"):
        with pytest.raises(LunarError, match=rf"transformers {re.escape(unsupported)} is installed.*pip install 'transformers>=5\.9,<5\.24'"):
            check_transformers(unsupported)
    # an unsupported install stops the CLI with one line, before any model is built
    monkeypatch.setattr(model_module.transformers, "__version__", "5.24.0")  # the module object lunar-lens reads
    questions = tmp_path / "q.json"
    questions.write_text('[{"question": "Who?", "answer": "Nobody."}]')
    args = ["evaluate", "--model", str(checkpoint_path()), "--forget", str(questions), "--retain", str(questions), "--out", str(tmp_path / "r.json")]
    assert main(args) == 2
    assert capsys.readouterr().err.splitlines() == [
        "lunar-lens evaluate: error: transformers 5.24.0 is installed, but lunar-lens supports transformers>=5.9,<5.24 "
        "(with 5.24 and later, TransformerLens 4.3's bridge generates wrongly): pip install 'transformers>=5.9,<5.24'"
    ]


def test_generation_stops_at_the_last_position_the_model_has(toy_tokenizer):
    # GPT-2's positions are embeddings: an edited model that no longer says eos would index past the last one
    width = tokenize(toy_tokenizer, QUESTIONS).input_ids.shape[1]
    config = tiny_config("gpt2", len(toy_tokenizer))
    config.n_positions, config.eos_token_id = width + 6, None  # a model that never stops
    torch.manual_seed(0)
    bridge = wrap_hf_model(transformers.AutoModelForCausalLM.from_config(config).eval(), toy_tokenizer)
    answers = generate_answers(bridge, QUESTIONS, max_new_tokens=64)
    assert answers == generate_answers(bridge, QUESTIONS, max_new_tokens=6) and any(answers)  # the 6 positions left, then it stops
    assert generate_answers(bridge, [QUESTIONS[1] * 3], max_new_tokens=8) == [""]  # no position left at all
