"""The automatic choice: held-out split, candidate layer sets, the decision rule, and the whole choice on
the toy world (reference as questions only, varied refusals)."""

from __future__ import annotations

from dataclasses import replace

import torch

from lunar_lens.choose.choice import Cell, ChoiceSettings, choose_edit, contiguous_sets, holdout_split, pick_cell
from lunar_lens.choose.figures import save_localisation
from lunar_lens.choose.judge import judge_verdict
from lunar_lens.choose.probes.rule import choose_checked_edit as probe_rule_choice
from lunar_lens.data.qa import QA
from lunar_lens.directions.mean_difference import directions_for
from lunar_lens.directions.refusals import model_refusal
from lunar_lens.edit.layers import EditSettings
from lunar_lens.edit.refine import RefineSettings


def test_holdout_split_is_disjoint_deterministic_and_never_empty():
    items = [QA(f"q{i}?", "a") for i in range(10)]
    solve, held = holdout_split(items, 0.25)
    assert [qa.question for qa in held] == ["q3?", "q7?"] and len(solve) == 8
    assert not {qa.question for qa in solve} & {qa.question for qa in held}
    assert holdout_split(items[:2], 0.25)[1] == [items[1]]
    assert holdout_split(items[:1], 0.25) == ([items[0]], [items[0]])  # one question: judged on itself


def test_candidate_layer_sets_are_single_layers_and_contiguous_runs():
    assert contiguous_sets(4, 2) == [[0], [1], [2], [3], [0, 1], [1, 2], [2, 3]]


def test_a_cell_that_does_not_refuse_cannot_win_where_the_old_rule_picked_it():
    # measured shape (issue 14): the only cell within the old retain-KL budget changes nothing (refusal 0),
    # every cell that moves the answers costs more KL
    inert = Cell([5], 4.0, False, forget_rouge1=0.60, forget_refusal=0.0, retain_rouge1=1.0)
    refusing = Cell([2, 3], 4.0, True, forget_rouge1=0.05, forget_refusal=0.90, retain_rouge1=0.93)
    broken = Cell([0], 12.0, False, forget_rouge1=0.0, forget_refusal=0.30, retain_rouge1=0.40)
    kl = torch.tensor([[0.01, 0.20, 0.30]])
    old_layer, old_coeff, _, _ = probe_rule_choice(
        [5], [1.0, 2.0, 3.0], torch.tensor([[0.60, 0.05, 0.0]]), torch.tensor([[0.0, 0.9, 0.3]]), kl, kl_budget=0.05
    )
    assert (old_layer, old_coeff) == (5, 1.0)  # the old rule: the inert cell
    cells = [inert, refusing, broken]
    assert pick_cell(cells, min_refusal=0.5) == 1
    assert pick_cell([inert, broken], min_refusal=0.5) == 1  # nobody refuses enough: the most refusing one
    assert inert.score > refusing.score


def test_knowledge_lost_outside_the_retain_set_counts_against_a_cell():
    # TOFU forget10's shape: two cells refuse alike; the one keeping retain slightly better loses world facts
    costly = Cell([0], 2.0, True, forget_rouge1=0.09, forget_refusal=0.92, retain_rouge1=0.75, keep_rouge1=0.70)
    careful = Cell([4], 2.0, True, forget_rouge1=0.10, forget_refusal=0.90, retain_rouge1=0.71, keep_rouge1=0.95)
    assert pick_cell([costly, careful], min_refusal=0.5) == 1
    assert replace(costly, keep_rouge1=None).score < replace(careful, keep_rouge1=None).score  # without a keep set: the other way


def test_the_choice_on_the_toy_world_refuses_held_out_questions(fresh_toy_bridge, world):
    bridge = fresh_toy_bridge
    forget, retain, reference = world.split(world.entities[:1])
    retain = retain[::8]
    refusal = model_refusal(bridge, reference[:32])
    settings = EditSettings(refusal=refusal.target, refine=RefineSettings(steps=30))
    directions = directions_for(bridge, forget, reference[:64], settings)
    keep = [QA(qa.question) for qa in world.split(world.entities[:1])[1][1::16]]  # questions only: the model's own answers
    choice = choose_edit(
        bridge, forget, retain, refusal, directions, settings, ChoiceSettings(coeffs=(4.0, 8.0), candidates=1), layer_sets=[[1], [2, 3]],
        keep=keep,
    )
    assert choice.layers in ([1], [2, 3]) and set(choice.edits) == set(choice.layers)
    assert choice.refined and choice.predicted.forget_refusal >= 0.8 and choice.predicted.retain_rouge1 >= 0.9
    assert choice.predicted.keep_rouge1 >= 0.9 and choice.predicted.seen_retain_rouge1 >= 0.9
    final = choice.final  # the final edit judged itself: what the export will show, with intervals
    assert final.forget_refusal >= 0.8 and final.retain_rouge1 >= 0.9 and final.keep_rouge1 >= 0.9
    assert final.sizes == {"forget": 24, "retain": choice.sizes["retain_heldout"] + 32, "keep": choice.sizes["keep_heldout"]}
    low, high = final.intervals["forget_refusal"]
    assert low < final.forget_refusal <= high and high - low < 0.4  # Wilson, 24 questions
    assert choice.summary()["predicted"]["retain_rouge1"] == final.retain_rouge1 and choice.acceptable
    # refining starts from c <= refine_start_coeff (4): c = 8 is not screened
    assert [row["coeff"] for row in choice.screening] == [4.0, 4.0] and len(choice.cells) == 1
    assert choice.sizes["forget_heldout"] == 6 and choice.sizes["forget_solve"] == 18
    assert choice.sizes["keep_heldout"] + choice.sizes["keep_solve"] == len(keep) and choice.sizes["keep_heldout"] >= 1


