"""`--layer auto --coeff auto`: choose the edit by what users see.

Forget, retain and reference sets are split into a part the edit is solved on and a held-out part. Every
candidate — a single layer or a contiguous layer set, at every c of the grid — is the closed-form edit
solved on the solve part (one statistics pass for every layer; ΔW is linear in c), simulated by hooks.

A *keep* set (optional: questions about knowledge the user did not list, answered by the model itself) is
treated as retain rows everywhere, but judged on its own: the retain set alone does not show what an edit
costs elsewhere (TOFU: held-out retain ROUGE-1 preferred the layer that cost a fifth of the world facts).

1. **Screening** (teacher-forced, one forward per cell): the held-out forget prompts' loss on the model's
   own refusal, plus `retain_weight` × the rise of the held-out retain (and keep) answers' loss. The best c
   of each layer set scores it; the `candidates` best layer sets go on, and further ones in screening order
   (up to `max_candidates`) while none of those judged is acceptable (step 5). When refining, only the c a
   refinement starts from (≤ `refine_start_coeff`) are screened.
2. **Refinement** (when `EditSettings.refine.steps` > 0): each candidate's edit is trained on behaviour
   (`lunar_lens.edit.refine`) on the solve part. When none judged is acceptable, the search goes on with
   behaviour alone: refinement from ΔW = 0 (c = 0, up to `behaviour_factor` × its steps) on the best screened layer set,
   then (unless the caller named the layer sets) on every layer's W_out.
3. **The decision**, from greedy generations of each candidate's edit (closed form and refined) on the
   held-out part: forget refusal rate and ROUGE-1 recall, retain (and keep) ROUGE-1 recall of the unedited
   model's own answers (what the edit must keep, at the judge's length). Retain is a constraint, not a
   trade: a cell whose held-out retain (or keep) ROUGE-1 is below `min_retain` of the unedited model's
   cannot win while another reaches it. Among those, a cell refusing less than `min_refusal` of the
   held-out forget questions cannot win while any cell refuses that often; among the rest the lowest
   `score` = ‖(forget ROUGE-1, 1 − forget refusal, 1 − retain ROUGE-1, 1 − keep ROUGE-1)‖ wins.
4. **The prediction**: the chosen cell's edit (nothing is solved twice), once it has learnt every forget
   and retain question (`finish_share`), is judged itself: forget refusal and ROUGE-1 and retain ROUGE-1 on
   questions it learnt (up to `max_eval` of each part), keep ROUGE-1 on held-out keep questions it never
   saw, each with a 95 % interval (`Prediction`). No number rests on the few held-out forget questions alone.
5. **The verdict**: the edit is *acceptable* when the chosen cell reaches the retain floor, the final edit's
   retain and keep are not wholly below it (the top of their 95 % intervals), and its forget refusal is at
   least `target_refusal`;
   `lunar_lens.pipeline.unlearn` exports nothing else unless told to.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from transformer_lens.model_bridge import TransformerBridge

from lunar_lens.choose.judge import Cell, ChoiceSettings, Edits, Prediction, judge, judge_verdict, known, predict
from lunar_lens.core.errors import LunarError
from lunar_lens.core.host_memory import release_freed
from lunar_lens.core.progress import bar
from lunar_lens.data.prompts import first_answer_tokens, rows_of, tokenize
from lunar_lens.data.qa import QA, spread
from lunar_lens.directions.mean_difference import Directions
from lunar_lens.directions.refusals import ModelRefusal
from lunar_lens.edit.layers import EditSettings, unit_solutions
from lunar_lens.edit.refine import RefineSettings, answer_cross_entropy, refine_edits
from lunar_lens.metrics.text import rouge1
from lunar_lens.model.generation import own_answers
from lunar_lens.model.names import n_layers
from lunar_lens.model.weights import delta_hooks, w_out


@dataclass
class Choice:
    """The chosen edit, its held-out prediction, and everything that was tried."""

    layers: list[int]
    coeff: float
    refined: bool
    edits: Edits
    predicted: Cell  # the chosen candidate, as judged on the held-out part
    final: Prediction  # the final edit's own numbers: the prediction for the export
    cells: list[Cell]
    screening: list[dict]
    sizes: dict
    seconds: dict = field(default_factory=dict)
    acceptable: bool = True  # the verdict (module docstring, step 5)
    verdict: str = ""  # why, in one line

    def summary(self) -> dict:
        return {
            "layers": self.layers,
            "coeff": self.coeff,
            "refined": self.refined,
            "acceptable": self.acceptable,
            "verdict": self.verdict,
            "predicted_heldout": self.predicted.to_json(),
            "predicted": self.final.to_json(),
            "cells": [cell.to_json() for cell in self.cells],
            "screening": self.screening,
            "sizes": self.sizes,
            "seconds": self.seconds,
            "rule": __doc__.split("\n\n", 1)[1].strip(),
        }


def holdout_split(items: Sequence[QA], share: float) -> tuple[list[QA], list[QA]]:
    """(solve part, held-out part): every k-th item (k ≈ 1/share) held out, at least one of two or more."""
    if len(items) < 2:
        return list(items), list(items)
    step = max(2, round(1 / share))
    held = [qa for i, qa in enumerate(items) if i % step == step - 1] or [items[-1]]
    chosen = {id(qa) for qa in held}
    return [qa for qa in items if id(qa) not in chosen], held


def contiguous_sets(n: int, max_width: int) -> list[list[int]]:
    """Every single layer and every contiguous run of up to `max_width` layers."""
    return [list(range(start, start + width)) for width in range(1, max_width + 1) for start in range(n - width + 1)]


def choose_edit(
    bridge: TransformerBridge,
    forget: Sequence[QA],
    retain: Sequence[QA],
    refusal: ModelRefusal,
    directions: Directions,
    edit: EditSettings,
    settings: ChoiceSettings | None = None,
    layer_sets: Sequence[Sequence[int]] | None = None,
    progress: bool = False,
    keep: Sequence[QA] = (),
) -> Choice:
    """Choose the layer set (among `layer_sets`; default: every contiguous run of up to `max_width`
    layers) and c (and refine) as the module docstring says; no weight changes. `keep`: questions about
    knowledge the user did not list (the model's own answers where they carry none), judged on their own."""
    settings = settings or ChoiceSettings()
    started = time.perf_counter()
    forget_solve, forget_held = holdout_split(forget, settings.holdout)
    retain_solve, retain_held = holdout_split(retain, settings.holdout)
    # retain is judged against the model's own answers at the judge's length (what the edit must keep: a long
    # reference answer cut at `generate_tokens` would read as lost knowledge; TOFU: 0.85 against 0.96 measured),
    # on questions the model knows: its answer agrees with the given one (ROUGE-1 precision >= `known_precision`).
    # A wrong answer is no knowledge to lose, and it changes under any edit (a lightly trained model's mostly are)
    pool = 3 * settings.max_eval
    given = [*retain_held[:pool], *spread(retain_solve, pool)]
    parts = [list(retain), list(keep), forget_held[: settings.max_eval], spread(forget_solve, settings.max_eval), [QA(qa.question) for qa in given]]
    answered = iter(own_answers(bridge, [qa for part in parts for qa in part], settings.generate_tokens))  # one generation pass
    retain, keep, forget_held, forget_seen, asked_retain = ([next(answered) for _ in part] for part in parts)
    retain_solve, retain_held = holdout_split(retain, settings.holdout)
    keep_solve, keep_held = holdout_split(keep, settings.holdout) if keep else ([], [])
    agree = rouge1([qa.answer for qa in asked_retain], [qa.answer or own.answer for qa, own in zip(given, asked_retain)], "precision")
    n_held = min(len(retain_held), pool)
    retain_judged, retain_seen = (known(asked_retain[part], agree[part], settings) for part in (slice(0, n_held), slice(n_held, None)))
    keep_judged = keep_held[: settings.max_eval]
    fit_retain = retain_solve + keep_solve  # the rows the edit keeps: keep rows are retain rows, judged apart
    sets = [sorted(layer_set) for layer_set in layer_sets] if layer_sets else contiguous_sets(n_layers(bridge), settings.max_width)
    layers = sorted({layer for layer_set in sets for layer in layer_set})
    # each layer's unit edit as its factors (u, v): the dense ΔW of every layer at once would rival the weights
    solutions = unit_solutions(bridge, layers, forget_solve, fit_retain, refusal.target, directions, edit)
    units = {layer: (solution.u, solution.v) for layer, solution in zip(layers, solutions)}
    seconds = {"statistics": time.perf_counter() - started}

    # 1. screening, teacher-forced: one forward per layer set, every c in it (rows repeated, scaled per row)
    questions = [qa.question for qa in [*forget_held, *retain_judged, *keep_judged]]
    answers = [refusal.target] * len(forget_held) + [qa.answer for qa in [*retain_judged, *keep_judged]]
    rows_tf = first_answer_tokens(tokenize(bridge.tokenizer, questions, answers), settings.screen_tokens, bridge.tokenizer.pad_token_id)
    n_forget, n_rows = len(forget_held), len(questions)
    refining = bool(edit.refine.steps)
    screened = [c for c in settings.coeffs if c <= settings.refine_start_coeff] if refining else list(settings.coeffs)
    screened = screened or [min(settings.coeffs)]  # a refinement starts from these c only
    coeffs = torch.tensor(screened, dtype=torch.float32)
    repeated = rows_of(rows_tf, torch.arange(n_rows).repeat(len(coeffs)))
    scale = coeffs.repeat_interleave(n_rows)
    screening = []
    with torch.no_grad():
        base_retain = float(answer_cross_entropy(bridge, rows_tf, [], per_row=True)[n_forget:].mean())
        for layer_set in bar(sets, "screening" if progress else None):
            edits = {layer: units[layer] for layer in layer_set}
            losses = answer_cross_entropy(bridge, repeated, lambda rows, edits=edits: delta_hooks(edits, scale[rows]), per_row=True)
            for coeff, per_row in zip(screened, losses.view(len(coeffs), n_rows)):
                forget_loss, retain_rise = float(per_row[:n_forget].mean()), float(per_row[n_forget:].mean()) - base_retain
                proxy = forget_loss + settings.retain_weight * max(0.0, retain_rise)
                screening.append({"layers": layer_set, "coeff": coeff, "forget_loss": forget_loss, "retain_rise": retain_rise, "proxy": proxy})
    best_per_set = {}
    for row in screening:
        key = tuple(row["layers"])
        if key not in best_per_set or row["proxy"] < best_per_set[key]["proxy"]:
            best_per_set[key] = row
    candidates = sorted(best_per_set.values(), key=lambda row: row["proxy"])[: max(settings.candidates, settings.max_candidates)]
    seconds["screening"] = time.perf_counter() - started - seconds["statistics"]

    # 2. and 3. refinement and the decision by greedy generation on the held-out part
    cells: list[Cell] = []
    edits_of: list[Edits] = []
    # the refinement's monitor: the held-out forget questions (the refusal) and retain and keep questions (the model's answers)
    watched = [*retain_judged, *keep_judged]
    monitor = (([qa.question for qa in forget_held], [refusal.target] * len(forget_held)), ([qa.question for qa in watched], [qa.answer for qa in watched]))

    judged_sets = (forget_held, forget_seen, retain_judged, keep_judged, retain_seen)
    judged_of: list[dict] = []

    def judge_candidate(layer_set: list[int], start: float, edits: Edits, refine: RefineSettings) -> None:
        """Refine `edits` (started at c = `start`) and judge them by greedy generation: a new cell."""
        steps = 0
        if refining:
            refined = refine_edits(bridge, edits, *refine_rows(forget_solve, fit_retain, refusal), refine, progress, monitor=monitor)
            edits, steps = refined.edits, refined.steps
        measured, judged = judge(bridge, edits, *judged_sets, refusal, settings.generate_tokens)
        cells.append(Cell(layer_set, start, refining, **measured, refine_steps=steps))
        edits_of.append(edits)
        judged_of.append(judged)
        release_freed()  # a candidate's passes leave freed memory that the next one's peak would add to

    def found() -> bool:
        return any(judge_verdict(cell, settings)[0] for cell in cells)

    for row in bar(candidates, "judging candidates" if progress else None):
        if len(cells) >= settings.candidates and found():
            break  # an acceptable edit is among those judged: the search goes no further
        start = min(row["coeff"], settings.refine_start_coeff) if refining else row["coeff"]
        judge_candidate(row["layers"], start, {layer: start * (units[layer][0] @ units[layer][1].T) for layer in row["layers"]}, edit.refine)
    if refining and settings.behaviour_factor and not found():
        # still nothing acceptable: behaviour only, refined from ΔW = 0 (c = 0), on the best screened layer set and on every layer's W_out
        behaviour = replace(edit.refine, steps=settings.behaviour_factor * edit.refine.steps)
        every = [] if layer_sets else [tuple(range(n_layers(bridge)))]  # the caller's layer sets are kept to
        for layer_set in dict.fromkeys([tuple(candidates[0]["layers"]), *every]):
            if found():
                break
            judge_candidate(list(layer_set), 0.0, {layer: torch.zeros(w_out(bridge, layer).shape) for layer in layer_set}, behaviour)
    best = pick_cell(cells, settings.min_refusal, settings.min_retain)
    seconds["judging"] = time.perf_counter() - started - seconds["statistics"] - seconds["screening"]
    chosen, edits, judged = cells[best], edits_of[best], judged_of[best]
    finished = bool(refining and settings.finish_share)
    if finished:
        # the chosen edit goes on learning from every forget and retain question, held-out ones too; the held-out keep
        # questions stay unseen, so that the prediction still measures knowledge nobody listed
        finish = replace(edit.refine, steps=max(1, round(edit.refine.steps * settings.finish_share)))
        edits = refine_edits(bridge, edits, *refine_rows(forget, retain + keep_solve, refusal), finish, progress, monitor=monitor).edits
    seconds["finish"] = time.perf_counter() - started - sum(seconds.values())
    if finished:  # the final edit judged itself (without a finish it is the chosen cell's edit, already judged)
        judged = judge(bridge, edits, *judged_sets, refusal, settings.generate_tokens)[1]
    final = predict(judged, chosen)
    seconds["prediction"] = time.perf_counter() - started - sum(seconds.values())
    sizes = {
        "forget_solve": len(forget_solve), "forget_heldout": len(forget_held), "retain_solve": len(retain_solve),
        "retain_heldout": len(retain_judged), "keep_solve": len(keep_solve), "keep_heldout": len(keep_judged),
    }
    acceptable, verdict = judge_verdict(chosen, settings, final)
    return Choice(chosen.layers, chosen.coeff, chosen.refined, edits, chosen, final, cells, screening, sizes, seconds, acceptable, verdict)


def pick_cell(cells: Sequence[Cell], min_refusal: float, min_retain: float = 0.0) -> int:
    """Step 3's decision: among cells that reach the retain floor `min_retain` (all of them when none does),
    those refusing at least `min_refusal` of the held-out forget questions, the lowest score (then the
    smaller c); when none refuses that often, the most refusing one. A cell below the floor cannot win against
    one that reaches it, and one that leaves the forget set answered cannot win against one that refuses."""
    if not cells:
        raise LunarError("no candidate edit was judged: give at least one layer set and one coefficient")
    kept = [i for i, cell in enumerate(cells) if cell.reaches_floor(min_retain)] or list(range(len(cells)))
    refusing = [i for i in kept if cells[i].forget_refusal >= min_refusal]
    if refusing:
        return min(refusing, key=lambda i: (cells[i].score, cells[i].coeff))
    return min(kept, key=lambda i: (-cells[i].forget_refusal, cells[i].score, cells[i].coeff))


def refine_rows(forget: Sequence[QA], retain: Sequence[QA], refusal: ModelRefusal) -> tuple[list[str], list[str], list[str], list[str]]:
    """`refine_edits`' forget questions, their refusals, retain questions and answers."""
    return [qa.question for qa in forget], [refusal.target] * len(forget), [qa.question for qa in retain], [qa.answer for qa in retain]
