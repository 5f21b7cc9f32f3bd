"""`lunar-lens patch apply|revert|show`: unlearning patches on checkpoint folders."""

from __future__ import annotations

import argparse
import json

from lunar_lens.cli.arguments import add_force


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, verb in (("apply", "with"), ("revert", "without")):
        sub = actions.add_parser(name, help=f"write a copy of CHECKPOINT {verb} PATCH to --out")
        sub.add_argument("checkpoint", help="a Hugging Face model folder (safetensors)")
        sub.add_argument("patch", help="a patch file (`lunar-lens patch show CHECKPOINT` lists the applied ones)")
        sub.add_argument("--out", required=True, help="output folder")
        add_force(sub)
    actions.choices["apply"].add_argument(
        "--scale", type=float, default=1.0, help="apply S·ΔW: 0 leaves the base as it is, 1 is the whole edit (recorded; revert stays exact)"
    )
    show = actions.add_parser("show", help="print a patch file, or the patches applied to a checkpoint folder")
    show.add_argument("path")


def run(args: argparse.Namespace) -> None:
    from lunar_lens.artefacts import patched, patches

    if args.action == "show":
        print(json.dumps(patches.show_patch(args.path), indent=2))
        return
    if args.action == "apply":
        out = patched.apply_patch(args.checkpoint, args.patch, args.out, force=args.force, scale=args.scale)
    else:
        out = patched.revert_patch(args.checkpoint, args.patch, args.out, force=args.force)
    print(f"{args.action}: wrote {out}")
