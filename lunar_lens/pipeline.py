"""`unlearn`: load → directions → localise → edit → export, as one call (Python API and CLI).

What was forgotten stays out of the exported folder: `lunar_report.json` holds the forgotten questions'
count and SHA-256 hashes, and their text goes to a sidecar file *beside* the folder (`DIR.forgotten.json`),
where a later request on DIR finds it (or pass the earlier forget sets again: `keep_forgotten`);
`embed_forgotten` puts the text into the report instead."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from transformer_lens.model_bridge import TransformerBridge

from lunar_lens.cli import add_device_arguments, parse_numbers
from lunar_lens.data import QA, check_disjoint, load_qa
from lunar_lens.distributed import DataParallel, init_from_env
from lunar_lens.choice import ChoiceSettings, choose_edit
from lunar_lens.edit import EditResult, EditSettings, apply_edits, directions_for, edit_layers
from lunar_lens.errors import LunarError
from lunar_lens.model import check_layer, load_model
from lunar_lens.patches import REPORT_FILE as REPORT_NAME
from lunar_lens.progress import Stages
from lunar_lens.refine import RefineSettings
from lunar_lens.refusals import model_refusal

SIDECAR_SUFFIX = ".forgotten.json"
SIDECAR_FORMAT = "lunar-lens forgotten questions 1"


@dataclass
class UnlearnOutcome:
    bridge: TransformerBridge  # the edited in-memory model
    result: EditResult
    report: dict
    out_dir: Path | None
    localisation: object | None = None  # lunar_lens.localise.Localisation when the layer or c was chosen automatically
    forgotten: list[str] = field(default_factory=list)  # every question the model now declines (earlier requests' too)


def earlier_request(model_dir: str | Path | None) -> dict:
    """The `lunar_report.json` of an earlier lunar-lens request that produced this checkpoint ({} if none)."""
    report = Path(model_dir) / REPORT_NAME if model_dir else None
    return json.loads(report.read_text()) if report is not None and report.is_file() else {}


def question_sha256(question: str) -> str:
    return hashlib.sha256(question.encode("utf-8")).hexdigest()


def sidecar_path(checkpoint_dir: str | Path) -> Path:
    """Where the forgotten questions of the export `checkpoint_dir` are kept: beside it, not inside."""
    folder = Path(checkpoint_dir).expanduser()
    return folder.with_name(folder.name + SIDECAR_SUFFIX)


def _read_sidecar(path: Path) -> list[str] | None:
    """The questions of a sidecar lunar-lens wrote, or None for any other file."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record["questions"] if isinstance(record, dict) and record.get("format") == SIDECAR_FORMAT else None


def check_sidecar(out: str | Path, force: bool) -> None:
    """Refuse, before any work, to overwrite a sidecar without `force`, or a file lunar-lens did not write."""
    path = sidecar_path(out)
    if not path.exists():
        return
    if _read_sidecar(path) is None:
        raise LunarError(f"{path} exists and was not written by lunar-lens: move it away, or choose another --out")
    if not force:
        raise LunarError(f"{path} (an earlier export's forgotten questions) exists: pass --force to replace it, or choose another --out")


def earlier_forgotten(model_dir: str | Path | None, earlier: dict, given: Sequence[QA] = ()) -> tuple[list[QA], list[str]]:
    """The questions earlier requests made `model_dir` forget, as text — from its report (when embedded),
    its sidecar, or `given` (the earlier forget sets passed again) — and the hashes of those with no text."""
    record = earlier.get("forgotten") or {}
    beside = (_read_sidecar(sidecar_path(model_dir)) if model_dir else None) or []
    texts = [*record.get("questions", []), *beside, *(qa.question for qa in given)]
    by_hash = {question_sha256(text): text for text in texts}
    hashes = record.get("sha256", [])
    return [QA(by_hash[h]) for h in hashes if h in by_hash], [h for h in hashes if h not in by_hash]


def direction_model(bridge: TransformerBridge, earlier: dict, device: str, dtype: str) -> TransformerBridge:
    """The model directions are read from: the unedited base of an earlier request when its folder is
    still there (measured: on the edited model the second request's direction redirects only part of its
    forget set — refusal 0.79 vs 1.00 on the toy world, experiments/sequential_requests.py), else the model itself."""
    base = earlier.get("base_model")
    if base and Path(base).is_dir():
        return load_model(base, device=device, dtype=dtype)
    if base:
        warnings.warn(f"the unedited base model {base} is gone: directions come from the edited model (weaker)")
    return bridge


