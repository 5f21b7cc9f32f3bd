"""The selection rule (`RULE`), as pure functions of the scores: the probe ranking, then the choice among
the checked edits."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float


def rank_layers(
    layers: Sequence[int],
    steer_logodds: Float[torch.Tensor, "n_layers n_coeffs"],
    steer_retain_kl: Float[torch.Tensor, " n_layers"],
    ablation_drop: Float[torch.Tensor, " n_layers"],
    patching_last: Float[torch.Tensor, " n_layers"],
    agreement: float = 0.5,
    kl_slack: float = 2.0,
) -> tuple[list[int], dict]:
    """Steps 1–3 of RULE: the probe ranking of `layers` (best first) and why."""
    too_costly = steer_retain_kl > kl_slack * steer_retain_kl.min()
    agrees = (patching_last >= agreement) & (ablation_drop > 0)
    success = steer_logodds.mean(dim=1)
    order = sorted(range(len(layers)), key=lambda i: (bool(too_costly[i]), not agrees[i], -float(success[i])))
    why = {
        "side_effect_filtered": [layers[i] for i in range(len(layers)) if too_costly[i]],
        "probes_disagree": [layers[i] for i in range(len(layers)) if not agrees[i]],
        "steering_success": {layers[i]: float(success[i]) for i in range(len(layers))},
    }
    return [layers[i] for i in order], why


def choose_checked_edit(
    checked: Sequence[int],
    coeffs: Sequence[float],
    forget_rouge1: Float[torch.Tensor, "n_checked n_coeffs"],
    refusal_rate: Float[torch.Tensor, "n_checked n_coeffs"],
    retain_kl: Float[torch.Tensor, "n_checked n_coeffs"],
    kl_budget: float,
) -> tuple[int, float, list[int], dict]:
    """Step 4 of RULE on the checked layers (given in probe order): (layer, c, their order, why)."""
    cells = [(i, j) for i in range(len(checked)) for j in range(len(coeffs))]
    pool = [cell for cell in cells if retain_kl[cell] <= kl_budget]

    def key(cell: tuple[int, int]) -> tuple:
        if not pool:  # nothing within the budget: the cheapest cell
            return (float(retain_kl[cell]), coeffs[cell[1]], cell[0])
        return (float(forget_rouge1[cell]), -float(refusal_rate[cell]), coeffs[cell[1]], cell[0])

    candidates = pool or cells
    best = min(candidates, key=key)
    per_layer = {i: min((cell for cell in candidates if cell[0] == i), key=key) for i in sorted({cell[0] for cell in candidates})}
    order = sorted(range(len(checked)), key=lambda i: key(per_layer[i]) if i in per_layer else (float("inf"),))
    why = {
        "cells_within_kl_budget": len(pool),
        "best_coeff_per_checked_layer": {checked[i]: coeffs[cell[1]] for i, cell in per_layer.items()},
    }
    return checked[best[0]], float(coeffs[best[1]]), [checked[i] for i in order], why
