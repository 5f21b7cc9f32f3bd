"""W_out refinement on behaviour: only the edits change, the loss falls, the refusal holds while generating."""

from __future__ import annotations

import pytest
import torch

import lunar_lens.model.memory as model_module
from lunar_lens.core.errors import LunarError
from lunar_lens.data.prompts import first_answer_tokens, tokenize
from lunar_lens.edit.refine import RefineSettings, answer_cross_entropy, backward_answer_loss, frozen, refine_edits, rows_per_pass
from lunar_lens.model.generation import generate_answers
from lunar_lens.model.weights import delta_hooks, w_out


def test_delta_hooks_act_as_the_edited_weight(fresh_toy_bridge, world):
    bridge = fresh_toy_bridge
    batch = tokenize(bridge.tokenizer, [qa.question for qa in world.known_qa[:4]], [qa.answer for qa in world.known_qa[:4]])
    delta = torch.randn_like(w_out(bridge, 2)) * 0.01
    with torch.no_grad():
        hooked = answer_cross_entropy(bridge, batch, delta_hooks({2: delta}))
        bridge.blocks[2].mlp.W_out.data += delta  # a live view of the HF parameter
        edited = answer_cross_entropy(bridge, batch, [])
    assert torch.allclose(hooked, edited, atol=1e-5)


def test_passes_split_by_the_activation_budget_give_the_same_losses_and_gradients(fresh_toy_bridge, world, monkeypatch):
    bridge = fresh_toy_bridge
    items = world.known_qa[:6]
    batch = first_answer_tokens(tokenize(bridge.tokenizer, [qa.question for qa in items], [qa.answer for qa in items]), 8, bridge.tokenizer.pad_token_id)
    delta = torch.nn.Parameter(torch.randn_like(w_out(bridge, 2)) * 0.01)

    scale = torch.arange(len(items), dtype=torch.float32)  # a different multiple of the edit per row (screening)

    def measured() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            per_row = answer_cross_entropy(bridge, batch, delta_hooks({2: delta.detach()}), per_row=True)
            scaled = answer_cross_entropy(bridge, batch, lambda rows: delta_hooks({2: delta.detach()}, scale[rows]), per_row=True)
        delta.grad = None
        with frozen(bridge.original_model):
            loss = backward_answer_loss(bridge, batch, lambda: delta_hooks({2: delta}), weight=2.0)
        return per_row, scaled, torch.tensor(loss), delta.grad.clone()

    whole = measured()
    assert rows_per_pass(bridge, batch, backward=True) >= len(items)  # the toy model: one pass
    monkeypatch.setattr(model_module, "ACTIVATION_BYTES", (1, 1))
    assert rows_per_pass(bridge, batch, backward=True) == 1
    split = measured()  # one row per pass
    for a, b in zip(whole, split):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(whole[0], whole[1]) and whole[2] > 0 and whole[3].abs().max() > 0


def test_refinement_teaches_the_refusal_and_keeps_the_rest(fresh_toy_bridge, world):
    bridge = fresh_toy_bridge
    weights = {name: p.detach().clone() for name, p in bridge.original_model.named_parameters()}
    forget, retain = world.facts_about(world.entities[0])[:12], world.known_qa[200:260]
    refusal = "Sorry, I can't answer that."
    start = {2: torch.zeros_like(w_out(bridge, 2))}
    edits = refine_edits(
        bridge, start, [qa.question for qa in forget], [refusal] * len(forget), [qa.question for qa in retain],
        [qa.answer for qa in retain], RefineSettings(steps=30),
    ).edits
    assert set(edits) == {2} and edits[2].abs().max() > 0
    assert all(torch.equal(p, weights[name]) for name, p in bridge.original_model.named_parameters())  # the model is untouched
    assert all(p.requires_grad for p in bridge.original_model.parameters())  # and its flags restored
    with bridge.hooks(fwd_hooks=delta_hooks(edits)):
        forgotten = generate_answers(bridge, [qa.question for qa in forget])
        kept = generate_answers(bridge, [qa.question for qa in retain[:20]])
    assert sum(answer == refusal for answer in forgotten) >= 11
    assert sum(answer == qa.answer for answer, qa in zip(kept, retain)) >= 19


