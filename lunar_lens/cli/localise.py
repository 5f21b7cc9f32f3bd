"""`lunar-lens localise`: score every layer with the probes, check the best layers' edits, choose the
layer and c; writes localisation.json and two figures."""

from __future__ import annotations

import argparse

from lunar_lens.cli.arguments import (
    add_device_arguments,
    add_edit_arguments,
    add_force,
    add_model_and_sets,
    edit_settings,
    parse_numbers,
    run_settings,
    whole_number,
)

DESCRIPTION = (
    "Score every layer with steering, directional ablation, activation patching and retain KL, check the best layers' edits, "
    "and choose the layer and coefficient c; writes localisation.json and two figures. The edit probed is the one "
    "`lunar-lens unlearn` makes with the same --positions, --refusal, --ridge and --no-retain-answers."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lunar_lens.choose.probes import DEFAULT_COEFFS, LocaliseSettings

    add_model_and_sets(parser, model="HF model folder or hub id", retain="questions whose answers must stay",
                       out="folder for localisation.json and the figures")
    parser.add_argument("--layers", "--layer", dest="layers", default=None, help="comma-separated layers to probe (default: all)")
    parser.add_argument("--coeffs", default=",".join(f"{c:g}" for c in DEFAULT_COEFFS), help="comma-separated coefficients c")
    parser.add_argument("--max-prompts", type=whole_number(), default=LocaliseSettings.max_prompts, help="prompts per set (evenly spread)")
    add_edit_arguments(parser)
    add_force(parser)
    add_device_arguments(parser)


def run(args: argparse.Namespace) -> None:
    from lunar_lens.choose.figures import save_localisation
    from lunar_lens.choose.probes import LocaliseSettings, check_coeffs, localise
    from lunar_lens.core.atomic import check_output
    from lunar_lens.core.progress import Stages
    from lunar_lens.data.qa import check_disjoint, load_qa
    from lunar_lens.model.load import load_model

    forget, retain, reference = load_qa(args.forget), load_qa(args.retain), load_qa(args.reference)
    retain = check_disjoint(forget, retain)
    layers = None if args.layers is None else parse_numbers(args.layers, int, "--layers")
    coeffs = check_coeffs(parse_numbers(args.coeffs, float, "--coeffs"))
    settings = LocaliseSettings(edit=edit_settings(args), max_prompts=args.max_prompts, figure_probes=True)  # its figures are its output
    run = run_settings(args)
    check_output(args.out, folder=True, force=run.force, inputs=[args.model, args.forget, args.retain, args.reference])
    bridge = load_model(args.model, **run.load_options())
    with Stages()("localise", "localisation (steering, ablation, patching, edit check)"):
        loc = localise(bridge, forget, retain, reference, coeffs, layers, settings, progress=True)
    paths = save_localisation(loc, args.out, force=run.force)
    print(f"ranking (best first): {loc.ranking}; chosen: layer {loc.best_layer}, c = {loc.best_coeff:g}")
    print("\n".join(f"wrote {path}" for path in paths.values()))
