"""`lunar-lens demo`: the whole pipeline on the embedded toy world."""

from __future__ import annotations

import argparse

from lunar_lens.cli.arguments import whole_number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="lunar-demo", help="folder for the checkpoint, figures and summary")
    parser.add_argument("--entities", nargs="*", help="toy-world entities to forget (default: the first two)")
    parser.add_argument("--n-forget", type=whole_number(), default=2, help="how many entities to forget when --entities is not given")
    parser.add_argument("--force", action="store_true", help="replace an earlier demo output in --out")
    parser.add_argument("--probes", action="store_true", help="also run the localisation probes (steering, ablation, patching) for their figures")


def run(args: argparse.Namespace) -> None:
    from lunar_lens.toy.demo import run_demo

    run_demo(args.out, args.entities, args.n_forget, args.force, args.probes)
