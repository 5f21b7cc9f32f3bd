"""`lunar-lens unlearn`: forget a set of questions and export the edited checkpoint."""

from __future__ import annotations

import argparse

from lunar_lens.cli.arguments import (
    add_device_arguments,
    add_edit_arguments,
    add_force,
    add_model_and_sets,
    edit_settings,
    parse_coeff,
    parse_layers,
    run_settings,
    whole_number,
)
from lunar_lens.core.errors import LunarError

FLAGS = {"layers": "--layer"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lunar_lens.choose.choice import ChoiceSettings
    from lunar_lens.edit.layers import EditSettings
    from lunar_lens.edit.refine import RefineSettings
    from lunar_lens.edit.solvers import SOLVERS

    add_model_and_sets(parser, model="HF model folder or hub id", retain="questions (with answers) to keep",
                       out="output folder (a Hugging Face checkpoint)")
    parser.add_argument(
        "--keep", metavar="FILE",
        help="questions about knowledge you did not list that must stay (answers optional: the model's own are kept); judged apart by the automatic choice",
    )
    parser.add_argument(
        "--unlisted", type=whole_number(minimum=0), default=EditSettings.unlisted, metavar="N",
        help="packaged general-knowledge questions kept with the model's own answers, besides --keep (knowledge nobody listed); 0: none",
    )
    parser.add_argument("--layer", default="auto", help="auto, or layer number(s): 3 or 2,3")
    parser.add_argument("--coeff", default="auto", help="auto, or the redirection coefficient c")
    add_edit_arguments(parser)
    parser.add_argument("--solver", default=EditSettings.solver, choices=list(SOLVERS))
    parser.add_argument("--lora-rank", type=whole_number(), default=EditSettings.lora_rank)
    parser.add_argument(
        "--refine-steps", type=whole_number(minimum=0), default=RefineSettings.steps,
        help="Adam steps training the edited W_out on behaviour (the refusal on forget prompts, the answers on retain ones); 0: the solver's edit alone",
    )
    add_device_arguments(parser, device_help="cpu or cuda (under torchrun: one GPU per process)")
    parser.add_argument("--device-map", default=None, help="spread the model over devices: auto, balanced, or a JSON {module: device}")
    parser.add_argument("--seed", type=int, default=EditSettings.seed)
    add_force(parser, "replace an earlier lunar-lens output in --out (and --localisation)")
    parser.add_argument(
        "--min-retain", type=float, default=ChoiceSettings.min_retain, metavar="SHARE",
        help="--layer/--coeff auto: the retain floor; an edit whose held-out retain (or keep) ROUGE-1 is below this share of the unedited model's is refused",
    )
    parser.add_argument(
        "--accept-below-floor", action="store_true",
        help="export the automatic choice's best edit even when it is predicted below the retain floor or to refuse too little",
    )
    parser.add_argument(
        "--localisation", metavar="DIR",
        help="with --layer/--coeff auto: also write localisation.json and its figures to DIR (as `lunar-lens localise`)",
    )
    parser.add_argument(
        "--keep-forgotten", metavar="FILE", action="append", default=[],
        help="when --model is an earlier export without its OUT.forgotten.json beside it: that request's forget set (repeatable)",
    )
    parser.add_argument(
        "--embed-forgotten", action="store_true",
        help="store the forgotten questions' text in OUT/lunar_report.json (default: only hashes inside; the text in OUT.forgotten.json beside it)",
    )


def run(args: argparse.Namespace) -> None:
    from lunar_lens.choose.choice import ChoiceSettings
    from lunar_lens.core.atomic import check_output
    from lunar_lens.edit.refine import RefineSettings
    from lunar_lens.pipeline.unlearn import BelowFloor, sidecar_path, unlearn

    coeff = parse_coeff(args.coeff)
    layers = parse_layers(args.layer)
    if args.localisation and layers is not None and coeff is not None:
        raise LunarError("--localisation writes the automatic choice's scores: use it with --layer auto or --coeff auto")
    if args.localisation:
        inputs = [args.out, sidecar_path(args.out), args.model, args.forget, args.retain, args.reference, *args.keep_forgotten]
        inputs += [args.keep] if args.keep else []
        check_output(args.localisation, folder=True, force=args.force, inputs=inputs, parameter="localisation")
    settings = edit_settings(
        args, coeff=coeff, solver=args.solver, lora_rank=args.lora_rank, seed=args.seed, unlisted=args.unlisted,
        refine=RefineSettings(steps=args.refine_steps),
    )
    choice = ChoiceSettings(min_retain=args.min_retain)  # checked before the model loads
    try:
        outcome = unlearn(
            args.model, args.forget, args.retain, args.reference, args.out, layers, settings, run_settings(args),
            figure_probes=bool(args.localisation), keep_forgotten=args.keep_forgotten, embed_forgotten=args.embed_forgotten, keep=args.keep or (),
            choice_settings=choice, accept_below_floor=args.accept_below_floor,
        )
    except BelowFloor as refused:  # nothing exported: the figures of the choice are still written
        if args.localisation:
            save_figures(args, refused.report, None)
        raise
    if outcome.out_dir is None:  # not rank 0 of a torchrun launch: rank 0 reports
        return
    if args.localisation:
        save_figures(args, outcome.report, outcome.localisation)
    layers = ", ".join(
        str(l["layer"]) + ("" if l["objective_before"] is None else f" (the solve's objective {l['objective_before']:.3g} → {l['objective_after']:.3g})")
        for l in outcome.report["edit"]["layers"]
    )
    if outcome.report["choice"]:
        held = outcome.report["choice"]["predicted_heldout"]
        print(
            f"chosen on held-out questions: forget refusal {held['forget_refusal']:.2f}, forget ROUGE-1 {held['forget_rouge1']:.3f}, "
            f"retain ROUGE-1 {held['retain_rouge1']:.3f}"
            + (", knowledge outside the retain set not judged (give --keep)" if held["keep_rouge1"] is None else f", keep ROUGE-1 {held['keep_rouge1']:.3f}")
            + f" (aimed at the model's own refusal {outcome.report['refusal']['target']!r})"
        )
        final = outcome.report["choice"]["predicted"]
        print("predicted for the export (95 % intervals): " + ", ".join(
            f"{name} {final[key]:.2f} ({final['intervals'][key][0]:.2f}–{final['intervals'][key][1]:.2f})"
            for name, key in (("forget refusal", "forget_refusal"), ("retain ROUGE-1", "retain_rouge1"), ("keep ROUGE-1", "keep_rouge1"))
            if final[key] is not None
        ))
    beside = "" if args.embed_forgotten else f" and {sidecar_path(outcome.out_dir)} (the forgotten questions: keep it private)"
    print(f"edited layer(s) {layers} with c = {outcome.report['coeff']:g}; wrote {outcome.out_dir}{beside}")


def save_figures(args: argparse.Namespace, report: dict, localisation: object | None) -> None:
    """The localisation folder: the probes' figures (when run) and the automatic choice's."""
    from lunar_lens.choose.figures import save_localisation

    written = save_localisation(localisation, args.localisation, force=args.force, choice=report["choice"])
    print("\n".join(f"wrote {path}" for path in written.values()))
