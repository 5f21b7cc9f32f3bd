"""One prompt format everywhere (directions, training, generation, evaluation), and batched
tokenisation that knows which tokens are the question, the prompt and the answer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int
from transformers import PreTrainedTokenizerBase

PLAIN_PROMPT = "Question: {question}\nAnswer:"


def uses_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer: PreTrainedTokenizerBase, question: str) -> str:
    """The tokenizer's chat template (with generation prompt) when it has one, else `Question: …\\nAnswer:`."""
    if uses_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    return PLAIN_PROMPT.format(question=question)


def answer_separator(tokenizer: PreTrainedTokenizerBase) -> str:
    """What stands between the prompt and the answer text."""
    return "" if uses_chat_template(tokenizer) else " "


def format_answer(tokenizer: PreTrainedTokenizerBase, answer: str) -> str:
    """The answer as it follows the prompt, closed by the eos token (the training target)."""
    return answer_separator(tokenizer) + answer + tokenizer.eos_token


def add_special_tokens(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Chat templates write their own BOS; the plain format lets the tokenizer add it."""
    return not uses_chat_template(tokenizer)


@dataclass
class TokenBatch:
    """Left-padded tokens of `prompt (+ answer)` with masks for each part."""

    input_ids: Int[torch.Tensor, "batch seq"]
    attention_mask: Int[torch.Tensor, "batch seq"]
    question_mask: Bool[torch.Tensor, "batch seq"]  # tokens overlapping the question's characters
    prompt_mask: Bool[torch.Tensor, "batch seq"]  # every real token of the prompt
    answer_mask: Bool[torch.Tensor, "batch seq"]  # tokens of the appended answer (empty without one)

    def to(self, device: torch.device | str) -> "TokenBatch":
        return TokenBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    @property
    def last_prompt_index(self) -> Int[torch.Tensor, " batch"]:
        """Position of each row's last prompt token."""
        seq = self.prompt_mask.shape[1]
        positions = torch.arange(seq, device=self.prompt_mask.device).expand_as(self.prompt_mask)
        return torch.where(self.prompt_mask, positions, -1).max(dim=1).values


def rows_of(batch: TokenBatch, index: slice | torch.Tensor) -> TokenBatch:
    """The rows `index` of `batch`, every mask with them."""
    return TokenBatch(*(getattr(batch, name)[index] for name in batch.__dataclass_fields__))


def format_prompts(tokenizer: PreTrainedTokenizerBase, questions: list[str]) -> list[str]:
    """`format_prompt` of every question (one chat-template call for the batch)."""
    if not questions or not uses_chat_template(tokenizer):
        return [format_prompt(tokenizer, q) for q in questions]
    chats = [[{"role": "user", "content": q}] for q in questions]
    return list(tokenizer.apply_chat_template(chats, tokenize=False, add_generation_prompt=True))


def tokenize(
    tokenizer: PreTrainedTokenizerBase,
    questions: list[str],
    answers: list[str] | None = None,
    max_length: int | None = None,
) -> TokenBatch:
    """Tokenise `format_prompt(question)` (+ `format_answer(answer)`) with left padding.

    Masks come from character offsets, because byte-fallback BPE tokens can cross the
    boundary between prompt and answer (a token that straddles it counts as answer).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("lunar-lens needs a fast (Rust) tokenizer for character offsets: save the model with tokenizer.json")
    prompts = format_prompts(tokenizer, questions)
    texts = list(prompts) if answers is None else [p + format_answer(tokenizer, a) for p, a in zip(prompts, answers)]
    encoded = tokenizer(
        texts,
        padding=True,
        return_tensors="pt",
        return_offsets_mapping=True,
        add_special_tokens=add_special_tokens(tokenizer),
        truncation=max_length is not None,
        max_length=max_length,
    )
    starts, ends = encoded["offset_mapping"].unbind(dim=-1)  # character span of each token
    real = encoded["attention_mask"].bool()
    question_start = torch.tensor([prompt.rfind(question) for prompt, question in zip(prompts, questions)])[:, None]
    question_end = question_start + torch.tensor([len(question) for question in questions])[:, None]
    # tokens overlapping the question's characters (special tokens have empty spans)
    question_mask = real & (starts < question_end) & (ends > question_start) & (ends > starts)
    answer_start = torch.tensor([len(p) if answers is not None else len(t) + 1 for p, t in zip(prompts, texts)])[:, None]
    prompt_mask = real & (ends <= answer_start)  # special tokens (BOS) have the span (0, 0): prompt tokens
    answer_mask = real & ~prompt_mask
    return TokenBatch(encoded["input_ids"], encoded["attention_mask"], question_mask, prompt_mask, answer_mask)


def first_answer_tokens(batch: TokenBatch, k: int, pad_id: int) -> TokenBatch:
    """Each row's prompt and first `k` answer tokens, left-padded again: all that scoring those tokens
    needs (in a causal model, later tokens cannot change them)."""
    real = batch.attention_mask.bool()
    keep = real & ~(batch.answer_mask & (batch.answer_mask.long().cumsum(dim=1) > k))
    lengths = keep.sum(dim=1, keepdim=True)
    width = int(lengths.max())
    column = torch.arange(width)[None, :]
    valid = column >= width - lengths
    # the kept tokens run from each row's first real token (after its left padding)
    source = ((~real).sum(dim=1, keepdim=True) + column - (width - lengths)).clamp(0, real.shape[1] - 1)

    def take(values: torch.Tensor, pad: int | bool) -> torch.Tensor:
        return torch.where(valid, values.gather(1, source), torch.tensor(pad, dtype=values.dtype))

    return TokenBatch(
        take(batch.input_ids, pad_id), take(batch.attention_mask, 0), take(batch.question_mask, False),
        take(batch.prompt_mask, False), take(batch.answer_mask, False),
    )
