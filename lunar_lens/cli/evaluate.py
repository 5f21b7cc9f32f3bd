"""`lunar-lens evaluate`: score any checkpoint on forget / retain / factual sets."""

from __future__ import annotations

import argparse
from pathlib import Path

from lunar_lens.cli.arguments import add_generation_arguments, check_report, run_settings
from lunar_lens.core.errors import LunarError

DESCRIPTION = (
    "Score a Hugging Face checkpoint on forget / retain / factual sets; with --base, also the base model (a before/after table "
    "and figure) and KL to it. Records with TOFU's paraphrased_answer / perturbed_answer fields (its *_perturbed.json files) "
    "add the truth ratio and model utility; --retain-model adds forget quality."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF model folder or hub id (e.g. the output of `lunar-lens unlearn`)")
    parser.add_argument("--base", help="the model before unlearning: adds a before column, KL to base and a figure")
    parser.add_argument("--forget", required=True, help="forgotten questions with answers (JSON, JSONL, CSV, HF dataset)")
    parser.add_argument("--retain", required=True, help="retained questions with answers")
    parser.add_argument(
        "--factual", action="append", default=[],
        help="general-knowledge questions with answers; repeat for several sets (named after their files, "
        "e.g. TOFU's real_authors_perturbed.json and world_facts_perturbed.json)",
    )
    parser.add_argument("--retain-model", help="a model never trained on the forget set (TOFU's retain model): adds forget quality")
    parser.add_argument("--limit", type=int, help="score only the first N records of each set (a quick check)")
    parser.add_argument("--out", required=True, help="report JSON to write")
    parser.add_argument("--figure", help="before/after PNG (default: --out with .png, when --base is given)")
    parser.add_argument("--no-model-metrics", action="store_true", help="skip MRR, hit@1, ES, perplexity and TOFU's model-based metrics")
    add_generation_arguments(parser)


def factual_names(sources: list[str]) -> list[str]:
    """`factual` for one general-knowledge set; several are named after their files or hub
    configurations, without `_perturbed` (TOFU's real_authors_perturbed.json → real_authors)."""
    if len(sources) == 1:
        return ["factual"]
    names = [Path(source.rpartition(":")[2]).stem.removesuffix("_perturbed") for source in sources]
    clashes = sorted({name for name in names if names.count(name) > 1 or name in ("forget", "retain")})
    if clashes:
        raise LunarError(f"--factual files give clashing set names ({', '.join(clashes)}): rename them apart (and not forget or retain)")
    return names


def load_sets(args: argparse.Namespace) -> dict:
    """forget, retain and the factual sets, each cut to its first --limit records."""
    from lunar_lens.data.qa import load_qa

    if args.limit is not None and args.limit < 1:
        raise LunarError(f"--limit {args.limit} keeps no record: give at least 1")
    sources = {"forget": args.forget, "retain": args.retain} | dict(zip(factual_names(args.factual), args.factual))
    return {name: load_qa(source, require_answers=True)[: args.limit] for name, source in sources.items()}


def run(args: argparse.Namespace) -> None:
    from lunar_lens.core.atomic import FORMAT, check_output, write_json
    from lunar_lens.data.qa import load_refusals
    from lunar_lens.evaluate.sets import evaluate_sets, plot_before_after, truth_ratios
    from lunar_lens.model.load import load_model, model_folder

    sets = load_sets(args)
    if args.retain_model and (args.no_model_metrics or not any(qa.perturbed_answers for qa in sets["forget"])):
        raise LunarError(
            "--retain-model compares truth ratios: give a --forget file with TOFU's perturbed_answer fields "
            "(e.g. forget10_perturbed.json) and leave out --no-model-metrics"
        )
    refusals = load_refusals(args.refusals) if args.refusals else ()
    options = dict(
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=True,
        model_metrics=not args.no_model_metrics, refusals=refusals,
    )
    inputs = check_report(args, args.model, args.base, args.retain_model, args.forget, args.retain, *args.factual, args.refusals)
    figure = (args.figure or Path(args.out).with_suffix(".png")) if args.base else None
    if figure is not None:
        check_output(figure, folder=False, force=args.force, inputs=inputs + [args.out], parameter="figure")
    for folder in (args.retain_model, args.model, args.base):  # each model folder is checked before any of them loads
        if folder:
            model_folder(folder)
    run = run_settings(args)
    retain_ratios = None
    if args.retain_model:
        retain_model = load_model(args.retain_model, **run.load_options())
        retain_ratios = truth_ratios(retain_model, sets["forget"], args.batch_size)
        del retain_model
    model = load_model(args.model, **run.load_options())
    base = load_model(args.base, **run.load_options()) if args.base else None
    after = evaluate_sets(model, sets, base=base, retain_model_truth_ratios=retain_ratios, **options)
    settings = options | {"refusals": args.refusals, "factual": args.factual, "retain_model": args.retain_model, "limit": args.limit}
    report: dict = {"format": f"{FORMAT} evaluate 1", "model": args.model, "base": args.base, "settings": settings}
    if base is None:
        report["evaluation"] = after.to_json()
        print(after.markdown_table())
    else:
        before = evaluate_sets(base, sets, retain_model_truth_ratios=retain_ratios, **options)
        report |= {"before": before.to_json(), "after": after.to_json()}
        print(before.markdown_table(after))
        report["figure"] = str(plot_before_after(before, after, figure, force=args.force))
    write_json(args.out, report, force=args.force, inputs=inputs)
    print(f"wrote {args.out}")
