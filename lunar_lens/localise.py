"""Layer localisation: which layer to edit and how hard to redirect (the coefficient c), measured with
hook points on the unedited model, then checked on the edit itself, simulated by hooks.

Probes, each batched (one pass per layer, or per layer × c, over an evenly spread subsample of each set;
the columns before the first steered position run once, and every layer × c steering continues from their
keys and values):

- **steering** (sufficiency): add to `blocks.l.hook_resid_post` of forget prompts what the edit adds to
  the MLP output — c·r_l at the last prompt token and, for `+answer` rules, c·r_l(k) at answer token k —
  teacher-forced or while generating; score the log-odds of the refusal's first tokens against the
  original answer's, and the refusal rate and answer ROUGE-1 recall of short greedy generations;
- **directional ablation** (necessity): project r_l out of the residual stream leaving block l on
  reference prompts; score how much the refusal's log-probability drops;
- **activation patching**: patch the reference run's `hook_resid_post` into the paired forget run at
  each layer × position (the last prompt positions, counted from the end) and score the recovered
  refusal logit difference at the last prompt token;
- **side effects**: KL(clean ‖ intervened) of next-token distributions on retain prompts (at the last
  prompt token and, teacher-forced, every answer token) under each intervention;
- **edit check**: for the best-ranked layers, the closed-form edit (`edit.unit_solutions`)
  at c = 1, simulated at every c of the grid by hooks (its ΔW is linear in c):
  forget ROUGE-1 recall and refusal rate of greedy answers, retain KL. No weight changes.

The selection rule (`rank_layers`, then `choose_edit`) is written out in `RULE` and in localisation.json.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from transformer_lens.model_bridge import TransformerBridge

from lunar_lens.activations import capture, shared_prefix_length, shift_index
from lunar_lens.data import QA, spread
from lunar_lens.directions import Directions, compute_directions
from lunar_lens.edit import EditSettings, refusal_target, unit_solutions
from lunar_lens.errors import LunarError
from lunar_lens.generation import generate_answers
from lunar_lens.metrics import refusal_rate, rouge_recall
from lunar_lens.model import check_layer, n_layers, resid_post
from lunar_lens.outputs import FORMAT, atomic_output, write_manifest
from lunar_lens.progress import bar as progress_bar
from lunar_lens.prompts import TokenBatch, first_answer_tokens, rows_of, tokenize
from lunar_lens.refine import delta_hooks

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
Hook = tuple[str, Callable]
Reduce = Callable[[torch.Tensor, TokenBatch, slice], torch.Tensor]  # (logits, rows, row chunk) -> per-row values
HooksFor = Callable[[slice], Sequence[Hook]]  # row chunk -> the hooks for that chunk's forward


@dataclass
class LocaliseSettings:
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
    # the smallest and patching at the last token (off: the rest are NaN, as in `--layer auto`)
    figure_probes: bool = True

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
    ablation_drop: Float[torch.Tensor, "n_layers"]  # refusal log-probability lost on reference prompts, nats per token
    ablation_retain_kl: Float[torch.Tensor, "n_layers"]
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
    sizes: dict

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


# ---------------------------------------------------------------- batches, hooks, scores

def add_hook(shift: Float[torch.Tensor, "*shape d_model"]) -> Callable:
    """A forward hook adding `shift` (broadcast over batch and positions) to the activation."""

    def hook(activation: torch.Tensor, hook=None) -> torch.Tensor:
        return activation + shift.to(activation.device, activation.dtype)

    return hook


def ablation_hook(direction: Float[torch.Tensor, " d_model"]) -> Callable:
    """A forward hook projecting `direction` out of the activation at every position."""
    unit = direction / direction.norm().clamp_min(1e-12)

    def hook(activation: torch.Tensor, hook=None) -> torch.Tensor:
        u = unit.to(activation.device, activation.dtype)
        return activation - (activation @ u)[..., None] * u

    return hook


def patch_hook(columns: Int[torch.Tensor, " batch"], values: Float[torch.Tensor, "batch d_model"]) -> Callable:
    """A forward hook writing `values[b]` into row b at position `columns[b]`."""

    def hook(activation: torch.Tensor, hook=None) -> torch.Tensor:
        patched = activation.clone()
        patched[torch.arange(len(patched)), columns.to(patched.device)] = values.to(patched.device, patched.dtype)
        return patched

    return hook


def steering_shift(
    batch: TokenBatch, table: Float[torch.Tensor, "n_shifts d_model"], positions: str, prefix: int
) -> Float[torch.Tensor, "batch seq d_model"]:
    """What the edit adds to the MLP output at each position: row `shift_index` of `table` (the prompt
    direction at the rule's prompt positions, answer token k's direction at answer token k), else 0."""
    index = shift_index(batch, positions, prefix, n_answer=len(table) - 1)
    return torch.where((index >= 0)[..., None], table[index.clamp_min(0)], 0.0)


def continuation_logprob(logits: Float[torch.Tensor, "batch seq vocab"], batch: TokenBatch, k: int) -> Float[torch.Tensor, " batch"]:
    """Mean log-probability of the first `k` answer tokens of each row (teacher-forced)."""
    ids, answer = batch.input_ids.to(logits.device), batch.answer_mask.to(logits.device)
    log_probs = logits[:, :-1].log_softmax(dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    target = answer[:, 1:] & (answer.long().cumsum(dim=1)[:, 1:] <= k)
    return ((log_probs * target).sum(dim=1) / target.sum(dim=1).clamp_min(1)).cpu()


def predicting_answer(batch: TokenBatch) -> Bool[torch.Tensor, "batch seq"]:
    """Positions whose next token is an answer token, and the last prompt token (where one starts)."""
    mask = torch.zeros_like(batch.answer_mask)
    mask[:, :-1] = batch.answer_mask[:, 1:]
    mask[torch.arange(len(mask)), batch.last_prompt_index] = True
    return mask


def kl_divergence(log_p: Float[torch.Tensor, "n vocab"], log_q: Float[torch.Tensor, "n vocab"]) -> Float[torch.Tensor, " n"]:
    """KL(p ‖ q) per row, from log-probabilities."""
    return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(dim=-1)


def no_hooks(chunk: slice) -> list[Hook]:
    return []


def answer_logprob(k: int) -> Reduce:
    return lambda logits, rows, chunk: continuation_logprob(logits, rows, k)


def answer_log_probs(logits: torch.Tensor, rows: TokenBatch, chunk: slice) -> torch.Tensor:
    """Log-probabilities at the `predicting_answer` positions, flattened row by row."""
    return logits[predicting_answer(rows).to(logits.device)].log_softmax(dim=-1).cpu()


def top_next_token(logits: torch.Tensor, rows: TokenBatch, chunk: slice) -> torch.Tensor:
    return logits[:, -1].argmax(dim=-1).cpu()


def columns_of(batch: TokenBatch, start: int) -> TokenBatch:
    return TokenBatch(*(getattr(batch, name)[:, start:] for name in batch.__dataclass_fields__))


@torch.no_grad()
def each_intervention(
    bridge: TransformerBridge,
    batch: TokenBatch,
    interventions: Sequence[HooksFor],
    reduce: Reduce,
    size: int,
    shared_columns: int = 0,
    desc: str | None = None,
) -> list[torch.Tensor]:
    """For each intervention, `reduce(logits, rows, chunk)` over row chunks of `batch`, each chunk's forward run
    with `hooks_for(chunk)`. The first `shared_columns` columns, which no intervention may change, run once per
    chunk, and every intervention continues from their keys and values: its logits, rows and hooks then cover
    the later columns only. Positions count real tokens, as the bridge's own forward does. A progress bar
    counts forwards when `desc` is given."""
    model, device = bridge.original_model, bridge.cfg.device
    outputs: list[list[torch.Tensor]] = [[] for _ in interventions]
    starts = range(0, len(batch.input_ids), size)
    bar = progress_bar(total=len(starts) * len(interventions), desc=desc)
    for start in starts:
        chunk = slice(start, start + size)
        rows = rows_of(batch, chunk)
        ids, mask = rows.input_ids.to(device), rows.attention_mask.to(device)
        positions = (mask.cumsum(dim=1) - 1).clamp_min(0)
        shared = None
        if shared_columns:
            head = slice(0, shared_columns)
            shared = model(input_ids=ids[:, head], attention_mask=mask[:, head], position_ids=positions[:, head], use_cache=True).past_key_values
        tail = columns_of(rows, shared_columns)
        for output, hooks_for in zip(outputs, interventions):
            with bridge.hooks(fwd_hooks=list(hooks_for(chunk))):
                logits = model(
                    input_ids=ids[:, shared_columns:], attention_mask=mask, position_ids=positions[:, shared_columns:],
                    past_key_values=copy.deepcopy(shared), use_cache=shared is not None,
                ).logits
            output.append(reduce(logits.float(), tail, chunk))
            bar.update()
    bar.close()
    return [torch.cat(output) for output in outputs]


def in_chunks(bridge: TransformerBridge, batch: TokenBatch, hooks_for: HooksFor, reduce: Reduce, size: int) -> torch.Tensor:
    """`reduce(logits, rows, chunk)` over row chunks of `batch`, each chunk's forward run with `hooks_for(chunk)`."""
    return each_intervention(bridge, batch, [hooks_for], reduce, size)[0]


