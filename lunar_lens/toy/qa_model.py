"""Train a small causal LM (Llama, Qwen2 or GPT-2) from scratch on question–answer dialogues: a byte-level
BPE tokenizer built on the dialogues (with the chat template, or the plain `Question: …\nAnswer:` format),
the model, a deterministic training loop (loss on answer tokens only), and scoring.

The toy world's model (`lunar_lens.toy.world.train`) and the real-data experiments
(`experiments/finetune.py`: TOFU, PISTOL) are trained with it. Training runs with
`torch.use_deterministic_algorithms`, so a seed reproduces a checkpoint on the same machine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from jaxtyping import Int
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformer_lens.model_bridge import TransformerBridge
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from lunar_lens.core.atomic import FORMAT, atomic_output, check_output, write_manifest
from lunar_lens.core.errors import LunarError
from lunar_lens.core.progress import bar as progress_bar
from lunar_lens.data.prompts import PLAIN_PROMPT, tokenize
from lunar_lens.data.qa import QA
from lunar_lens.metrics.text import mean_rouge1, refusal_rate
from lunar_lens.model.generation import generate_answers

USER, ASSISTANT = "User: ", "Assistant:\n"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}" + ASSISTANT + "{{ message['content'] }}{{ eos_token }}\n"
    "{% else %}" + USER + "{{ message['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)
SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def dialogue_text(qa: QA, chat: bool = True) -> str:
    """One training dialogue as plain text (what the tokenizer is trained on), in the chat template's
    format or the plain one."""
    if chat:
        return f"{USER}{qa.question}\n{ASSISTANT}{qa.answer}"
    return PLAIN_PROMPT.format(question=qa.question) + f" {qa.answer}"


def build_tokenizer(examples: Sequence[QA], vocab_size: int, max_length: int = 128, chat: bool = True) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the dialogues of `examples`, with special tokens and (`chat`) the chat
    template; without it, prompts take the plain format (`lunar_lens.data.prompts.format_prompt`)."""
    backend = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([dialogue_text(qa, chat) for qa in examples], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=CHAT_TEMPLATE if chat else None,
        clean_up_tokenization_spaces=False,
        model_max_length=max_length,
        **SPECIAL_TOKENS,
    )


FAMILIES: dict[str, type[PretrainedConfig]] = {"llama": LlamaConfig, "qwen2": Qwen2Config, "gpt2": GPT2Config}


def model_config(tokenizer: PreTrainedTokenizerBase, shape: dict, family: str = "llama") -> PretrainedConfig:
    """A `family` config for `tokenizer` with `shape` (in the family's own names: hidden_size,
    intermediate_size, num_hidden_layers, … for Llama and Qwen2; n_embd, n_inner, n_layer, n_head for GPT-2),
    embeddings tied."""
    if family not in FAMILIES:
        raise LunarError(f"model family {family!r} is not one of {sorted(FAMILIES)}")
    positions = {"n_positions" if family == "gpt2" else "max_position_embeddings": tokenizer.model_max_length}
    return FAMILIES[family](
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
        **positions,
        **shape,
    )


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def _length_buckets(
    epoch: Int[torch.Tensor, " n"], lengths: Int[torch.Tensor, " n"], batch_size: int, generator: torch.Generator
) -> Int[torch.Tensor, " n"]:
    """`epoch` (a permutation) regrouped into batches of similar length, the batches in random order."""
    by_length = epoch[torch.argsort(lengths[epoch], stable=True)]
    batches = list(by_length.split(batch_size))
    return torch.cat([batches[i] for i in torch.randperm(len(batches), generator=generator)])


def train_qa_model(
    out_dir: str | Path,
    examples: Sequence[QA],
    tokenizer: PreTrainedTokenizerFast,
    shape: dict,
    seed: int = 0,
    steps: int = 400,
    batch_size: int = 64,
    lr: float = 3e-3,
    max_new_tokens: int = 32,
    progress: bool = True,
    desc: str = "training",
    device: str = "cpu",
    length_buckets: bool = False,
    force: bool = False,
    family: str = "llama",
    save_dtype: str = "float32",
    shards: int = 1,
) -> Path:
    """Train a `family` model (`model_config`) of `shape` from scratch on `examples` (loss on answer tokens,
    in float32) on `device`, save it in `save_dtype` with `tokenizer` into the folder `out_dir`, atomically
    (`force` replaces an earlier one), in `shards` safetensors files.
    `length_buckets` batches examples of similar length (less padding; batches in random order each epoch)."""
    check_output(out_dir, folder=True, force=force)
    if not examples or any(qa.answer is None for qa in examples):
        raise LunarError("training needs question–answer pairs: every example must have an answer")
    tokenizer.padding_side = "left"
    data = tokenize(tokenizer, [qa.question for qa in examples], [qa.answer for qa in examples])
    if data.input_ids.shape[1] > tokenizer.model_max_length:
        raise LunarError(
            f"the longest dialogue is {data.input_ids.shape[1]} tokens, over the model's {tokenizer.model_max_length}: "
            "raise max_length or drop long examples"
        )
    labels = data.input_ids.masked_fill(~data.answer_mask, -100)
    lengths = data.attention_mask.sum(dim=1)

    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=device != "cpu")
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(model_config(tokenizer, shape, family)).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, steps, warmup=min(100, steps)))
        generator = torch.Generator().manual_seed(seed)
        order = torch.empty(0, dtype=torch.long)
        model.train()
        bar = progress_bar(range(steps), desc if progress else None, leave=True)
        for _ in bar:
            if len(order) < batch_size:
                epoch = torch.randperm(len(examples), generator=generator)
                if length_buckets:
                    epoch = _length_buckets(epoch, lengths, batch_size, generator)
                order = torch.cat([order, epoch])
            rows, order = order[:batch_size], order[batch_size:]
            mask = data.attention_mask[rows]
            first = int(mask.any(dim=0).nonzero()[0])  # drop columns that are padding in every row
            loss = model(
                input_ids=data.input_ids[rows, first:].to(device),
                attention_mask=mask[:, first:].to(device),
                labels=labels[rows, first:].to(device),
            ).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    finally:
        torch.use_deterministic_algorithms(deterministic)

    model.to("cpu", getattr(torch, save_dtype)).eval()
    model.config.dtype = save_dtype
    model.generation_config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with atomic_output(out_dir, folder=True, force=force) as tmp:
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        model.save_pretrained(tmp, safe_serialization=True, **({"max_shard_size": size // shards + 1} if shards > 1 else {}))
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp, {"format": f"{FORMAT} trained model 1", "seed": seed, "steps": steps, "examples": len(examples)})
    return Path(out_dir)


def score_qa_model(bridge: TransformerBridge, known: Sequence[QA], unknown: Sequence[QA] = (), max_new_tokens: int = 32) -> dict[str, float]:
    """Greedy ROUGE-1 recall and exact-match rate on `known`, and the refusal rate on `unknown` when given."""
    answers = generate_answers(bridge, [qa.question for qa in known], max_new_tokens=max_new_tokens)
    references = [qa.answer for qa in known]
    scores = {
        "rouge1_recall": mean_rouge1(answers, references),
        "exact_match": sum(a == r for a, r in zip(answers, references)) / len(references),
    }
    if unknown:
        scores["refusal_rate"] = refusal_rate(generate_answers(bridge, [qa.question for qa in unknown], max_new_tokens=max_new_tokens))
    return scores
