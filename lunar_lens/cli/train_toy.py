"""`lunar-lens train-toy`: retrain the toy world's model."""

from __future__ import annotations

import argparse
import time

from lunar_lens.cli.arguments import add_force, whole_number

DESCRIPTION = "Retrain the embedded toy-world model (tokenizer + tiny Llama) from a seed and score it."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lunar_lens.toy.world.train import DEFAULT_STEPS

    parser.add_argument("--out", required=True, help="folder to write the checkpoint to")
    parser.add_argument("--seed", type=int, default=0, help="world, tokenizer and training seed (0: the shipped model)")
    parser.add_argument("--steps", type=whole_number(), default=DEFAULT_STEPS, help="optimiser steps")
    add_force(parser)


def run(args: argparse.Namespace) -> None:
    from lunar_lens.model.load import load_model
    from lunar_lens.toy import qa_model
    from lunar_lens.toy.world import build_world
    from lunar_lens.toy.world.train import train_toy_model

    start = time.perf_counter()
    out = train_toy_model(args.out, seed=args.seed, steps=args.steps, force=args.force)
    print(f"trained in {time.perf_counter() - start:.0f} s; saved to {out}")
    world = build_world(args.seed)
    scores = qa_model.score_qa_model(load_model(out), world.known_qa, world.unknown_heldout_qa)
    print(", ".join(f"{key} {value:.3f}" for key, value in scores.items()))