def mean_rouge1(answers: list[str], references: list[str]) -> float:
    recall = rouge_recall(answers, references)["rouge1"]
    return sum(recall) / len(recall)


# ---------------------------------------------------------------- the probes

@dataclass
class ProbeSets:
    """Tokenised subsamples of the three sets and the clean (hook-free) baselines the probes compare with."""

    refusal: str
    forget: list[QA]
    forget_answers: list[str]  # the given answers, else the model's own greedy answers
    baseline_answers: list[str]  # the model's greedy answers to the forget prompts (none if not needed)
    reference_questions: list[str]
    forget_tf: TokenBatch  # 2n rows: forget prompt + refusal, then forget prompt + answer (teacher-forced, first score_tokens)
    forget_prompts: TokenBatch
    retain_tf: TokenBatch  # retain prompt + answer (prompt only when answers are missing)
    reference_tf: TokenBatch  # reference prompt + refusal (first score_tokens)
    prefix: int  # tokens every forget prompt shares (for the `suffix` position rule)
    retain_clean: Float[torch.Tensor, "n_positions vocab"]  # at `predicting_answer` positions
    retain_counts: Int[torch.Tensor, " n_retain"]  # those positions per retain row
    reference_clean: Float[torch.Tensor, " n_reference"]

    @property
    def forget_questions(self) -> list[str]:
        return [qa.question for qa in self.forget]


