"""Batched, padding-masked activation capture through hook points, truncated at the deepest
layer needed, and the position rules that say which tokens count."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from jaxtyping import Bool, Float, Int
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.exceptions import StopAtLayerException

from lunar_lens.core.errors import LunarError
from lunar_lens.core.progress import bar
from lunar_lens.data.prompts import TokenBatch, tokenize
from lunar_lens.model.names import n_layers

POSITION_RULES = ("all", "suffix", "question", "last", "last+answer", "question+answer")
"""Which forget-prompt positions are redirected:
- ``all``: every token (the released recipe: BOS and the template prefix too);
- ``suffix``: every token after the prefix shared by all prompts of the set (e.g. BOS + ``User:``);
- ``question``: the tokens of the question text;
- ``last``: the last prompt token (where the answer starts);
- ``last+answer`` / ``question+answer``: as above, plus every token of the refusal the model should give
  (teacher-forced), so that the whole response, not only its first token, is redirected. The k-th
  answer token gets its own direction (`Directions.answer_vectors[:, k]`): adding the prompt direction
  there would make every position predict the refusal's first token ("I I I I").
"""


def token_batches(
    tokenizer,
    questions: Sequence[str],
    answers: Sequence[str] | None = None,
    batch_size: int = 32,
    desc: str | None = None,
    by_length: bool = False,
) -> Iterator[TokenBatch]:
    """Left-padded batches of `questions` (+ `answers`), with a progress bar when `desc` is given.
    With `by_length`, prompts are visited shortest first (by characters), so that a batch holds
    prompts of about one length and little padding is computed: for sums over prompts."""
    order = list(range(len(questions)))
    if by_length:
        order.sort(key=lambda i: len(questions[i]) + (0 if answers is None else len(answers[i])))
    starts = range(0, len(order), batch_size)
    for start in bar(starts, desc):
        picked = order[start : start + batch_size]
        yield tokenize(tokenizer, [questions[i] for i in picked], None if answers is None else [answers[i] for i in picked])


FINAL_NORM_INPUT = "ln_final.hook_in"  # where a pass through every block ends, before the unembedding


def _stop(activation: torch.Tensor, hook=None) -> None:
    raise StopAtLayerException(activation)  # the bridge's forward catches it and returns


@torch.no_grad()
def capture(
    bridge: TransformerBridge, batch: TokenBatch, names: Sequence[str], stop_at_layer: int | None
) -> dict[str, Float[torch.Tensor, "batch seq d"]]:
    """Activations at `names` for one batch, running only the blocks before `stop_at_layer`. A pass through every
    block stops at the final norm: the bridge's own `stop_at_layer` cannot stop after the last block, and the
    vocabulary-wide logits it would compute are most of a pass's memory."""
    device = bridge.cfg.device
    every_block = stop_at_layer is None or stop_at_layer >= n_layers(bridge)
    stop = [(FINAL_NORM_INPUT, _stop)] if every_block and FINAL_NORM_INPUT in bridge.hook_dict else []
    with bridge.hooks(fwd_hooks=stop):
        _, cache = bridge.run_with_cache(
            batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            names_filter=list(names),
            stop_at_layer=None if every_block else stop_at_layer,
            return_cache_object=False,
        )
    missing = [n for n in names if n not in cache]
    if missing:
        raise LunarError(f"hook points {missing} were not reached: check the layer index and the model family")
    return cache


def shared_prefix_length(batches: Sequence[TokenBatch]) -> int:
    """Number of leading real tokens identical in every prompt (BOS, template prefix)."""
    reference: torch.Tensor | None = None
    length = 10**9
    for batch in batches:
        for ids, mask in zip(batch.input_ids, batch.prompt_mask):
            real = ids[mask]
            if reference is None:
                reference = real
            n = min(len(real), len(reference), length)
            same = (real[:n] == reference[:n]).long()
            length = int(same.cumprod(0).sum())
    return 0 if reference is None else length


def position_mask(batch: TokenBatch, rule: str, prefix_length: int = 0) -> Bool[torch.Tensor, "batch seq"]:
    """Positions of `batch` selected by a rule of POSITION_RULES."""
    if rule not in POSITION_RULES:
        raise LunarError(f"unknown position rule {rule!r}: use one of {', '.join(POSITION_RULES)}")
    base, _, with_answer = rule.partition("+")
    real = batch.attention_mask.bool()
    if base == "all":
        mask = real.clone()
    elif base == "suffix":
        order = real.long().cumsum(dim=1)  # 1-based index among real tokens
        mask = real & (order > prefix_length)
    elif base == "question":
        mask = batch.question_mask.clone()
    else:  # last
        mask = torch.zeros_like(real)
        mask[torch.arange(len(mask)), batch.last_prompt_index] = True
    if with_answer:
        mask |= batch.answer_mask
    return mask


def shift_index(batch: TokenBatch, rule: str, prefix_length: int = 0, n_answer: int = 0) -> Int[torch.Tensor, "batch seq"]:
    """Which shift each position gets under `rule`: -1 none, 0 the prompt direction, 1 + k the
    direction of the k-th answer token (k < `n_answer`)."""
    index = torch.full(batch.input_ids.shape, -1, dtype=torch.long)
    index[position_mask(batch, rule.partition("+")[0], prefix_length)] = 0
    if rule.endswith("+answer"):
        offset = batch.answer_mask.long().cumsum(dim=1) - 1
        answer = batch.answer_mask & (offset < n_answer)
        index[batch.answer_mask] = -1
        index[answer] = 1 + offset[answer]
    return index
