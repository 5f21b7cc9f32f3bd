"""What the choice weighs and how it judges: its settings (`ChoiceSettings`), a candidate (`Cell`), greedy answers of
held-out and seen questions scored (forget refusal, ROUGE-1, retain on questions the model knows), the prediction
with 95 % intervals, and the verdict against the floors."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from jaxtyping import Float
from transformer_lens.model_bridge import TransformerBridge

from lunar_lens.core.errors import LunarError
from lunar_lens.core.settings import Settings
from lunar_lens.data.qa import QA
from lunar_lens.directions.refusals import ModelRefusal
from lunar_lens.metrics.text import is_refusal, mean_interval, rate_interval, rouge_recall
from lunar_lens.model.generation import generate_answers
from lunar_lens.model.weights import delta_hooks

Edits = dict[int, Float[torch.Tensor, "d_mlp d_model"]]


@dataclass
class ChoiceSettings(Settings):
    """How the automatic choice splits the data and what it tries."""

    holdout: float = 0.25  # share of each set held out to judge the candidates
    coeffs: tuple[float, ...] = (2.0, 4.0, 8.0, 12.0)
    max_width: int = 3  # contiguous layer sets of up to this many layers
    candidates: int = 2  # layer sets judged by greedy generation (and refined) ...
    max_candidates: int = 6  # ... and more, in screening order, while none judged so far is acceptable
    max_eval: int = 32  # held-out questions per set, at most
    known_precision: float = 0.5  # a retain question is known when the model's answer agrees this much with the given one (ROUGE-1 precision)
    generate_tokens: int = 32
    screen_tokens: int = 8  # teacher-forced answer tokens scored while screening
    retain_weight: float = 4.0  # screening: weight of the retain loss's rise
    min_refusal: float = 0.5  # a cell refusing less than this cannot win while another refuses more
    min_retain: float = 0.9  # the floor: held-out retain (and keep) ROUGE-1 at least this share of the unedited model's
    target_refusal: float = 0.8  # an acceptable edit is predicted to refuse at least this share of the forget set
    finish_share: float = 0.2  # the chosen refined edit then trains this share of the steps on every question
    # when no candidate is acceptable: refinement from ΔW = 0 (behaviour only, c = 0) on the best screened layer
    # set and on every layer's W_out, for at most this many times the refinement's steps (the monitor stops it
    # earlier; 0: never)
    behaviour_factor: int = 4
    # refinement starts from the closed form at c = min(the layer set's screened c, this): larger starts cost
    # knowledge the user did not list (PISTOL, experiments/refusal_frontier.py)
    refine_start_coeff: float = 4.0

    def __post_init__(self) -> None:
        if not 0 < self.holdout < 1:
            raise LunarError(f"holdout={self.holdout}: the held-out share must lie between 0 and 1, e.g. 0.25")
        if not self.coeffs or min(self.coeffs) <= 0:
            raise LunarError(f"coefficients {list(self.coeffs)} must be positive numbers, e.g. (2, 4, 8)")
        if not 0 <= self.min_retain <= 1 or not 0 <= self.target_refusal <= 1:
            raise LunarError(
                f"{{min_retain}} {self.min_retain} and the target refusal {self.target_refusal} are shares: give numbers from 0 to 1", ("min_retain",)
            )
        if min(self.max_width, self.candidates, self.max_eval, self.generate_tokens, self.screen_tokens) < 1:
            raise LunarError("max_width, candidates, max_eval, generate_tokens and screen_tokens must be >= 1")


@dataclass
class Cell:
    """One simulated edit judged by greedy generation: on the held-out part (the decision) and on forget and
    retain questions it was solved on (what the exported model, which learns every question, will show)."""

    layers: list[int]
    coeff: float
    refined: bool
    forget_rouge1: float  # held-out
    forget_refusal: float  # held-out
    retain_rouge1: float  # held-out: knowledge the edit was not shown
    seen_forget_rouge1: float | None = None
    seen_forget_refusal: float | None = None
    keep_rouge1: float | None = None  # held-out keep questions (None: no keep set)
    seen_retain_rouge1: float | None = None
    refine_steps: int = 0  # steps its refinement trained before the monitor stopped it

    def reaches_floor(self, min_retain: float) -> bool:
        """Held-out retain and keep ROUGE-1 at least `min_retain` of the unedited model's (its own answers: 1)."""
        return self.retain_rouge1 >= min_retain - 1e-9 and (self.keep_rouge1 is None or self.keep_rouge1 >= min_retain - 1e-9)

    @property
    def score(self) -> float:
        keep = 0.0 if self.keep_rouge1 is None else 1.0 - self.keep_rouge1
        return math.hypot(self.forget_rouge1, 1.0 - self.forget_refusal, 1.0 - self.retain_rouge1, keep)

    def to_json(self) -> dict:
        return {**asdict(self), "score": self.score}