def prepare_sets(
    bridge: TransformerBridge, forget: Sequence[QA], retain: Sequence[QA], reference: Sequence[QA], settings: LocaliseSettings
) -> ProbeSets:
    """Subsample and tokenise the sets; clean greedy answers, retain distributions, reference refusal scores."""
    tokenizer, size, k = bridge.tokenizer, settings.batch_size, settings.score_tokens
    pad = tokenizer.pad_token_id
    refusal = refusal_target(bridge, reference, settings.edit)
    forget = spread(forget, settings.max_prompts)
    questions = [qa.question for qa in forget]
    # the model's own answers: the references where answers are missing, and the figures' baseline
    own = settings.figure_probes or not all(qa.answer for qa in forget)
    baseline = generate_answers(bridge, questions, settings.generate_tokens, batch_size=len(questions)) if own else []
    answers = [qa.answer or baseline[i] for i, qa in enumerate(forget)]
    forget_prompts = tokenize(tokenizer, questions)
    retain = spread(retain, settings.max_prompts)
    retain_answers = [qa.answer for qa in retain] if all(qa.answer for qa in retain) else None
    retain_tf = tokenize(tokenizer, [qa.question for qa in retain], retain_answers)
    reference_questions = [qa.question for qa in spread(reference, settings.max_prompts)]
    # teacher-forced rows that are scored on their first k answer tokens stop there
    reference_tf = first_answer_tokens(tokenize(tokenizer, reference_questions, [refusal] * len(reference_questions)), k, pad)
    forget_tf = first_answer_tokens(tokenize(tokenizer, questions + questions, [refusal] * len(questions) + answers), k, pad)
    return ProbeSets(
        refusal=refusal,
        forget=forget,
        forget_answers=answers,
        baseline_answers=baseline,
        reference_questions=reference_questions,
        forget_tf=forget_tf,
        forget_prompts=forget_prompts,
        retain_tf=retain_tf,
        reference_tf=reference_tf,
        prefix=shared_prefix_length([forget_prompts]),
        retain_clean=in_chunks(bridge, retain_tf, no_hooks, answer_log_probs, size),
        retain_counts=predicting_answer(retain_tf).sum(dim=1),
        reference_clean=in_chunks(bridge, reference_tf, no_hooks, answer_logprob(k), size),
    )


