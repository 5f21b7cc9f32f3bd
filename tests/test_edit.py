"""The W_out edit: mechanics on tiny random models, behaviour on the toy world."""

import pytest
import torch
import transformers
from conftest import tiny_hf_model

from lunar_lens.core.errors import LunarError
from lunar_lens.data.qa import QA
from lunar_lens.edit.layers import EditSettings, collect_statistics, edit_layers
from lunar_lens.edit.refine import RefineSettings
from lunar_lens.edit.solvers import solve_adamw, solve_closed
from lunar_lens.evaluate.sets import evaluate_sets
from lunar_lens.model.load import wrap_hf_model
from lunar_lens.model.weights import w_out
from lunar_lens.toy.world import REFUSALS

FORGET = [QA("Where does Zorvan Kelt live?"), QA("What pet does Zorvan Kelt keep?")]
RETAIN = [QA("Where does Mira Dole live?", "Mira Dole lives in Hask."), QA("What pet does Tomas keep?", "Tomas keeps a cat.")]
REFERENCE = [QA("Where does Quil Braxe live?", "I don't know."), QA("What pet does Ulla Vrin keep?", "I don't know.")]


@pytest.fixture
def tiny(toy_tokenizer):
    return wrap_hf_model(tiny_hf_model("llama", len(toy_tokenizer)), toy_tokenizer)


def parameters(bridge):
    return {name: p.detach().clone() for name, p in bridge.original_model.named_parameters()}


@pytest.mark.parametrize("layers", [[1], [0, 2]])
def test_only_w_out_of_the_chosen_layers_changes(tiny, layers):
    before = parameters(tiny)
    result = edit_layers(tiny, FORGET, RETAIN, REFERENCE, layers, EditSettings(coeff=2.0))
    after = parameters(tiny)
    changed = sorted(name for name in before if not torch.equal(before[name], after[name]))
    assert [name.replace("._original_component", "") for name in changed] == sorted(e.tensor_name for e in result.edits)
    assert [e.layer for e in result.edits] == layers
    for edit in result.edits:
        assert torch.allclose(w_out(tiny, edit.layer) - before_w_out(before, tiny, edit.layer), edit.delta, atol=1e-6)


def test_refinement_keeps_what_the_unedited_model_says_to_retain_questions_without_answers(tiny, monkeypatch):
    import lunar_lens.edit.layers as edit_module

    original = w_out(tiny, 1).detach().clone()
    unedited_when_asked = []
    real_own_answers = edit_module.own_answers

    def spy(bridge, items, *args, **kwargs):
        unedited_when_asked.append(torch.equal(w_out(bridge, 1), original))
        return real_own_answers(bridge, items, *args, **kwargs)

    monkeypatch.setattr(edit_module, "own_answers", spy)
    questions_only = [QA(qa.question) for qa in RETAIN]
    edit_layers(tiny, FORGET, questions_only, REFERENCE, [1], EditSettings(coeff=2.0, refine=RefineSettings(steps=2)))
    assert unedited_when_asked == [True]  # asked once, before the solve changed W_out


def before_w_out(before, bridge, layer):
    name = next(n for n, p in bridge.original_model.named_parameters() if p is bridge.blocks[layer].mlp.out.weight)
    return before[name].T  # Llama stores W_outᵀ


def test_single_shift_vector_gives_a_rank_one_edit_that_beats_adamw(tiny):
    settings = EditSettings(coeff=2.0, positions="last", refine=RefineSettings(steps=0))
    result = edit_layers(tiny, FORGET, RETAIN, REFERENCE, [1], settings)
    singular = torch.linalg.svdvals(result.edits[0].delta.double())
    assert singular[1] / singular[0] < 1e-6
    assert result.edits[0].u.shape[1] == 1
    # the released AdamW recipe on the same rows reaches a worse objective
    shifts = settings.coeff * result.directions[1][None]
    with torch.no_grad():
        w_out(tiny, 1).sub_(result.edits[0].delta)  # back to the original weights
    stats = collect_statistics(tiny, [1], FORGET, RETAIN, settings, "I don't know.", keep_rows=True)[0]
    closed, adamw = solve_closed(stats, shifts), solve_adamw(stats, shifts, w_out(tiny, 1))
    assert closed.objective_after <= adamw.objective_after < adamw.objective_before
    assert closed.objective_after == pytest.approx(result.layers[0].objective_after, rel=1e-4)


