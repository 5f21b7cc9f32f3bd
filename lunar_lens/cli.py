"""`lunar-lens` command line. Each command lives in its pipeline module, which is imported only when
that command runs, so `lunar-lens --help` answers at once."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys

from lunar_lens.errors import LunarError
from lunar_lens.progress import quiet

# command -> (module, help); each module defines `add_cli(subparsers)` registering that command.
COMMANDS = {
    "demo": ("lunar_lens.demo", "run the whole pipeline on the embedded toy world (the main job)"),
    "unlearn": ("lunar_lens.pipeline", "forget a set of questions: directions, layer choice, W_out edit, export"),
    "localise": ("lunar_lens.localise", "rank layers by steering, directional ablation and activation patching"),
    "evaluate": ("lunar_lens.evaluate", "ROUGE recall, refusal rate, Deviation Score and more for any checkpoint"),
    "attack": ("lunar_lens.attacks", "try to recover forgotten answers from an edited model"),
    "export": ("lunar_lens.export", "apply a saved edit to a checkpoint and export it, verified"),
    "patch": ("lunar_lens.patches", "apply, revert or show unlearning patches on a checkpoint"),
    "train-toy": ("lunar_lens.toyworld.train", "retrain the embedded toy-world model from a seed"),
}


def add_device_arguments(parser: argparse.ArgumentParser, device_help: str = "cpu or cuda", dtype_help: str = "in-memory dtype") -> None:
    """`--device` and `--dtype`, the same for every command that loads a model."""
    parser.add_argument("--device", default="cpu", help=device_help)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help=dtype_help)


def parse_numbers(text: str, kind: type, flag: str, what: str = "a comma-separated list of numbers", example: str = "1,2,4") -> list:
    """`--flag 1,2,4` → [1, 2, 4]; anything else is a one-line error naming the flag and an example."""
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise LunarError(f"{flag} {text!r} is not {what} (e.g. {flag} {example})") from None


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lunar-lens", description="LUNAR unlearning on TransformerLens hook points.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        if name == command:
            importlib.import_module(module).add_cli(subparsers)
            subparsers.choices[name].add_argument(
                "--quiet", action="store_true", help="no progress bars: one line per stage with its time (as TQDM_DISABLE=1)"
            )
        else:
            subparsers.add_parser(name, help=help_text, description=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    try:
        with quiet() if args.quiet else contextlib.nullcontext():
            args.func(args)
    except LunarError as error:
        print(f"lunar-lens {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lunar-lens {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