def forget_logodds(
    bridge: TransformerBridge,
    sets: ProbeSets,
    settings: LocaliseSettings,
    interventions: Sequence[HooksFor],
    shared_columns: int = 0,
    desc: str | None = None,
) -> list[float]:
    """For each intervention, the mean over forget prompts of the per-token log-odds of the refusal's first
    tokens against the answer's (`each_intervention`'s `shared_columns`: columns none of them changes)."""
    score = answer_logprob(settings.score_tokens)
    runs = each_intervention(bridge, sets.forget_tf, interventions, score, settings.batch_size, shared_columns, desc)
    n = len(sets.forget)
    return [float((scores[:n] - scores[n:]).mean()) for scores in runs]


def retain_kl(
    bridge: TransformerBridge,
    sets: ProbeSets,
    settings: LocaliseSettings,
    interventions: Sequence[HooksFor],
    shared_columns: int = 0,
    desc: str | None = None,
) -> list[float]:
    """For each intervention, KL(clean ‖ intervened) of retain next-token distributions, averaged over each
    row's `predicting_answer` positions, then over rows (`shared_columns` as in `each_intervention`)."""
    runs = each_intervention(bridge, sets.retain_tf, interventions, answer_log_probs, settings.batch_size, shared_columns, desc)
    counts = sets.retain_counts.tolist()
    return [float(torch.stack([kl.mean() for kl in kl_divergence(sets.retain_clean, log_q).split(counts)]).mean()) for log_q in runs]


def forget_answers_with(
    bridge: TransformerBridge, sets: ProbeSets, settings: LocaliseSettings, hooks: Sequence[Hook], copies: int = 1
) -> list[str]:
    """Greedy answers to the forget prompts with `hooks` active, in one batch (so hooks see its shape);
    with `copies`, the prompts repeated that many times (copy-major)."""
    questions = sets.forget_questions * copies
    with bridge.hooks(fwd_hooks=list(hooks)):
        return generate_answers(bridge, questions, settings.generate_tokens, batch_size=len(questions))


def steering_generation_hook(sets: ProbeSets, settings: LocaliseSettings, tables: Sequence[torch.Tensor]) -> Callable:
    """Steering while generating, as the edit would act, for the forget prompts repeated once per shift table
    (copy-major, as `forget_answers_with(..., copies=len(tables))` decodes them): the prefill adds
    `steering_shift` at the prompt positions; for `+answer` rules, decoding step j (whose one new position
    holds generated token j − 1) adds the shift of answer token j − 1."""
    positions = settings.edit.positions
    prompt = torch.cat([steering_shift(sets.forget_prompts, table, positions, sets.prefix) for table in tables])
    answer_tables = torch.stack([table[1:] if positions.endswith("+answer") else table[:0] for table in tables])
    per_row = answer_tables.repeat_interleave(len(sets.forget), dim=0)  # [rows, n_answer, d_model]
    calls = 0

    def hook(activation: torch.Tensor, hook=None) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 1:
            return add_hook(prompt)(activation)
        step = calls - 2
        return add_hook(per_row[:, step, None])(activation) if step < per_row.shape[1] else activation

    return hook


def answers_per_intervention(
    bridge: TransformerBridge, sets: ProbeSets, settings: LocaliseSettings, hooks_for: Callable[[list[int]], list[Hook]], count: int
) -> list[list[str]]:
    """Greedy forget answers under each of `count` interventions, several decoded per batch (at most
    `generate_rows` rows, at least one intervention): `hooks_for(indices)` acts as interventions `indices`
    on the forget prompts repeated once per index (copy-major)."""
    n = len(sets.forget)
    answers: list[list[str]] = []
    for group in torch.arange(count).tensor_split(-(-count // max(1, settings.generate_rows // n))):
        indices = group.tolist()
        decoded = forget_answers_with(bridge, sets, settings, hooks_for(indices), copies=len(indices))
        answers += [decoded[copy * n : (copy + 1) * n] for copy in range(len(indices))]
    return answers


def first_steered_column(batch: TokenBatch, positions: str, prefix: int, n_answer: int) -> int:
    """The first column of `batch` where any row is steered under the position rule: the columns before it
    are the same under every steering."""
    steered = shift_index(batch, positions, prefix, n_answer) >= 0
    return int(steered.any(dim=0).long().argmax())


def steering_scores(
    bridge: TransformerBridge,
    sets: ProbeSets,
    settings: LocaliseSettings,
    layers: Sequence[int],
    directions: Directions,
    coeffs: Sequence[float],
    progress: bool = False,
) -> dict[str, Float[torch.Tensor, "n_layers n_coeffs"]]:
    """Log-odds, refusal rate, forget ROUGE-1 recall and retain KL of steering by each c at each layer
    (without `settings.figure_probes`, retain KL at the smallest c only and no generation: NaN). The forget
    and retain columns before the first steered one run once for every layer and c."""
    positions = settings.edit.positions
    cells = [(layer, directions.shift_table(layer, coeff).float()) for layer in layers for coeff in coeffs]  # layer-major
    n_answer = len(cells[0][1]) - 1

    def hooks(batch: TokenBatch, layer: int, table: torch.Tensor, start: int = 0) -> HooksFor:
        name = resid_post(layer)
        return lambda chunk: [(name, add_hook(steering_shift(rows_of(batch, chunk), table, positions, sets.prefix)[:, start:]))]

    shape = (len(layers), len(coeffs))
    scores = {key: torch.full(shape, float("nan")) for key in ("logodds", "refusal_rate", "forget_rouge1", "retain_kl")}
    desc = "steering log-odds" if progress else None
    shared = first_steered_column(sets.forget_tf, positions, sets.prefix, n_answer)
    interventions = [hooks(sets.forget_tf, layer, table, shared) for layer, table in cells]
    scores["logodds"] = torch.tensor(forget_logodds(bridge, sets, settings, interventions, shared, desc)).view(shape)
    kl_cells = range(len(cells)) if settings.figure_probes else range(0, len(cells), len(coeffs))  # else the smallest c
    shared = first_steered_column(sets.retain_tf, positions, sets.prefix, n_answer)
    interventions = [hooks(sets.retain_tf, *cells[i], shared) for i in kl_cells]
    desc = "steering retain KL" if progress else None
    scores["retain_kl"].view(-1)[list(kl_cells)] = torch.tensor(retain_kl(bridge, sets, settings, interventions, shared, desc))
    if settings.figure_probes:
        for row, layer in enumerate(progress_bar(layers, "steered generation" if progress else None)):
            tables = [table for _, table in cells[row * len(coeffs) : (row + 1) * len(coeffs)]]

            def hooks_for(indices: list[int], name: str = resid_post(layer), tables: list = tables) -> list[Hook]:
                return [(name, steering_generation_hook(sets, settings, [tables[i] for i in indices]))]

            for column, answers in enumerate(answers_per_intervention(bridge, sets, settings, hooks_for, len(coeffs))):
                scores["refusal_rate"][row, column] = refusal_rate(answers, references=[sets.refusal])
                scores["forget_rouge1"][row, column] = mean_rouge1(answers, sets.forget_answers)
    return scores


def ablation_scores(bridge: TransformerBridge, sets: ProbeSets, settings: LocaliseSettings, layer: int, direction: torch.Tensor) -> tuple[float, float]:
    """(drop of the refusal's per-token log-probability on reference prompts, retain KL) with `direction`
    projected out of `blocks.l.hook_resid_post` at every position."""
    hooks = [(resid_post(layer), ablation_hook(direction))]
    ablated = in_chunks(bridge, sets.reference_tf, lambda chunk: hooks, answer_logprob(settings.score_tokens), settings.batch_size)
    kl = retain_kl(bridge, sets, settings, [lambda chunk: hooks])[0] if settings.figure_probes else float("nan")  # figure only
    return float((sets.reference_clean - ablated).mean()), kl


def pair_by_suffix(forget_ids: Sequence[Sequence[int]], reference_ids: Sequence[Sequence[int]]) -> list[int]:
    """For each forget prompt, the reference prompt sharing its longest token suffix (first on ties), so
    that positions counted from the end hold the same template tokens where they can."""

    def common_suffix(a: Sequence[int], b: Sequence[int]) -> int:
        n = 0
        while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
            n += 1
        return n

    return [max(range(len(reference_ids)), key=lambda j: (common_suffix(ids, reference_ids[j]), -j)) for ids in forget_ids]


def real_ids(batch: TokenBatch) -> list[list[int]]:
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch.input_ids, batch.attention_mask)]


