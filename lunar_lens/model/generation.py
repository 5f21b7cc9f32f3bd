"""Greedy batched generation (left padding) through the bridge, so hooks apply while decoding."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformer_lens.model_bridge import TransformerBridge

from lunar_lens.core.progress import bar
from lunar_lens.data.prompts import TokenBatch, tokenize
from lunar_lens.data.qa import QA
from lunar_lens.model.memory import activation_budget
from lunar_lens.model.names import n_layers
from lunar_lens.model.weights import w_out


@torch.no_grad()
def generate_answers(
    bridge: TransformerBridge,
    questions: list[str],
    max_new_tokens: int = 32,
    batch_size: int = 32,
    progress: bool = False,
    within_budget: bool = True,
) -> list[str]:
    """Greedy answers to `questions` (prompt formatting included), stripped, without the eos.

    Runs the wrapped HF model's own `generate`, so token-for-token equality with plain
    transformers holds by construction, and any hook registered on the bridge (for steering,
    ablation or attacks) is active during decoding. A batch whose key-value cache would exceed the
    activation budget (`model.activation_budget`) is generated in smaller ones, unless `within_budget` is
    False (hooks that expect the batch's shape).
    """
    tokenizer = bridge.tokenizer
    model = bridge.original_model
    device = next(model.parameters()).device
    answers: list[str] = []
    starts = range(0, len(questions), batch_size)
    for start in bar(starts, "generating" if progress else None):
        chunk = questions[start : start + batch_size]
        batch = tokenize(tokenizer, chunk)
        rows = max(1, activation_budget(bridge) // cache_bytes_per_row(bridge, batch.input_ids.shape[1] + max_new_tokens)) if within_budget else len(chunk)
        for first in range(0, len(chunk), rows):
            answers += _generate(bridge, batch if rows >= len(chunk) else tokenize(tokenizer, chunk[first : first + rows]), max_new_tokens, device)
    return answers


def cache_bytes_per_row(bridge: TransformerBridge, tokens: int) -> int:
    """What one generated row holds (an upper bound): keys and values at every layer, the prefill's MLP
    activations, and a step's logits."""
    model = bridge.original_model
    element = next(model.parameters()).element_size()
    d_mlp, d_model = w_out(bridge, 0).shape
    vocabulary = model.get_output_embeddings().weight.shape[0]
    return tokens * n_layers(bridge) * 2 * d_model * element + tokens * 4 * d_mlp * element + vocabulary * 8


def position_limit(bridge: TransformerBridge) -> int | None:
    """The most positions the model has embeddings for (GPT-2's `n_positions`: indexing past it fails), if it says."""
    config = bridge.original_model.config
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def _generate(bridge: TransformerBridge, batch: TokenBatch, max_new_tokens: int, device: torch.device) -> list[str]:
    tokenizer = bridge.tokenizer
    batch = batch.to(device)
    limit = position_limit(bridge)
    if limit is not None:  # an edited model that no longer stops would run past its last position
        max_new_tokens = min(max_new_tokens, limit - batch.input_ids.shape[1])
    if max_new_tokens < 1:
        return [""] * len(batch.input_ids)
    output = bridge.original_model.generate(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    new_tokens = output[:, batch.input_ids.shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def own_answers(bridge: TransformerBridge, items: Sequence[QA], max_new_tokens: int = 32) -> list[QA]:
    """`items` with the model's own greedy answers where an answer is missing (what it keeps saying); a
    question asked twice is generated once."""
    missing = list(dict.fromkeys(qa.question for qa in items if not qa.answer))
    generated = dict(zip(missing, generate_answers(bridge, missing, max_new_tokens) if missing else []))
    return [qa if qa.answer else QA(qa.question, generated[qa.question]) for qa in items]