@dataclass
class Prediction:
    """What the exported model should measure, from greedy generations of the final edit itself (the one
    exported): forget refusal and ROUGE-1, and retain ROUGE-1, on questions it learnt (as the exported model
    is scored on the user's sets), keep ROUGE-1 on keep questions it never saw (knowledge nobody listed), each
    with a 95 % interval (Wilson for the refusal rate, a bootstrap for the means) and its number of questions."""

    forget_refusal: float
    forget_rouge1: float
    retain_rouge1: float
    retain_heldout_rouge1: float  # the chosen candidate's on retain questions it was not shown
    keep_rouge1: float | None
    intervals: dict[str, tuple[float, float]]
    sizes: dict[str, int]

    @property
    def deviation_score(self) -> float:
        return 100 * math.hypot(self.forget_rouge1, 1.0 - self.retain_rouge1)

    def to_json(self) -> dict:
        return {**asdict(self), "deviation_score": self.deviation_score}


@torch.no_grad()
def judged_answers(
    bridge: TransformerBridge, edits: Edits, groups: dict[str, Sequence[QA]], refusal: ModelRefusal, tokens: int
) -> dict[str, tuple[list[float], list[bool]]]:
    """Greedy answers with `edits` simulated, every group in one batch: per group, each question's ROUGE-1
    recall of its answer and whether the answer is a refusal."""
    items = [qa for group in groups.values() for qa in group]
    with bridge.hooks(fwd_hooks=delta_hooks(edits)):
        answers = generate_answers(bridge, [qa.question for qa in items], tokens, batch_size=len(items))
    recall = rouge_recall(answers, [qa.answer for qa in items])["rouge1"]
    refused = [is_refusal(answer, references=refusal.refusals) for answer in answers]
    judged, start = {}, 0
    for name, group in groups.items():
        judged[name], start = (recall[start : start + len(group)], refused[start : start + len(group)]), start + len(group)
    return judged


def known(items: Sequence[QA], agreement: Sequence[float], settings: ChoiceSettings) -> list[QA]:
    """The first `max_eval` of `items` whose answer agrees with the given one (`known_precision`); all of the
    first `max_eval` when fewer than a quarter of those agree (a model that knows little is judged on what it says)."""
    chosen = [qa for qa, share in zip(items, agreement) if share >= settings.known_precision][: settings.max_eval]
    return chosen if len(chosen) >= settings.max_eval / 4 else list(items[: settings.max_eval])


def mean(values: Sequence[float] | Sequence[bool]) -> float:
    return sum(values) / max(1, len(values))


GROUPS = ("forget", "retain", "seen", "keep", "seen_retain")  # what `judge` asks: held-out and seen forget, held-out and seen retain, keep