def logit_difference(
    logits: Float[torch.Tensor, "batch seq vocab"], refusal_token: Int[torch.Tensor, " batch"], answer_token: Int[torch.Tensor, " batch"]
) -> Float[torch.Tensor, " batch"]:
    """logit(refusal_token) − logit(answer_token) at the last prompt token of each row."""
    last = logits[:, -1]
    rows = torch.arange(len(last), device=last.device)
    return (last[rows, refusal_token.to(last.device)] - last[rows, answer_token.to(last.device)]).cpu()


def patching_map(
    bridge: TransformerBridge, sets: ProbeSets, settings: LocaliseSettings, layers: Sequence[int], progress: bool = False
) -> tuple[Float[torch.Tensor, "n_layers n_positions"], list[str]]:
    """Activation patching of `hook_resid_post`, reference run → paired forget run, at each layer × each
    of the last P prompt positions (without `settings.figure_probes`, only the last: the others are NaN),
    in one batched pass per layer.

    Metric: LD = logit(t_ref) − logit(t_fgt) at the last prompt token, where t_ref / t_fgt are the clean
    reference / forget runs' top next tokens (the refusal's and the answer's first token, however the
    tokenizer splits them). Score: (mean LD_patched − mean LD_forget) / (mean LD_reference − mean
    LD_forget); all 0 where the two runs do not differ."""
    size = settings.batch_size
    forget = rows_of(sets.forget_prompts, torch.tensor(spread(range(len(sets.forget)), settings.patch_pairs)))
    partners = pair_by_suffix(real_ids(forget), real_ids(tokenize(bridge.tokenizer, sets.reference_questions)))
    reference = tokenize(bridge.tokenizer, [sets.reference_questions[j] for j in partners])
    refusal_token = in_chunks(bridge, reference, no_hooks, top_next_token, size)
    answer_token = in_chunks(bridge, forget, no_hooks, top_next_token, size)

    def difference(logits: torch.Tensor, rows: TokenBatch, pairs: slice | torch.Tensor) -> torch.Tensor:
        return logit_difference(logits, refusal_token[pairs], answer_token[pairs])

    corrupted = float(in_chunks(bridge, forget, no_hooks, difference, size).mean())
    clean = float(in_chunks(bridge, reference, no_hooks, difference, size).mean())
    n_pairs = len(partners)
    n_positions = min(settings.patch_positions, int(forget.attention_mask.sum(1).min()), int(reference.attention_mask.sum(1).min()))
    names = [resid_post(layer) for layer in layers]
    cache = capture(bridge, reference, names, stop_at_layer=max(layers) + 1)

    # one row per (position p, pair i), p-major: pair i's forget prompt patched at its p-th of the last P positions
    offsets = torch.arange(n_positions) if settings.figure_probes else torch.tensor([n_positions - 1])
    pair = torch.arange(n_pairs).repeat(len(offsets))
    offset = offsets.repeat_interleave(n_pairs)
    forget_columns = forget.input_ids.shape[1] - n_positions + offset
    reference_columns = reference.input_ids.shape[1] - n_positions + offset
    patched_rows = rows_of(forget, pair)
    recovered = torch.full((len(layers), n_positions), float("nan"))
    for index, name in enumerate(progress_bar(names, "patching" if progress else None)):
        values = cache[name][pair, reference_columns].cpu()
        hooks_for = lambda chunk, name=name, values=values: [(name, patch_hook(forget_columns[chunk], values[chunk]))]  # noqa: E731
        patched = in_chunks(bridge, patched_rows, hooks_for, lambda logits, rows, chunk: difference(logits, rows, pair[chunk]), size)
        recovered[index, offsets] = patched.view(len(offsets), n_pairs).mean(dim=1)
    gap = clean - corrupted
    recovered = (recovered - corrupted) / gap if abs(gap) > 1e-6 else recovered * 0.0  # NaN stays NaN
    tokens = forget.input_ids[0, -n_positions:].tolist()
    return recovered, [f"{p - n_positions} {bridge.tokenizer.decode([token])!r}" for p, token in enumerate(tokens)]


# ---------------------------------------------------------------- the edit check

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


# ---------------------------------------------------------------- the rule

