"""`lunar-lens export`: apply a saved patch to a model in memory and export it as a verified checkpoint."""

from __future__ import annotations

import argparse

from lunar_lens.cli.arguments import add_device_arguments, add_force, run_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the patch's base: HF model folder or cached hub id")
    parser.add_argument("--edit", required=True, help="a patch file (written by save_patch / `lunar-lens unlearn`)")
    parser.add_argument("--out", required=True, help="output folder (a Hugging Face checkpoint)")
    parser.add_argument("--scale", type=float, default=1.0, help="apply S·ΔW (0: the base, 1: the whole edit)")
    add_force(parser)
    add_device_arguments(parser, dtype_help="in-memory dtype (the file keeps the source's)")
    parser.add_argument("--no-verify", action="store_true", help="skip the reload-and-compare check")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code (off by default)")


def run(args: argparse.Namespace) -> None:
    from lunar_lens.artefacts.export import export_checkpoint
    from lunar_lens.artefacts.patches import apply_to_model, check_scale, load_patch, show_patch
    from lunar_lens.core.atomic import check_output
    from lunar_lens.model.load import load_model

    check_scale(args.scale)
    edit = load_patch(args.edit)  # a missing or corrupted patch is refused before the model loads
    run = run_settings(args)
    check_output(args.out, folder=True, force=run.force, inputs=[args.model, args.edit])
    bridge = load_model(args.model, trust_remote_code=args.trust_remote_code, **run.load_options())
    patch = apply_to_model(bridge, edit, args.scale)
    result = export_checkpoint(
        bridge, args.out, patch.layers, manifest={"patch": show_patch(args.edit)}, force=run.force,
        verify=not args.no_verify, trust_remote_code=args.trust_remote_code, patch=args.edit, scale=args.scale,
    )
    check = result.verification
    verified = "not verified"
    if check is not None:
        verified = f"verified: max |Δ logit| {check['max_abs_logit_diff']:.2g} on {check['prompts']} prompts"
    print(f"wrote {result.out_dir} (edited {', '.join(result.edited_tensors)}; {verified})")
