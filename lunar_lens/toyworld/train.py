"""Train the toy world's tokenizer and tiny Llama from a seed, and save a Hugging Face checkpoint.

    python -m lunar_lens.toyworld.train --out DIR --seed 0

reproduces the shipped checkpoint (`lunar_lens.toyworld.checkpoint_path()`) on the same machine:
the tokenizer trainer is deterministic, and training runs with `torch.use_deterministic_algorithms`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from lunar_lens import qa_model
from lunar_lens.cli import whole_number
from lunar_lens.data import QA
from lunar_lens.model import load_model
from lunar_lens.toyworld.world import World, build_world

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder to write the checkpoint to")
    parser.add_argument("--seed", type=int, default=0, help="world, tokenizer and training seed (0: the shipped model)")
    parser.add_argument("--steps", type=whole_number(), default=DEFAULT_STEPS, help="optimiser steps")
    parser.add_argument("--force", action="store_true", help="replace an earlier lunar-lens output in --out")


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    description = "Retrain the embedded toy-world model (tokenizer + tiny Llama) from a seed and score it."
    parser = subparsers.add_parser("train-toy", help="retrain the embedded toy-world model from a seed", description=description)
    add_arguments(parser)
    parser.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    out = train_toy_model(args.out, seed=args.seed, steps=args.steps, force=args.force)
    print(f"trained in {time.perf_counter() - start:.0f} s; saved to {out}")
    world = build_world(args.seed)
    scores = qa_model.score_qa_model(load_model(out), world.known_qa, world.unknown_heldout_qa)
    print(", ".join(f"{key} {value:.3f}" for key, value in scores.items()))


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(cli)
    run_cli(cli.parse_args())
