"""The entry points: `localise` runs every probe, checks the best layers' edits and applies the rule;
`Localisation.best_layer` and `best_coeff` are the probes' rule (a diagnostic: `choose.choice` decides the edit)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformer_lens.model_bridge import TransformerBridge

from lunar_lens.choose.probes.check import edit_scores
from lunar_lens.choose.probes.measures import ablation_scores, forget_logodds, patching_map, prepare_sets, steering_scores
from lunar_lens.choose.probes.passes import no_hooks
from lunar_lens.choose.probes.rule import choose_checked_edit, rank_layers
from lunar_lens.choose.probes.settings import DEFAULT_COEFFS, RULE, Localisation, LocaliseSettings
from lunar_lens.core.errors import LunarError
from lunar_lens.core.progress import bar as progress_bar
from lunar_lens.data.qa import QA
from lunar_lens.directions.mean_difference import Directions, compute_directions
from lunar_lens.edit.layers import unit_solutions
from lunar_lens.metrics.text import mean_rouge1, refusal_rate
from lunar_lens.model.names import check_layer, n_layers


def check_coeffs(coeffs: Sequence[float]) -> list[float]:
    """The coefficients c to try, sorted, refused unless there is one and each is a finite number > 0."""
    if not coeffs or not all(math.isfinite(c) and c > 0 for c in coeffs):
        raise LunarError(f"coefficients {list(coeffs)} must be finite positive numbers: e.g. {{coeffs}} 1,2,4,8", ("coeffs",))
    return sorted({float(c) for c in coeffs})


def localise(
    bridge: TransformerBridge,
    forget: Sequence[QA],
    retain: Sequence[QA],
    reference: Sequence[QA],
    coeffs: Sequence[float] = DEFAULT_COEFFS,
    layers: Sequence[int] | None = None,
    settings: LocaliseSettings | None = None,
    directions: Directions | None = None,
    progress: bool = False,
) -> Localisation:
    """Run every probe on every layer (× coefficient), check the best layers' edits, apply the rule (the probes
    that only feed the figures run with `settings.figure_probes`, off by default)."""
    settings = settings or LocaliseSettings()
    for name, items in (("forget", forget), ("retain", retain), ("reference", reference)):
        if not items:
            raise LunarError(f"the {name} set is empty: localisation needs forget, retain and reference questions")
    coeffs = check_coeffs(coeffs)
    layers = list(range(n_layers(bridge))) if layers is None else sorted({check_layer(bridge, layer) for layer in layers})
    sets = prepare_sets(bridge, forget, retain, reference, settings)
    with_answer = settings.edit.positions.endswith("+answer")
    if directions is None:
        directions = compute_directions(
            bridge, [qa.question for qa in forget], [qa.question for qa in reference], settings.edit.direction_rule,
            settings.batch_size, progress, refusal=sets.refusal if with_answer else None,
        )
    if with_answer and directions.answer_vectors is None:
        raise LunarError(f"positions {settings.edit.positions} need per-answer-token directions: compute them with compute_directions(..., refusal=...)")

    steering = steering_scores(bridge, sets, settings, layers, directions, coeffs, progress)
    ablation = torch.zeros(2, len(layers))
    for index, layer in enumerate(progress_bar(layers, "ablation" if progress else None)):
        ablation[:, index] = torch.tensor(ablation_scores(bridge, sets, settings, layer, directions[layer].float()))
    patching, labels = patching_map(bridge, sets, settings, layers, progress)
    probe_ranking, probe_why = rank_layers(
        layers, steering["logodds"], steering["retain_kl"][:, 0], ablation[0], patching[:, -1], settings.agreement, settings.kl_slack
    )

    checked = probe_ranking[: settings.calibrate_layers]
    edit = {key: torch.zeros(len(checked), len(coeffs)) for key in ("forget_rouge1", "refusal_rate", "retain_kl")}
    deltas = [unit.delta for unit in unit_solutions(bridge, checked, forget, retain, sets.refusal, directions, settings.edit)]
    for index, (layer, delta) in enumerate(zip(progress_bar(checked, "edit check" if progress else None), deltas)):
        for key, values in edit_scores(bridge, sets, settings, layer, delta, coeffs).items():
            edit[key][index] = torch.tensor(values)
    best_layer, best_coeff, checked_order, edit_why = choose_checked_edit(
        checked, coeffs, edit["forget_rouge1"], edit["refusal_rate"], edit["retain_kl"], settings.kl_budget
    )
    ranking = checked_order + [layer for layer in probe_ranking if layer not in checked]
    nan = float("nan")  # the figures' no-steering baselines
    (no_steering,) = forget_logodds(bridge, sets, settings, [no_hooks]) if settings.figure_probes else (nan,)
    return Localisation(
        layers=layers,
        coeffs=coeffs,
        refusal=sets.refusal,
        direction_norms=[directions.norms[layer] for layer in layers],
        baseline_logodds=no_steering,
        baseline_refusal_rate=refusal_rate(sets.baseline_answers, references=[sets.refusal]) if sets.baseline_answers else nan,
        baseline_forget_rouge1=mean_rouge1(sets.baseline_answers, sets.forget_answers) if sets.baseline_answers else nan,
        steer_logodds=steering["logodds"],
        steer_refusal_rate=steering["refusal_rate"],
        steer_forget_rouge1=steering["forget_rouge1"],
        steer_retain_kl=steering["retain_kl"],
        ablation_drop=ablation[0],
        ablation_retain_kl=ablation[1],
        patching=patching,
        patch_labels=labels,
        edit_layers=checked,
        edit_forget_rouge1=edit["forget_rouge1"],
        edit_refusal_rate=edit["refusal_rate"],
        edit_retain_kl=edit["retain_kl"],
        ranking=ranking,
        best_layer=best_layer,
        best_coeff=best_coeff,
        decision={"rule": RULE, "probe_ranking": probe_ranking, **probe_why, **edit_why},
        sizes={"forget": len(sets.forget), "retain": len(sets.retain_counts), "reference": len(sets.reference_questions)},
        settings=settings,
    )