def rank_layers(
    layers: Sequence[int],
    steer_logodds: Float[torch.Tensor, "n_layers n_coeffs"],
    steer_retain_kl: Float[torch.Tensor, "n_layers"],
    ablation_drop: Float[torch.Tensor, "n_layers"],
    patching_last: Float[torch.Tensor, "n_layers"],
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


def choose_edit(
    checked: Sequence[int],
    coeffs: Sequence[float],
    forget_rouge1: Float[torch.Tensor, "n_checked n_coeffs"],
    refusal: Float[torch.Tensor, "n_checked n_coeffs"],
    retain_kl: Float[torch.Tensor, "n_checked n_coeffs"],
    kl_budget: float,
) -> tuple[int, float, list[int], dict]:
    """Step 4 of RULE on the checked layers (given in probe order): (layer, c, their order, why)."""
    cells = [(i, j) for i in range(len(checked)) for j in range(len(coeffs))]
    pool = [cell for cell in cells if retain_kl[cell] <= kl_budget]

    def key(cell: tuple[int, int]) -> tuple:
        if not pool:  # nothing within the budget: the cheapest cell
            return (float(retain_kl[cell]), coeffs[cell[1]], cell[0])
        return (float(forget_rouge1[cell]), -float(refusal[cell]), coeffs[cell[1]], cell[0])

    candidates = pool or cells
    best = min(candidates, key=key)
    per_layer = {i: min((cell for cell in candidates if cell[0] == i), key=key) for i in sorted({cell[0] for cell in candidates})}
    order = sorted(range(len(checked)), key=lambda i: key(per_layer[i]) if i in per_layer else (float("inf"),))
    why = {
        "cells_within_kl_budget": len(pool),
        "best_coeff_per_checked_layer": {checked[i]: coeffs[cell[1]] for i, cell in per_layer.items()},
    }
    return checked[best[0]], float(coeffs[best[1]]), [checked[i] for i in order], why


# ---------------------------------------------------------------- entry points

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
    """Run every probe on every layer (× coefficient), check the best layers' edits, apply the rule."""
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
    best_layer, best_coeff, checked_order, edit_why = choose_edit(
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
        sizes={"forget": len(sets.forget), "retain": len(sets.retain_counts), "reference": len(sets.reference_questions),
               "settings": asdict(settings)},
    )


def choose_layer_and_coeff(
    bridge: TransformerBridge,
    forget: Sequence[QA],
    retain: Sequence[QA],
    reference: Sequence[QA],
    edit_settings: EditSettings | None = None,
    coeffs: Sequence[float] = DEFAULT_COEFFS,
    directions: Directions | None = None,
    progress: bool = False,
    figure_probes: bool = False,
) -> tuple[list[int], float, Localisation]:
    """`--layer auto --coeff auto`: the rule's layer and coefficient for an edit made with `edit_settings`
    (with `figure_probes`, also the probes that only feed the figures; the choice is the same)."""
    settings = LocaliseSettings(edit=edit_settings or EditSettings(), figure_probes=figure_probes)
    result = localise(bridge, forget, retain, reference, coeffs, settings=settings, directions=directions, progress=progress)
    return [result.best_layer], result.best_coeff, result


def save_localisation(loc: Localisation | None, out_dir: str | Path, force: bool = False, choice: dict | None = None) -> dict[str, Path]:
    """Write `localisation.json` (every score, the ranking, the decision) and the two probe figures (when `loc`
    is given), and the automatic choice's figure (`choice`: `choice.Choice.summary()`), into the folder
    `out_dir`, atomically (`force` replaces an earlier lunar-lens output there)."""
    from lunar_lens.figures import plot_choice, plot_layer_scores, plot_patching_map

    names = {}
    with atomic_output(out_dir, folder=True, force=force) as tmp:
        if loc is not None:
            (tmp / "localisation.json").write_text(json.dumps(loc.to_json(), indent=2))
            plot_layer_scores(loc, tmp / "localisation_layers.png")
            plot_patching_map(loc, tmp / "localisation_patching.png")
            names |= {"json": "localisation.json", "layer_scores": "localisation_layers.png", "patching": "localisation_patching.png"}
        if choice is not None:
            plot_choice(choice, tmp / "choice.png")
            names["choice"] = "choice.png"
        write_manifest(tmp, {"format": f"{FORMAT} localisation 1"})
    return {kind: Path(out_dir) / name for kind, name in names.items()}
