"""What localisation measures (`LocaliseSettings`), what it found (`Localisation`) and the rule it applies."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from jaxtyping import Float

from lunar_lens.core.errors import LunarError
from lunar_lens.core.settings import Settings
from lunar_lens.edit.layers import EditSettings

DEFAULT_COEFFS = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0)
RULE = (
    "1. Side effects: a layer whose retain KL under steering with the grid's smallest c exceeds kl_slack × the "
    "lowest layer's is ranked last. "
    "2. Agreement: layers where patching the reference run's last-prompt-token residual recovers at least "
    "`agreement` of the refusal logit difference, and where ablating r_l lowers the refusal's log-probability, "
    "rank before layers where either probe disagrees. "
    "3. Within each group, layers rank by steering success: the forget log-odds of refusal against answer, "
    "averaged over the coefficient grid. "
    "4. Edit check: the closed-form edit of the top `calibrate_layers` layers is simulated at every c; cells whose "
    "retain KL exceeds kl_budget are dropped; the chosen (layer, c) has the lowest forget ROUGE-1 recall, then the "
    "highest refusal rate, then the smallest c, then the better probe rank (if no cell passes, the lowest retain "
    "KL wins). The ranking puts the checked layers first, in the order of their best cell."
)


@dataclass
class LocaliseSettings(Settings):
    """What the probes measure and how the rule decides. `edit` is the edit the choice is for: its
    positions, direction rule, refusal, ridge and retain-answer setting are probed."""

    edit: EditSettings = field(default_factory=EditSettings)
    score_tokens: int = 4  # log-odds over the first k tokens of the refusal and of the answer
    generate_tokens: int = 24  # greedy tokens generated per forget prompt
    max_prompts: int = 48  # per set, evenly spread over it
    patch_pairs: int = 16  # forget/reference prompt pairs patched
    patch_positions: int = 12  # last prompt positions patched
    agreement: float = 0.5  # patching recovery that counts as agreement
    kl_slack: float = 2.0  # steering retain-KL filter, relative to the best layer
    calibrate_layers: int = 2  # top-ranked layers whose edit is checked at every c
    kl_budget: float = 0.05  # retain KL (nats per token) an edit may cost
    batch_size: int = 96  # rows per probe forward: the teacher-forced forget rows (2 × max_prompts) in one
    generate_rows: int = 288  # rows greedily decoded together: the edit check decodes several c in one batch
    # steer-generate at every c, steer-KL above the smallest c, the ablation's retain KL and patching before the
    # last prompt token, for the figures; the rule needs only the steering log-odds at every c, the retain KL at
    # the smallest and patching at the last token (off: the rest are NaN). Off by default here as in `unlearn` and
    # `lunar-lens localise` and `--localisation` turn it on (the figures are their output)
    figure_probes: bool = False

    def __post_init__(self) -> None:
        counts = (self.score_tokens, self.generate_tokens, self.max_prompts, self.patch_pairs, self.patch_positions, self.calibrate_layers,
                  self.generate_rows)
        if min(counts) < 1:
            raise LunarError(
                "score_tokens, generate_tokens, max_prompts, patch_pairs, patch_positions, calibrate_layers and generate_rows must be ≥ 1"
            )


@dataclass
class Localisation:
    """Every score per layer (× coefficient), the patching map, the edit check and the rule's decision."""

    layers: list[int]
    coeffs: list[float]
    refusal: str
    direction_norms: list[float]
    baseline_logodds: float  # forget prompts, no intervention
    baseline_refusal_rate: float
    baseline_forget_rouge1: float
    steer_logodds: Float[torch.Tensor, "n_layers n_coeffs"]
    steer_refusal_rate: Float[torch.Tensor, "n_layers n_coeffs"]
    steer_forget_rouge1: Float[torch.Tensor, "n_layers n_coeffs"]  # vs the given answers, else the clean greedy ones
    steer_retain_kl: Float[torch.Tensor, "n_layers n_coeffs"]
    ablation_drop: Float[torch.Tensor, " n_layers"]  # refusal log-probability lost on reference prompts, nats per token
    ablation_retain_kl: Float[torch.Tensor, " n_layers"]
    patching: Float[torch.Tensor, "n_layers n_positions"]  # recovered fraction of the refusal logit difference
    patch_labels: list[str]  # offset from the end of the prompt and the first forget prompt's token
    edit_layers: list[int]  # the layers whose edit was checked
    edit_forget_rouge1: Float[torch.Tensor, "n_checked n_coeffs"]
    edit_refusal_rate: Float[torch.Tensor, "n_checked n_coeffs"]
    edit_retain_kl: Float[torch.Tensor, "n_checked n_coeffs"]
    ranking: list[int]
    best_layer: int
    best_coeff: float
    decision: dict
    sizes: dict  # prompts per set
    settings: LocaliseSettings

    def to_json(self) -> dict:
        """Every score, the ranking and the rule's decision (JSON-ready)."""
        return {key: value.tolist() if isinstance(value, torch.Tensor) else value for key, value in asdict(self).items()}

    def summary(self) -> dict:
        """The decision with the chosen layer's scores (for the unlearning report)."""
        row, checked = self.layers.index(self.best_layer), self.edit_layers.index(self.best_layer)
        column = self.coeffs.index(self.best_coeff)
        return {
            "ranking": self.ranking,
            "best_layer": self.best_layer,
            "best_coeff": self.best_coeff,
            "decision": self.decision,
            "sizes": self.sizes,
            "chosen": {
                "steer_logodds": float(self.steer_logodds[row, column]),
                "ablation_drop": float(self.ablation_drop[row]),
                "patching_last_token": float(self.patching[row, -1]),
                "edit_forget_rouge1": float(self.edit_forget_rouge1[checked, column]),
                "edit_refusal_rate": float(self.edit_refusal_rate[checked, column]),
                "edit_retain_kl": float(self.edit_retain_kl[checked, column]),
            },
        }
