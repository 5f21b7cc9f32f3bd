"""Greedy batched generation (left padding) through the bridge, so hooks apply while decoding."""

from __future__ import annotations

import torch
from transformer_lens.model_bridge import TransformerBridge

from lunar_lens.progress import bar
from lunar_lens.prompts import tokenize


@torch.no_grad()
def generate_answers(
    bridge: TransformerBridge,
    questions: list[str],
    max_new_tokens: int = 32,
    batch_size: int = 32,
    progress: bool = False,
) -> list[str]:
    """Greedy answers to `questions` (prompt formatting included), stripped, without the eos.

    Runs the wrapped HF model's own `generate`, so token-for-token equality with plain
    transformers holds by construction, and any hook registered on the bridge (for steering,
    ablation or attacks) is active during decoding.
    """
    tokenizer = bridge.tokenizer
    model = bridge.original_model
    device = next(model.parameters()).device
    answers: list[str] = []
    starts = range(0, len(questions), batch_size)
    for start in bar(starts, "generating" if progress else None):
        batch = tokenize(tokenizer, questions[start : start + batch_size]).to(device)
        output = model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = output[:, batch.input_ids.shape[1] :]
        answers += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers
