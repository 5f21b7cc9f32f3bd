"""The probes: steering (sufficiency), directional ablation (necessity), activation patching, and the
side effects on retain prompts, each batched over an evenly spread subsample of each set."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from transformer_lens.model_bridge import TransformerBridge

from lunar_lens.choose.probes.passes import (
    HooksFor,
    answer_log_probs,
    answer_logprob,
    each_intervention,
    in_chunks,
    no_hooks,
    predicting_answer,
    steering_shift,
    top_next_token,
)
from lunar_lens.choose.probes.settings import LocaliseSettings
from lunar_lens.core.hooks import Hook, ablation_hook, add_hook, patch_hook
from lunar_lens.core.progress import bar as progress_bar
from lunar_lens.data.prompts import TokenBatch, first_answer_tokens, rows_of, tokenize
from lunar_lens.data.qa import QA, spread
from lunar_lens.directions.activations import capture, shared_prefix_length, shift_index
from lunar_lens.directions.mean_difference import Directions
from lunar_lens.directions.refusals import refusal_target
from lunar_lens.metrics.logits import kl_divergence
from lunar_lens.metrics.text import mean_rouge1, refusal_rate
from lunar_lens.model.generation import generate_answers
from lunar_lens.model.names import resid_post


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
        return generate_answers(bridge, questions, settings.generate_tokens, batch_size=len(questions), within_budget=False)


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