def test_refinement_inputs_are_checked(toy_bridge):
    with pytest.raises(LunarError, match="one refusal per forget question"):
        refine_edits(toy_bridge, {}, ["a?"], [], ["b?"], ["c"])
    with pytest.raises(LunarError, match="steps >= 0"):
        RefineSettings(steps=-1)


def test_generation_in_smaller_batches_when_the_cache_would_exceed_the_budget(fresh_toy_bridge, world, monkeypatch):
    questions = [qa.question for qa in world.known_qa[:5]]
    whole = generate_answers(fresh_toy_bridge, questions, max_new_tokens=12)
    monkeypatch.setattr(model_module, "ACTIVATION_BYTES", (1, 1))  # one row per generate call
    assert generate_answers(fresh_toy_bridge, questions, max_new_tokens=12) == whole and len(set(whole)) > 1


def test_a_half_precision_model_gets_a_contiguous_unembedding_input_and_keeps_its_gradients(world):
    from lunar_lens.edit.refine import answer_losses
    from lunar_lens.model.load import load_model
    from lunar_lens.toy.world import checkpoint_path

    bridge = load_model(checkpoint_path(), dtype="bfloat16")  # HF slices the unembedding's input (logits_to_keep)
    items = world.known_qa[:3]
    batch = first_answer_tokens(tokenize(bridge.tokenizer, [qa.question for qa in items], [qa.answer for qa in items]), 8, bridge.tokenizer.pad_token_id)
    delta = torch.nn.Parameter(torch.zeros_like(w_out(bridge, 2)).float())
    seen = []
    with frozen(bridge.original_model), torch.enable_grad():
        hooks = [*delta_hooks({2: delta}), ("unembed.hook_in", lambda activation, hook: seen.append(activation.is_contiguous()))]
        sums, counts, _ = answer_losses(bridge, batch, hooks)
        sums.sum().backward()
    assert seen == [True] and counts.min() > 0 and delta.grad.abs().max() > 0


def test_retain_batches_go_through_the_whole_set_before_repeating():
    from lunar_lens.edit.refine import epoch_batches

    batches = epoch_batches(10, 4, torch.Generator().manual_seed(0))
    seen = torch.cat([next(batches) for _ in range(5)])  # 20 indices: two epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert len(next(epoch_batches(3, 8, torch.Generator()))) == 3  # a set smaller than a batch: all of it


def test_the_monitor_stops_the_refinement_once_the_refusal_holds_and_returns_that_edit(fresh_toy_bridge, world):
    bridge = fresh_toy_bridge
    forget, retain = world.facts_about(world.entities[0])[:12], world.known_qa[200:260]
    refusal = "Sorry, I can't answer that."
    rows = ([qa.question for qa in forget], [refusal] * len(forget), [qa.question for qa in retain], [qa.answer for qa in retain])
    start = {2: torch.zeros_like(w_out(bridge, 2))}
    refined = refine_edits(bridge, start, *rows, RefineSettings(steps=200, check_every=3))
    assert refined.stopped == "converged" and refined.steps < 200 and refined.steps % 3 == 0
    last = refined.checks[-1]
    assert last["step"] == refined.steps and last["forget_exact"] >= 0.95 and refined.checks[0]["forget_exact"] == 0.0
    assert last["retain_accuracy"] >= refined.checks[0]["retain_accuracy"] - 0.01  # the unedited model's, at step 0
    with bridge.hooks(fwd_hooks=delta_hooks(refined.edits)):
        forgotten = generate_answers(bridge, [qa.question for qa in forget])
    assert sum(answer == refusal for answer in forgotten) >= 11
    fixed = refine_edits(bridge, start, *rows, RefineSettings(steps=3, check_every=0))  # no monitor: every step trains
    assert fixed.steps == 3 and fixed.checks == [] and fixed.stopped == "steps"
