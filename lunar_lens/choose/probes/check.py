"""The edit check: the closed-form edit of a layer, simulated by hooks at every c of the grid (its ΔW is
linear in c), scored on greedy forget answers and retain KL. No weight changes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformer_lens.model_bridge import TransformerBridge

from lunar_lens.choose.probes.measures import ProbeSets, answers_per_intervention, retain_kl
from lunar_lens.choose.probes.settings import LocaliseSettings
from lunar_lens.core.hooks import Hook
from lunar_lens.metrics.text import mean_rouge1, refusal_rate
from lunar_lens.model.weights import delta_hooks


def edit_scores(
    bridge: TransformerBridge, sets: ProbeSets, settings: LocaliseSettings, layer: int, delta: torch.Tensor, coeffs: Sequence[float]
) -> dict[str, list[float]]:
    """Forget ROUGE-1 recall, forget refusal rate and retain KL of the edit c·`delta` at `layer`, for each c.
    The greedy answers of several c are decoded in one batch of at most `generate_rows` rows (at least one c)."""
    scores: dict[str, list[float]] = {"forget_rouge1": [], "refusal_rate": [], "retain_kl": []}
    scale = torch.tensor([float(c) for c in coeffs])

    def hooks_for(indices: list[int]) -> list[Hook]:
        return delta_hooks({layer: delta}, scale[indices].repeat_interleave(len(sets.forget)))

    for answers in answers_per_intervention(bridge, sets, settings, hooks_for, len(coeffs)):
        scores["forget_rouge1"].append(mean_rouge1(answers, sets.forget_answers))
        scores["refusal_rate"].append(refusal_rate(answers, references=[sets.refusal]))
    interventions = [lambda chunk, hooks=delta_hooks({layer: coeff * delta}): hooks for coeff in coeffs]
    scores["retain_kl"] = retain_kl(bridge, sets, settings, interventions)
    return scores