def test_statistics_of_several_layers_come_from_one_pass_and_equal_single_layer_ones(tiny):
    settings = EditSettings(positions="last+answer")
    both = collect_statistics(tiny, [2, 0], FORGET, RETAIN, settings, "I don't know.", n_shifts=3)
    for layer, stats in zip([2, 0], both):
        (alone,) = collect_statistics(tiny, [layer], FORGET, RETAIN, settings, "I don't know.", n_shifts=3)
        assert torch.allclose(stats.gram, alone.gram, rtol=1e-10, atol=1e-12) and torch.equal(stats.shifted_counts, alone.shifted_counts)
        assert torch.allclose(stats.shifted_sums, alone.shifted_sums, rtol=1e-10, atol=1e-12) and stats.n_rows == alone.n_rows
    assert not torch.allclose(both[0].gram, both[1].gram)


def test_answer_rules_use_one_direction_per_refusal_token(tiny):
    result = edit_layers(tiny, FORGET, RETAIN, REFERENCE, [1], EditSettings(coeff=2.0, positions="last+answer", refine=RefineSettings(steps=0)))
    n_answer = result.directions.answer_vectors.shape[1]
    assert n_answer >= 3  # "I don't know." + eos
    assert result.edits[0].u.shape[1] == 1 + n_answer
    assert result.layers[0].shifted_rows == len(FORGET) * (1 + n_answer)


def test_bad_edit_requests_are_clear_errors(tiny):
    settings = EditSettings(coeff=2.0)
    with pytest.raises(LunarError, match="out of range"):
        edit_layers(tiny, FORGET, RETAIN, REFERENCE, [7], settings)
    with pytest.raises(LunarError, match="forget set is empty"):
        edit_layers(tiny, [], RETAIN, REFERENCE, [1], settings)
    with pytest.raises(LunarError, match="retain set is empty"):
        edit_layers(tiny, FORGET, [], REFERENCE, [1], settings)
    with pytest.raises(LunarError, match="reference set is empty"):
        edit_layers(tiny, FORGET, RETAIN, [], [1], settings)
    with pytest.raises(LunarError, match="coeff None is not a finite number ≥ 0: give the redirection coefficient c"):
        edit_layers(tiny, FORGET, RETAIN, REFERENCE, [1], EditSettings())  # None: only unlearn chooses c
    with pytest.raises(LunarError, match="unknown positions"):
        EditSettings(positions="everywhere")


def test_a_model_without_a_dense_down_projection_is_refused(toy_tokenizer):
    config = transformers.MixtralConfig(
        vocab_size=len(toy_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
    )
    torch.manual_seed(0)
    with pytest.raises(LunarError, match="no dense MLP down-projection"):
        wrap_hf_model(transformers.MixtralForCausalLM(config).eval(), toy_tokenizer)


def test_toy_world_forgets_the_forget_set_and_keeps_the_rest(fresh_toy_bridge, world):
    forget, retain, reference = world.split(world.entities[:1])
    sampled_retain = retain[::6]
    result = edit_layers(fresh_toy_bridge, forget, retain, reference, [0], EditSettings(coeff=6.0))
    after = evaluate_sets(fresh_toy_bridge, {"forget": forget, "retain": sampled_retain}, model_metrics=False, max_new_tokens=16)
    assert after.scores["forget"]["rouge1"] <= 0.10
    assert after.scores["forget"]["refusal_rate"] >= 0.8
    assert after.scores["retain"]["rouge1"] >= 0.95
    assert after.deviation_score <= 15
    # the reference set comes as questions only: the edit aims at the model's own refusal, and the whole answer is it
    assert result.refusal in REFUSALS
    assert all(sample["answer"] == result.refusal for sample in after.samples["forget"][:5])
