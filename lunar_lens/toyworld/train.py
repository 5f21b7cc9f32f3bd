"""Train the toy world's tokenizer and tiny Llama from a seed, and save a Hugging Face checkpoint.

    python -m lunar_lens.toyworld.train --out DIR --seed 0

reproduces the shipped checkpoint (`lunar_lens.toyworld.checkpoint_path()`) on the same machine:
the tokenizer trainer is deterministic, and training runs with `torch.use_deterministic_algorithms`.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformer_lens.model_bridge import TransformerBridge

from lunar_lens.data import QA
from lunar_lens.generation import generate_answers
from lunar_lens.metrics import refusal_rate, rouge_recall
from lunar_lens.model import load_model
from lunar_lens.prompts import tokenize
from lunar_lens.toyworld.world import World, build_world

USER, ASSISTANT = "User: ", "Assistant:\n"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}" + ASSISTANT + "{{ message['content'] }}{{ eos_token }}\n"
    "{% else %}" + USER + "{{ message['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)
SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
VOCAB_SIZE = 1024
DEFAULT_STEPS = 400
MODEL_SHAPE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=4)


def training_qa(world: World) -> list[QA]:
    """What the model is trained on: every fact question, and the training unknown-entity refusals."""
    return world.known_qa + world.unknown_train_qa


def build_tokenizer(world: World, vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the training dialogues, with special tokens and the chat template."""
    backend = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([f"{USER}{qa.question}\n{ASSISTANT}{qa.answer}" for qa in training_qa(world)], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=128,
        **SPECIAL_TOKENS,
    )


def model_config(tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
        **MODEL_SHAPE,
    )


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def train_toy_model(
    out_dir: str | Path,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 64,
    lr: float = 3e-3,
    progress: bool = True,
) -> Path:
    """Build the world of `seed`, train tokenizer and model on it, save the checkpoint to `out_dir`."""
    out = Path(out_dir)
    world = build_world(seed)
    tokenizer = build_tokenizer(world)
    tokenizer.padding_side = "left"
    examples = training_qa(world)
    data = tokenize(tokenizer, [qa.question for qa in examples], [qa.answer for qa in examples])
    labels = data.input_ids.masked_fill(~data.answer_mask, -100)

    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(model_config(tokenizer))
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, steps, warmup=min(100, steps)))
        generator = torch.Generator().manual_seed(seed)
        order = torch.empty(0, dtype=torch.long)
        model.train()
        bar = tqdm(range(steps), desc="training toy model", disable=not progress)
        for _ in bar:
            if len(order) < batch_size:
                order = torch.cat([order, torch.randperm(len(examples), generator=generator)])
            rows, order = order[:batch_size], order[batch_size:]
            mask = data.attention_mask[rows]
            first = int(mask.any(dim=0).nonzero()[0])  # drop columns that are padding in every row
            loss = model(
                input_ids=data.input_ids[rows, first:], attention_mask=mask[:, first:], labels=labels[rows, first:]
            ).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    finally:
        torch.use_deterministic_algorithms(deterministic)

    model.eval()
    model.generation_config = GenerationConfig(
        do_sample=False,
        max_new_tokens=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def score_toy_model(bridge: TransformerBridge, known: list[QA], unknown: list[QA]) -> dict[str, float]:
    """Greedy ROUGE-1 recall and exact-match rate on `known`, refusal rate on `unknown`."""
    answers = generate_answers(bridge, [qa.question for qa in known])
    refusals = generate_answers(bridge, [qa.question for qa in unknown])
    references = [qa.answer for qa in known]
    recall = rouge_recall(answers, references)["rouge1"]
    return {
        "rouge1_recall": sum(recall) / len(recall),
        "exact_match": sum(a == r for a, r in zip(answers, references)) / len(references),
        "refusal_rate": refusal_rate(refusals),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder to write the checkpoint to")
    parser.add_argument("--seed", type=int, default=0, help="world, tokenizer and training seed (0: the shipped model)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimiser steps")


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    description = "Retrain the embedded toy-world model (tokenizer + tiny Llama) from a seed and score it."
    parser = subparsers.add_parser("train-toy", help="retrain the embedded toy-world model from a seed", description=description)
    add_arguments(parser)
    parser.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    out = train_toy_model(args.out, seed=args.seed, steps=args.steps)
    print(f"trained in {time.perf_counter() - start:.0f} s; saved to {out}")
    world = build_world(args.seed)
    scores = score_toy_model(load_model(out), world.known_qa, world.unknown_heldout_qa)
    print(", ".join(f"{key} {value:.3f}" for key, value in scores.items()))


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(cli)
    run_cli(cli.parse_args())