def judge(
    bridge: TransformerBridge, edits: Edits, forget: Sequence[QA], seen: Sequence[QA], retain: Sequence[QA], keep: Sequence[QA],
    seen_retain: Sequence[QA], refusal: ModelRefusal, tokens: int,
) -> tuple[dict[str, float | None], dict[str, tuple[list[float], list[bool]]]]:
    """`Cell`'s measured fields (`judged_answers`): forget ROUGE-1 and refusal rate on the held-out `forget`
    questions and on `seen` ones, retain ROUGE-1 on `retain` and on `seen_retain`, keep ROUGE-1 on `keep`
    (None when empty); and the per-question judgement (`predict` reads it)."""
    judged = judged_answers(bridge, edits, dict(zip(GROUPS, (forget, retain, seen, keep, seen_retain))), refusal, tokens)
    measured = {
        "forget_rouge1": mean(judged["forget"][0]), "forget_refusal": mean(judged["forget"][1]), "retain_rouge1": mean(judged["retain"][0]),
        "seen_forget_rouge1": mean(judged["seen"][0]), "seen_forget_refusal": mean(judged["seen"][1]),
        "keep_rouge1": mean(judged["keep"][0]) if keep else None, "seen_retain_rouge1": mean(judged["seen_retain"][0]),
    }
    return measured, judged


def predict(judged: dict[str, tuple[list[float], list[bool]]], chosen: Cell) -> Prediction:
    """The `Prediction` of the final edit from its judgement (`judge`): forget and retain, held-out and seen
    together (it learnt them all), keep questions it never saw."""
    forget_recall, refused = judged["forget"][0] + judged["seen"][0], judged["forget"][1] + judged["seen"][1]
    retain_recall, keep_recall = judged["retain"][0] + judged["seen_retain"][0], judged["keep"][0]
    intervals = {
        "forget_refusal": rate_interval(sum(refused), len(refused)), "forget_rouge1": mean_interval(forget_recall),
        "retain_rouge1": mean_interval(retain_recall), **({"keep_rouge1": mean_interval(keep_recall)} if keep_recall else {}),
    }
    return Prediction(
        mean(refused), mean(forget_recall), mean(retain_recall), chosen.retain_rouge1, mean(keep_recall) if keep_recall else None, intervals,
        {"forget": len(refused), "retain": len(retain_recall), "keep": len(keep_recall)},
    )


def judge_verdict(cell: Cell, settings: ChoiceSettings, final: Prediction | None = None) -> tuple[bool, str]:
    """Step 5: whether the chosen `cell` may be exported (and, once made, the `final` edit: its own refusal,
    retain and keep must hold too), and a line with the predicted numbers."""
    refusal = cell.seen_forget_refusal if cell.seen_forget_refusal is not None else cell.forget_refusal
    numbers = (
        f"layers {','.join(map(str, cell.layers))}, c {cell.coeff:g}: held-out retain ROUGE-1 {cell.retain_rouge1:.2f}"
        + ("" if cell.keep_rouge1 is None else f", keep ROUGE-1 {cell.keep_rouge1:.2f}")
    )
    problems = []
    if not cell.reaches_floor(settings.min_retain):
        problems.append(f"below the retain floor {settings.min_retain:g}")
    if final is not None:
        refusal = final.forget_refusal
        low, high = final.intervals["forget_refusal"]
        numbers += f"; the final edit: forget refusal {refusal:.2f} (95 % {low:.2f}–{high:.2f}), retain ROUGE-1 {final.retain_rouge1:.2f}"
        numbers += "" if final.keep_rouge1 is None else f", keep ROUGE-1 {final.keep_rouge1:.2f}"
        # below the floor when the whole 95 % interval is (a mean of two keep questions is not a measurement)
        highs = [final.intervals[key][1] for key in ("retain_rouge1", "keep_rouge1") if key in final.intervals]
        if cell.reaches_floor(settings.min_retain) and min(highs) < settings.min_retain - 1e-9:
            problems.append(f"the final edit below the retain floor {settings.min_retain:g}")
    else:
        numbers += f", predicted forget refusal {refusal:.2f}"
    if refusal < settings.target_refusal - 1e-9:
        problems.append(f"refusal below {settings.target_refusal:g}")
    return not problems, numbers + ("" if not problems else f" ({' and '.join(problems)})")
