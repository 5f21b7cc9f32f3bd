"""Batched forward passes under interventions, and the reducers that score their logits: what every probe
is built from. An intervention is a function from a row chunk to the hooks of that chunk's forward."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from jaxtyping import Bool, Float
from transformer_lens.model_bridge import TransformerBridge

from lunar_lens.core.hooks import Hook
from lunar_lens.core.progress import bar as progress_bar
from lunar_lens.data.prompts import TokenBatch, rows_of
from lunar_lens.directions.activations import shift_index

Reduce = Callable[[torch.Tensor, TokenBatch, slice], torch.Tensor]  # (logits, rows, row chunk) -> per-row values
HooksFor = Callable[[slice], Sequence[Hook]]  # row chunk -> the hooks for that chunk's forward


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