def parse_layers(text: str) -> list[int] | None:
    """`auto` → None, else a comma-separated list of layer indices."""
    if text == "auto":
        return None
    return parse_numbers(text, int, "--layer", "'auto' or a comma-separated list of layer numbers", "3 or 2,3")


def unlearn(
    model: str | Path | TransformerBridge,
    forget: str | Path | Sequence[QA],
    retain: str | Path | Sequence[QA],
    reference: str | Path | Sequence[QA],
    out: str | Path | None = None,
    layers: Sequence[int] | None = None,
    coeff: float | None = None,
    settings: EditSettings | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    force: bool = False,
    progress: bool = True,
    device_map: str | dict | None = None,
    parallel: DataParallel | None = None,
    figure_probes: bool = False,
    keep_forgotten: Sequence[QA] = (),
    embed_forgotten: bool = False,
) -> UnlearnOutcome:
    """Forget `forget`, keep `retain`, using `reference` (questions the model already declines).

    `layers=None` / `coeff=None` choose them by localisation (`lunar_lens.localise`). With `out`, the
    edited model is exported (`export_outcome`). `device_map` spreads the model over devices
    (`load_model`). Under `torchrun`, each process collects its shard of the prompts, all make the same
    edit, and only rank 0 exports (`parallel=None`: from the environment,
    `lunar_lens.distributed.init_from_env`). `figure_probes` runs the localisation probes that only feed
    its figures (`lunar_lens.localise.save_localisation`). When the model is an earlier export, the
    questions it forgot stay forgotten: their text comes from its sidecar or `keep_forgotten`.
    `embed_forgotten` stores the forgotten questions' text in the report (and the exported folder).
    With `progress`, a bar per pass on a terminal and a line per stage (`lunar_lens.progress`).
    """
    settings = settings or EditSettings()
    parallel = init_from_env() if parallel is None else parallel
    progress = progress and parallel.is_main
    stages = Stages(progress)
    if out is not None and parallel.is_main and not embed_forgotten:
        check_sidecar(out, force)
    torch.manual_seed(settings.seed)
    with stages("load", "loaded the model and the sets"):
        bridge = model if isinstance(model, TransformerBridge) else load_model(
            model, device=parallel.device(device), dtype=dtype, device_map=device_map, max_memory=parallel.max_memory(device_map)
        )
        forget_set = list(forget) if not isinstance(forget, (str, Path)) else load_qa(forget)
        retain_set = list(retain) if not isinstance(retain, (str, Path)) else load_qa(retain)
        reference_set = list(reference) if not isinstance(reference, (str, Path)) else load_qa(reference)
        retain_set = check_disjoint(forget_set, retain_set)

    for layer in layers or ():
        check_layer(bridge, layer)  # fail before any forward pass
    source = str(getattr(bridge, "source_path", None))
    earlier = earlier_request(getattr(bridge, "source_path", None))
    kept, unkept = earlier_forgotten(getattr(bridge, "source_path", None), earlier, keep_forgotten)
    if unkept:
        warnings.warn(
            f"{len(unkept)} of {len(kept) + len(unkept)} questions forgotten by earlier requests of {source} have no text here "
            f"(no {sidecar_path(source).name} beside it): pass the earlier forget sets with --keep-forgotten FILE, "
            "or they may be answered again"
        )
    localising = layers is None or coeff is None
    deepest = None if localising else max(layers)  # the choice tries every layer
    read_from = direction_model(bridge, earlier, device, dtype)
    with stages("refusal", "the model's own refusal (its answers to the reference questions)"):
        refusal = model_refusal(read_from, reference_set, refusal=settings.refusal)
    settings = replace(settings, refusal=refusal.target, coeff=settings.coeff if coeff is None else float(coeff))
    kept = [QA(qa.question, refusal.target) for qa in kept]  # earlier requests stay forgotten: they keep the refusal
    with stages("directions", f"directions from {len(forget_set)} forget and {len(reference_set)} reference prompts"):
        directions = directions_for(read_from, forget_set, reference_set, settings, progress, parallel, deepest)
    directions.metadata["model"] = str(getattr(read_from, "source_path", None))
    localisation = choice = None
    if figure_probes:
        from lunar_lens.localise import LocaliseSettings, localise

        with stages("localise", "localisation probes (steering, ablation, patching) for the figures"):
            localisation = localise(
                bridge, forget_set, retain_set, reference_set, settings=LocaliseSettings(edit=settings), directions=directions, progress=progress
            )
    if localising:
        with stages("choice", "choosing the layer(s) and c on held-out generations"):
            choice = choose_edit(
                bridge, forget_set, retain_set + kept, refusal, directions, settings,
                ChoiceSettings(coeffs=(coeff,) if coeff is not None else ChoiceSettings.coeffs),
                layer_sets=None if layers is None else [sorted(layers)], progress=progress,
            )
        choice = parallel.gather(choice)[0]  # every rank makes the edit rank 0 chose
        settings = replace(settings, coeff=choice.coeff)
        result = apply_edits(bridge, choice.edits, directions, settings.coeff, refusal.target)
    else:
        with stages("edit", f"edit of W_out, layer(s) {', '.join(map(str, sorted(layers)))}, c = {settings.coeff:g}"):
            result = edit_layers(bridge, forget_set, retain_set, reference_set, layers, settings, directions, kept, progress, parallel)

    forgotten = list(dict.fromkeys(qa.question for qa in [*kept, *forget_set]))
    hashes = list(dict.fromkeys([*(question_sha256(qa.question) for qa in kept), *unkept, *(question_sha256(qa.question) for qa in forget_set)]))
    report = {
        "source": source,
        "base_model": earlier.get("base_model", source),
        "settings": asdict(settings),
        "layers": [layer.layer for layer in result.layers],
        "coeff": settings.coeff,
        "refusal": refusal.summary(),
        "choice": None if choice is None else choice.summary(),
        "sizes": {"forget": len(forget_set), "retain": len(retain_set), "reference": len(reference_set), "kept_forgotten": len(kept)},
        "edit": result.report(),
        "localisation": None if localisation is None else localisation.summary(),  # the probes' view (figures)
        "forgotten": {"count": len(hashes), "sha256": hashes, **({"questions": forgotten} if embed_forgotten else {})},
        "timings_s": stages.seconds,
        "processes": parallel.size,
    }
    outcome = UnlearnOutcome(bridge, result, report, None, localisation, forgotten)
    if out is not None and parallel.is_main:
        outcome.out_dir = export_outcome(outcome, out, force=force, progress=progress)
    return outcome


