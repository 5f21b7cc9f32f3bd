"""`lunar-lens attack`: try to recover forgotten answers from an edited model."""

from __future__ import annotations

import argparse
from pathlib import Path

from lunar_lens.cli.arguments import add_generation_arguments, check_report, parse_layers, run_settings
from lunar_lens.core.errors import LunarError

DESCRIPTION = (
    "Run every attack (layer skip, reverse direction, abliteration, int8/4-bit quantisation, paraphrase, prefix injection) "
    "on an edited checkpoint and report the forget ROUGE-1 each recovers."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the edited HF model folder (output of `lunar-lens unlearn`)")
    parser.add_argument("--base", required=True, help="the model before the edit (directions are recomputed on it)")
    parser.add_argument("--forget", required=True, help="the forgotten questions with answers")
    parser.add_argument("--reference", required=True, help="questions the base model already declines (for the direction)")
    parser.add_argument("--retain", help="retained questions with answers (reports retain ROUGE-1 under each model attack)")
    parser.add_argument("--paraphrases", help="paraphrased forget questions (e.g. TOFU forget01_perturbed.json); default: templates")
    parser.add_argument("--layer", help="edited layer(s), e.g. 3 or 2,3 (default: from MODEL/lunar_report.json)")
    parser.add_argument("--coeff", type=float, help="the edit's coefficient c (default: from MODEL/lunar_report.json)")
    parser.add_argument("--out", required=True, help="attacks JSON to write")
    add_generation_arguments(parser)


def edit_parameters(model_dir: str, layer: str | None, coeff: float | None) -> tuple[list[int], float, str]:
    """(layers, coeff, direction rule): flags first, then `model_dir/lunar_report.json` (its settings read back
    with `EditSettings.from_dict`)."""
    from lunar_lens.edit.layers import EditSettings, check_coeff
    from lunar_lens.model.checkpoint import REPORT_FILE
    from lunar_lens.pipeline.unlearn import earlier_request

    report = earlier_request(model_dir)
    settings = EditSettings.from_dict(report.get("settings", {}))
    layers = parse_layers(layer) if layer else report.get("layers")
    coeff = coeff if coeff is not None else report.get("coeff")
    if not layers or coeff is None:
        raise LunarError(f"{Path(model_dir) / REPORT_FILE} does not give the edited layers and coefficient: pass --layer N and --coeff C")
    return list(layers), check_coeff(coeff), settings.direction_rule


def run(args: argparse.Namespace) -> None:
    from lunar_lens.core.atomic import FORMAT, write_json
    from lunar_lens.data.qa import load_qa, load_refusals
    from lunar_lens.directions.mean_difference import compute_directions
    from lunar_lens.evaluate.attacks import attacks_markdown, load_paraphrases, run_attacks
    from lunar_lens.model.checkpoint import Checkpoint
    from lunar_lens.model.load import check_folder_layers, load_model, model_folder

    layers, coeff, rule = edit_parameters(args.model, args.layer, args.coeff)
    forget = load_qa(args.forget, require_answers=True)
    reference = load_qa(args.reference)
    retain = load_qa(args.retain, require_answers=True) if args.retain else ()
    paraphrases = load_paraphrases(args.paraphrases) if args.paraphrases else None
    refusals = load_refusals(args.refusals) if args.refusals else ()
    inputs = check_report(args, args.model, args.base, args.forget, args.reference, args.retain, args.paraphrases, args.refusals)
    folders = [model_folder(args.model), model_folder(args.base)]
    check_folder_layers(folders[0], layers)
    layouts = [Checkpoint.open(folder).layout() for folder in folders]
    if layouts[0] != layouts[1]:
        other = sorted(key for key in layouts[0].keys() | layouts[1].keys() if layouts[0].get(key) != layouts[1].get(key))[0]
        raise LunarError(f"--base {folders[1]} holds other tensors than --model (first: {other}): pass the unedited model the edit was made on")
    run = run_settings(args)
    model = load_model(args.model, **run.load_options())
    base = load_model(args.base, **run.load_options())
    directions = compute_directions(
        base, [qa.question for qa in forget], [qa.question for qa in reference], rule, args.batch_size, progress=True,
        deepest_layer=max(layers),
    )
    results = run_attacks(
        model, forget, layers, directions, coeff, retain, paraphrases, base,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=True, refusals=refusals,
    )
    print(attacks_markdown(results))
    report = {
        "format": f"{FORMAT} attack 1", "model": args.model, "base": args.base, "layers": layers, "coeff": coeff,
        "direction_rule": rule, "attacks": results,
    }
    write_json(args.out, report, force=args.force, inputs=inputs)
    print(f"wrote {args.out}")
