"""`lunar-lens`: the parser, and `main`, which runs one command and turns every failure into one line."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import warnings

from lunar_lens.core.errors import LunarError, first_line
from lunar_lens.core.host_memory import economise
from lunar_lens.core.progress import quiet

# command -> (module, help); each module defines `add_arguments(parser)` and `run(args)`, and may define
# DESCRIPTION (the command's --help text, default: its help) and FLAGS ({parameter: flag} where the flag
# is not `--parameter-name`)
COMMANDS = {
    "demo": ("lunar_lens.cli.demo", "run the whole pipeline on the embedded toy world (the main job)"),
    "unlearn": ("lunar_lens.cli.unlearn", "forget a set of questions: directions, layer choice, W_out edit, export"),
    "localise": ("lunar_lens.cli.localise", "rank layers by steering, directional ablation and activation patching"),
    "evaluate": ("lunar_lens.cli.evaluate", "ROUGE recall, refusal rate, Deviation Score and more for any checkpoint"),
    "attack": ("lunar_lens.cli.attack", "try to recover forgotten answers from an edited model"),
    "export": ("lunar_lens.cli.export", "apply a saved edit to a checkpoint and export it, verified"),
    "patch": ("lunar_lens.cli.patch", "apply, revert or show unlearning patches on a checkpoint"),
    "train-toy": ("lunar_lens.cli.train_toy", "retrain the embedded toy-world model from a seed"),
}


class Parser(argparse.ArgumentParser):
    """argparse, with a misused flag reported in one line (exit 2) rather than usage + error."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported, for its arguments."""
    parser = Parser(prog="lunar-lens", description="LUNAR unlearning on TransformerLens hook points.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        if name != command:
            subparsers.add_parser(name, help=help_text, description=help_text)
            continue
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=getattr(module, "DESCRIPTION", help_text))
        module.add_arguments(sub)
        sub.add_argument("--quiet", action="store_true", help="no progress bars: one line per stage with its time (as TQDM_DISABLE=1)")
        sub.set_defaults(func=module.run)
    return parser


def flag(parameter: str, aliases: dict[str, str] | None = None) -> str:
    """The command-line flag of a library parameter (`batch_size` → `--batch-size`; `aliases` first)."""
    return (aliases or {}).get(parameter) or "--" + parameter.replace("_", "-")


def main(argv: list[str] | None = None) -> int:
    """Run one command. Errors, SIGINT and SIGTERM end it with one line on stderr (exit 2, 130, 143)."""
    from lunar_lens.core.atomic import Terminated, raise_terminated

    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:
        return exit.code if isinstance(exit.code, int) else 2
    name = f"lunar-lens {args.command}"
    economise()
    aliases = getattr(importlib.import_module(COMMANDS[args.command][0]), "FLAGS", {})
    format_warning, handler = warnings.formatwarning, signal.getsignal(signal.SIGTERM)
    warnings.formatwarning = lambda message, *_, **__: f"{name}: warning: {message}\n"
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        with quiet() if args.quiet else contextlib.nullcontext():
            args.func(args)
    except LunarError as error:
        print(f"{name}: error: {error.render(lambda parameter: flag(parameter, aliases))}", file=sys.stderr)
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
