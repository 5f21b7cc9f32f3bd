"""Argument types and the argument groups several commands share, written once; choices and defaults
come from the settings dataclasses and registries they fill."""

from __future__ import annotations

import argparse
import json
import math
import re

from lunar_lens.core.atomic import check_output
from lunar_lens.core.errors import LunarError

DTYPE_CHOICES = ("float32", "bfloat16", "float16")


# ---------------------------------------------------------------- types

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


def parse_numbers(text: str, kind: type, flag: str, what: str = "a comma-separated list of numbers", example: str = "1,2,4") -> list:
    """`--flag 1,2,4` → [1, 2, 4]; anything else is a one-line error naming the flag and an example."""
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise LunarError(f"{flag} {text!r} is not {what} (e.g. {flag} {example})") from None


def parse_layers(text: str) -> list[int] | None:
    """`--layer`: `auto` → None, else a comma-separated list of layer indices."""
    if text == "auto":
        return None
    return parse_numbers(text, int, "--layer", "'auto' or a comma-separated list of layer numbers", "3 or 2,3")


def parse_coeff(text: str) -> float | None:
    """`--coeff`: `auto` → None, else one number."""
    if text == "auto":
        return None
    values = parse_numbers(text, float, "--coeff", "'auto' or a number", "4.0")
    if len(values) != 1:
        raise LunarError(f"--coeff {text!r} is not 'auto' or a number (e.g. --coeff 4.0)")
    return values[0]


def parse_device_map(text: str | None) -> str | dict | None:
    """`--device-map`: a name accelerate knows (auto, balanced, sequential) or a JSON object."""
    if text is None or not text.lstrip().startswith("{"):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise LunarError(f"--device-map is not valid JSON ({error}): write it as '{{\"model.layers.0\": 0, ...}}'") from None


# ---------------------------------------------------------------- argument groups

def add_device_arguments(parser: argparse.ArgumentParser, device_help: str = "cpu or cuda", dtype_help: str = "in-memory dtype") -> None:
    """`--device` and `--dtype`, the same for every command that loads a model."""
    parser.add_argument("--device", default="cpu", type=device_name, help=device_help)
    parser.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES, help=dtype_help)


def add_force(parser: argparse.ArgumentParser, help: str = "replace an earlier lunar-lens output in --out") -> None:
    parser.add_argument("--force", action="store_true", help=help)


def add_model_and_sets(parser: argparse.ArgumentParser, model: str, retain: str | None, out: str) -> None:
    """`--model`, `--forget`, `--retain`, `--reference` and `--out`, as `unlearn` and `localise` take them."""
    parser.add_argument("--model", required=True, help=model)
    parser.add_argument("--forget", required=True, help="questions to forget (JSON, JSONL, CSV, TXT, HF dataset)")
    parser.add_argument("--retain", required=True, help=retain)
    parser.add_argument("--reference", required=True, help="questions the model already declines")
    parser.add_argument("--out", required=True, help=out)


def add_edit_arguments(parser: argparse.ArgumentParser) -> None:
    """What an edit aims at and is solved on (`EditSettings`): the settings `localise` probes with and
    `unlearn` edits with, so that both see the same edit."""
    from lunar_lens.directions.activations import POSITION_RULES
    from lunar_lens.edit.layers import EditSettings

    parser.add_argument(
        "--positions", default=EditSettings.positions, help=f"forget positions redirected: {', '.join(POSITION_RULES)} (lunar_lens.directions.activations)"
    )
    parser.add_argument(
        "--no-retain-answers", action="store_true",
        help="keep retain prompts only, not their teacher-forced answers (the released recipe's objective)",
    )
    parser.add_argument("--refusal", default=None,
                        help="the response forget prompts should get (default: the model's own most common refusal to the reference questions)")
    parser.add_argument("--ridge", type=non_negative_number, default=EditSettings.ridge)
    parser.add_argument("--batch-size", type=whole_number(), default=EditSettings.batch_size, help="prompts per forward pass (activation memory)")


def edit_settings(args: argparse.Namespace, **more):
    """The `EditSettings` of `add_edit_arguments`'s flags (and `more`)."""
    from lunar_lens.edit.layers import EditSettings

    return EditSettings(
        positions=args.positions, retain_answers=not args.no_retain_answers, refusal=args.refusal, ridge=args.ridge, batch_size=args.batch_size,
        **more,
    )


def run_settings(args: argparse.Namespace):
    """The `RunSettings` of `add_device_arguments`' flags, `--force` and (where the command has it) `--device-map`."""
    from lunar_lens.core.settings import RunSettings

    return RunSettings(device=args.device, dtype=args.dtype, device_map=parse_device_map(getattr(args, "device_map", None)), force=args.force)


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """Generation, loading and output flags shared by `evaluate` and `attack`."""
    parser.add_argument("--max-new-tokens", type=whole_number(), default=64, help="longer answers are cut (and score lower recall)")
    parser.add_argument("--batch-size", type=whole_number(), default=32, help="prompts per generation and scoring batch")
    parser.add_argument("--refusals", help="reference refusal responses, one per line (refusal detection by similarity)")
    add_force(parser, "replace an earlier lunar-lens report (and figure) at --out")
    add_device_arguments(parser)


def check_report(args: argparse.Namespace, *inputs: str | None) -> list[str]:
    """Refuse `--out` (a JSON report) before anything loads; returns the inputs it must stay out of."""
    inputs = [path for path in inputs if path]
    check_output(args.out, folder=False, force=args.force, inputs=inputs)
    return inputs