def export_outcome(outcome: UnlearnOutcome, out: str | Path, force: bool = False, results_table: str | None = None, progress: bool = True) -> Path:
    """Export the edited model of `outcome` as a verified checkpoint folder with its report, directions,
    patch and model card (`results_table`: a before/after table for the card), and write the forgotten
    questions' sidecar beside it (unless the report embeds them)."""
    embedded = "questions" in outcome.report["forgotten"]
    if not embedded:
        check_sidecar(out, force)
    from lunar_lens.export import export_checkpoint

    report = outcome.report
    stages = Stages(progress)
    with stages("export", f"export to {out}, verified by reloading"):
        info = {key: report[key] for key in ("layers", "coeff", "settings", "base_model")}
        export = export_checkpoint(
            outcome.bridge, out, [edit.layer for edit in outcome.result.edits], manifest=report, force=force,
            extra_files={REPORT_NAME: report}, patch=outcome.result.edits, patch_info=info,
            directions=outcome.result.directions, results_table=results_table,
        )
        if not embedded:
            path = sidecar_path(out)
            partial = path.with_name(f".{path.name}.partial")
            partial.touch(mode=0o600)  # the private text: readable by its owner only
            partial.write_text(json.dumps({"format": SIDECAR_FORMAT, "checkpoint": str(export.out_dir), "questions": outcome.forgotten}, indent=2) + "\n")
            os.replace(partial, path)
    report["timings_s"]["export"] = stages.seconds["export"]
    return Path(export.out_dir)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("unlearn", help="forget a set of questions and export the edited checkpoint")
    parser.add_argument("--model", required=True, help="HF model folder or hub id")
    parser.add_argument("--forget", required=True, help="questions to forget (JSON, JSONL, CSV, TXT, HF dataset)")
    parser.add_argument("--retain", required=True, help="questions (with answers) to keep")
    parser.add_argument("--reference", required=True, help="questions the model already declines")
    parser.add_argument("--out", required=True, help="output folder (a Hugging Face checkpoint)")
    parser.add_argument("--layer", default="auto", help="auto, or layer number(s): 3 or 2,3")
    parser.add_argument("--coeff", default="auto", help="auto, or the redirection coefficient c")
    parser.add_argument("--positions", default=EditSettings.positions, help="forget positions redirected (see lunar_lens.activations)")
    parser.add_argument("--solver", default="closed", choices=["closed", "adamw", "lora"])
    parser.add_argument(
        "--no-retain-answers", action="store_true",
        help="keep retain prompts only, not their teacher-forced answers (the released recipe's objective)",
    )
    parser.add_argument("--lora-rank", type=int, default=EditSettings.lora_rank)
    parser.add_argument(
        "--refine-steps", type=int, default=RefineSettings.steps,
        help="Adam steps training the edited W_out on behaviour (the refusal on forget prompts, the answers on retain ones); 0: the solver's edit alone",
    )
    parser.add_argument("--refusal", default=None, help="the response forget prompts should get (default: the model's own most common refusal to the reference questions)")
    parser.add_argument("--ridge", type=float, default=EditSettings.ridge)
    add_device_arguments(parser, device_help="cpu or cuda (under torchrun: one GPU per process)")
    parser.add_argument("--device-map", default=None, help="spread the model over devices: auto, balanced, or a JSON {module: device}")
    parser.add_argument("--batch-size", type=int, default=EditSettings.batch_size, help="prompts per forward pass (activation memory)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
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
    parser.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> None:
    coeff = None if args.coeff == "auto" else _parse_coeff(args.coeff)
    layers = parse_layers(args.layer)
    if args.localisation and layers is not None and coeff is not None:
        raise LunarError("--localisation writes the automatic choice's scores: use it with --layer auto or --coeff auto")
    settings = EditSettings(
        positions=args.positions, solver=args.solver, retain_answers=not args.no_retain_answers, lora_rank=args.lora_rank, ridge=args.ridge,
        seed=args.seed, batch_size=args.batch_size, refusal=args.refusal, refine=RefineSettings(steps=args.refine_steps),
    )
    outcome = unlearn(
        args.model, args.forget, args.retain, args.reference, args.out, layers, coeff, settings,
        device=args.device, dtype=args.dtype, force=args.force, device_map=parse_device_map(args.device_map),
        figure_probes=bool(args.localisation), keep_forgotten=[qa for path in args.keep_forgotten for qa in load_qa(path)],
        embed_forgotten=args.embed_forgotten,
    )
    if outcome.out_dir is None:  # not rank 0 of a torchrun launch: rank 0 reports
        return
    if args.localisation:
        print("\n".join(f"wrote {path}" for path in save_figures(outcome, args.localisation)))
    layers = ", ".join(
        str(l["layer"]) + ("" if l["objective_before"] is None else f" (objective {l['objective_before']:.3g} → {l['objective_after']:.3g})")
        for l in outcome.report["edit"]["layers"]
    )
    if outcome.report["choice"]:
        held = outcome.report["choice"]["predicted_heldout"]
        print(
            f"chosen on held-out questions: forget refusal {held['forget_refusal']:.2f}, forget ROUGE-1 {held['forget_rouge1']:.3f}, "
            f"retain ROUGE-1 {held['retain_rouge1']:.3f} (aimed at the model's own refusal {outcome.report['refusal']['target']!r})"
        )
    beside = "" if args.embed_forgotten else f" and {sidecar_path(outcome.out_dir)} (the forgotten questions: keep it private)"
    print(f"edited layer(s) {layers} with c = {outcome.report['coeff']:g}; wrote {outcome.out_dir}{beside}")


def save_figures(outcome: UnlearnOutcome, out_dir: str | Path) -> list[Path]:
    """The localisation probes' scores and figures (when they ran) and the automatic choice's figure, in `out_dir`."""
    from lunar_lens.figures import plot_choice
    from lunar_lens.localise import save_localisation

    written = list(save_localisation(outcome.localisation, out_dir).values()) if outcome.localisation is not None else []
    if outcome.report["choice"]:
        written.append(plot_choice(outcome.report["choice"], Path(out_dir) / "choice.png"))
    return written


def parse_device_map(text: str | None) -> str | dict | None:
    """`--device-map`: a name accelerate knows (auto, balanced, sequential) or a JSON object."""
    if text is None or not text.lstrip().startswith("{"):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise LunarError(f"--device-map is not valid JSON ({error}): write it as '{{\"model.layers.0\": 0, ...}}'") from None


def _parse_coeff(text: str) -> float:
    values = parse_numbers(text, float, "--coeff", "'auto' or a number", "4.0")
    if len(values) != 1:
        raise LunarError(f"--coeff {text!r} is not 'auto' or a number (e.g. --coeff 4.0)")
    return values[0]