def test_a_cell_below_the_retain_floor_never_wins_while_another_reaches_it():
    # the outside report's shape: the refusing cell costs a third of the retain answers, the careful one refuses less
    breaking = Cell([1, 2, 3], 4.0, True, forget_rouge1=0.05, forget_refusal=0.95, retain_rouge1=0.69)
    careful = Cell([1], 2.0, True, forget_rouge1=0.30, forget_refusal=0.60, retain_rouge1=0.93)
    assert breaking.score < careful.score  # the old trade would pick it
    assert pick_cell([breaking, careful], min_refusal=0.5, min_retain=0.9) == 1
    assert judge_verdict(careful, ChoiceSettings())[0] is False  # chosen, but refusing too little to export
    assert judge_verdict(breaking, ChoiceSettings())[0] is False
    generator = torch.Generator().manual_seed(0)
    for _ in range(500):  # any set of cells: the winner reaches the floor whenever one does
        values = torch.rand(int(torch.randint(1, 6, (1,), generator=generator)), 4, generator=generator).tolist()
        cells = [Cell([0], 2.0, True, forget_rouge1=a, forget_refusal=b, retain_rouge1=0.7 + 0.3 * c, keep_rouge1=None if d < 0.3 else 0.7 + 0.3 * d)
                 for a, b, c, d in values]
        winner = cells[pick_cell(cells, min_refusal=0.5, min_retain=0.9)]
        assert winner.reaches_floor(0.9) or not any(cell.reaches_floor(0.9) for cell in cells)


def test_with_nothing_acceptable_the_search_goes_on_with_behaviour_alone(fresh_toy_bridge, world, monkeypatch, tmp_path):
    import lunar_lens.choose.choice as choice_module

    judged = choice_module.judge
    def breaking(*args, **kwargs):  # every cell breaks retain
        measured, per_question = judged(*args, **kwargs)
        return measured | {"retain_rouge1": 0.5}, per_question

    monkeypatch.setattr(choice_module, "judge", breaking)
    bridge = fresh_toy_bridge
    forget, retain, reference = world.split(world.entities[:1])
    refusal = model_refusal(bridge, reference[:32])
    settings = EditSettings(refusal=refusal.target, refine=RefineSettings(steps=2))
    directions = directions_for(bridge, forget, reference[:64], settings)
    tried = {}
    for name, factor, layer_sets in (("all", 2, None), ("given", 2, [[1]]), ("off", 0, [[1]])):
        choice = choose_edit(
            bridge, forget, retain[::16], refusal, directions, settings, ChoiceSettings(coeffs=(4.0,), max_candidates=1, behaviour_factor=factor),
            layer_sets=layer_sets,
        )
        tried[name] = [(cell.layers, cell.coeff, cell.refine_steps) for cell in choice.cells]
        assert not choice.acceptable and "below the retain floor" in choice.verdict
        figure = save_localisation(None, tmp_path / name, choice=choice.summary())["choice"]  # cells beyond the screened sets too
        assert figure.stat().st_size > 20_000
    # the closed form at c 4, then refinement from ΔW = 0 (2 × 2 steps) on the screened layer set and on every layer's W_out ...
    best = tried["all"][0][0]  # the best screened of the two judged (`candidates` 2)
    assert [coeff for _, coeff, _ in tried["all"][:2]] == [4.0, 4.0] and tried["all"][2:] == [(best, 0.0, 4), ([0, 1, 2, 3, 4, 5], 0.0, 4)]
    # ... but only on the layer sets a caller named, and not at all without behaviour steps
    assert tried["given"] == [([1], 4.0, 2), ([1], 0.0, 4)] and tried["off"] == [([1], 4.0, 2)]
