"""`lunar-lens` command line. Each command lives in its pipeline module, which is imported only when
that command runs, so `lunar-lens --help` answers at once."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import re
import signal
import sys
import warnings

from lunar_lens.errors import LunarError, first_line
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


class Parser(argparse.ArgumentParser):
    """argparse, with a misused flag reported in one line (exit 2) rather than usage + error."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def whole_number(minimum: int = 1):
    """An argparse type: an integer ≥ `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (e.g. 32)") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}: give a whole number ≥ {minimum}")
        return value

    return parse


def non_negative_number(text: str) -> float:
    """An argparse type: a finite float ≥ 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (e.g. 1e-4)") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a finite number ≥ 0 (e.g. 1e-4)")
    return value


def device_name(text: str) -> str:
    """An argparse type: cpu, cuda, cuda:N or mps."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use cpu, cuda, cuda:N or mps")
    return text


def add_device_arguments(parser: argparse.ArgumentParser, device_help: str = "cpu or cuda", dtype_help: str = "in-memory dtype") -> None:
    """`--device` and `--dtype`, the same for every command that loads a model."""
    parser.add_argument("--device", default="cpu", type=device_name, help=device_help)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help=dtype_help)


def parse_numbers(text: str, kind: type, flag: str, what: str = "a comma-separated list of numbers", example: str = "1,2,4") -> list:
    """`--flag 1,2,4` → [1, 2, 4]; anything else is a one-line error naming the flag and an example."""
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise LunarError(f"{flag} {text!r} is not {what} (e.g. {flag} {example})") from None


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = Parser(prog="lunar-lens", description="LUNAR unlearning on TransformerLens hook points.")
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


def flag(parameter: str) -> str:
    """The command-line flag of a library parameter (`batch_size` → `--batch-size`)."""
    return "--" + parameter.replace("_", "-")


def main(argv: list[str] | None = None) -> int:
    """Run one command. Errors, SIGINT and SIGTERM end it with one line on stderr (exit 2, 130, 143)."""
    from lunar_lens.outputs import Terminated, raise_terminated

    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:
        return exit.code if isinstance(exit.code, int) else 2
    name = f"lunar-lens {args.command}"
    format_warning, handler = warnings.formatwarning, signal.getsignal(signal.SIGTERM)
    warnings.formatwarning = lambda message, *_, **__: f"{name}: warning: {message}\n"
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        with quiet() if args.quiet else contextlib.nullcontext():
            args.func(args)
    except LunarError as error:
        print(f"{name}: error: {error.render(flag)}", file=sys.stderr)
        return 2
    except OSError as error:  # the file system refused (permissions, full disk, a vanished path)
        print(f"{name}: error: {first_line(error)}: check the path, its permissions and the free space", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        terminated = isinstance(interrupt, Terminated)
        print(f"{name}: {'terminated' if terminated else 'interrupted'} (nothing half-written was left)", file=sys.stderr)
        return 143 if terminated else 130
    except Exception as error:  # a bug in lunar-lens: one line too, the traceback on request
        if os.environ.get("LUNAR_LENS_TRACEBACK"):
            raise
        print(f"{name}: internal error: {type(error).__name__}: {first_line(error)}: a lunar-lens bug; rerun with LUNAR_LENS_TRACEBACK=1 "
              "and report the traceback", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = format_warning
        signal.signal(signal.SIGTERM, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
