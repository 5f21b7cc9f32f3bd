"""Train the toy world's tokenizer and tiny Llama from a seed, and save a Hugging Face checkpoint.

    lunar-lens train-toy --out DIR --seed 0

reproduces the shipped checkpoint (`lunar_lens.toy.world.checkpoint_path()`) on the same machine:
the tokenizer trainer is deterministic, and training runs with `torch.use_deterministic_algorithms`.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerFast

from lunar_lens.data.qa import QA
from lunar_lens.toy import qa_model
from lunar_lens.toy.world.world import World, build_world

VOCAB_SIZE = 1024
DEFAULT_STEPS = 400
MODEL_SHAPE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=4)


def training_qa(world: World) -> list[QA]:
    """What the model is trained on: every fact question, and the training unknown-entity refusals."""
    return world.known_qa + world.unknown_train_qa


def build_tokenizer(world: World, vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the world's training dialogues (`qa_model.build_tokenizer`)."""
    return qa_model.build_tokenizer(training_qa(world), vocab_size)


def train_toy_model(
    out_dir: str | Path,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 64,
    lr: float = 3e-3,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Build the world of `seed`, train tokenizer and model on it, save the checkpoint to `out_dir`
    (`force` replaces an earlier one)."""
    world = build_world(seed)
    return qa_model.train_qa_model(
        out_dir, training_qa(world), build_tokenizer(world), MODEL_SHAPE, seed, steps, batch_size, lr,
        progress=progress, desc="training toy model", force=force,
    )
