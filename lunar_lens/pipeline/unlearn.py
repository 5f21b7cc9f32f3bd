"""`unlearn`: load → directions → localise → edit → export, as one call (the `unlearn` command runs it).

What was forgotten stays out of the exported folder: `lunar_report.json` holds the forgotten questions'
count and SHA-256 hashes, and their text goes to a sidecar file *beside* the folder (`DIR.forgotten.json`),
where a later request on DIR finds it (or pass the earlier forget sets again: `keep_forgotten`);
`embed_forgotten` puts the text into the report instead."""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformer_lens.model_bridge import TransformerBridge

from lunar_lens.choose.choice import ChoiceSettings, choose_edit
from lunar_lens.choose.unlisted import unlisted_keep
from lunar_lens.core.atomic import FORMAT, check_output, write_json
from lunar_lens.core.distributed import DataParallel, init_from_env
from lunar_lens.core.errors import LunarError
from lunar_lens.core.progress import Stages
from lunar_lens.core.settings import RunSettings
from lunar_lens.data.qa import QA, check_disjoint, load_qa
from lunar_lens.directions.mean_difference import directions_for
from lunar_lens.directions.refusals import model_refusal
from lunar_lens.edit.layers import EditResult, EditSettings, apply_edits, edit_layers
from lunar_lens.model.checkpoint import REPORT_FILE as REPORT_NAME
from lunar_lens.model.checkpoint import Checkpoint, file_sha256
from lunar_lens.model.generation import own_answers
from lunar_lens.model.load import check_folder_layers, load_model, loaded_from, model_folder
from lunar_lens.model.names import check_layer

SIDECAR_SUFFIX = ".forgotten.json"
SIDECAR_FORMAT = "lunar-lens forgotten questions 1"
REJECTED_SUFFIX = ".choice.json"  # the report of an automatic choice that found no acceptable edit, beside OUT


class BelowFloor(LunarError):
    """The automatic choice found no edit that keeps retain above the floor and refuses the forget set:
    nothing was exported. `report` is what `lunar_report.json` would have held (its choice, every candidate)."""

    def __init__(self, message: str, report: dict) -> None:
        super().__init__(message, ("accept_below_floor", "min_retain"))
        self.report = report


def rejected_path(out: str | Path) -> Path:
    """Where the report of a refused automatic choice for the export `out` goes: beside it."""
    folder = Path(out).expanduser()
    return folder.with_name(folder.name + REJECTED_SUFFIX)


@dataclass
class UnlearnOutcome:
    bridge: TransformerBridge  # the edited in-memory model
    result: EditResult
    report: dict
    out_dir: Path | None
    localisation: object | None = None  # lunar_lens.choose.probes.Localisation when `figure_probes` asked for the probes
    forgotten: list[str] = field(default_factory=list)  # every question the model now declines (earlier requests' too)


def earlier_request(model_dir: str | Path | None) -> dict:
    """The `lunar_report.json` of an earlier lunar-lens request that produced this checkpoint ({} if none)."""
    report = Path(model_dir) / REPORT_NAME if model_dir else None
    if report is None or not report.is_file():
        return {}
    try:
        record = json.loads(report.read_text())
    except ValueError:
        record = None
    if not isinstance(record, dict):
        raise LunarError(f"{report} is not a valid lunar-lens report: the checkpoint was modified; start again from its base")
    return record


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


def check_sidecar(out: str | Path, force: bool, inputs: Sequence[str | Path] = ()) -> Path:
    """Refuse, before any work, the sidecar of the export `out` when it may not be written
    (`lunar_lens.core.atomic.check_output`): an existing one without `force`, a file lunar-lens did not
    write, one that is an input."""
    return check_output(sidecar_path(out), folder=False, force=force, inputs=inputs)


def earlier_forgotten(model_dir: str | Path | None, earlier: dict, given: Sequence[QA] = ()) -> tuple[list[QA], list[str]]:
    """The questions earlier requests made `model_dir` forget, as text — from its report (when embedded),
    its sidecar, or `given` (the earlier forget sets passed again) — and the hashes of those with no text."""
    record = earlier.get("forgotten") or {}
    if isinstance(record, list):  # a report written before the text moved out of the folder: the questions themselves
        record = {"questions": record, "sha256": [question_sha256(text) for text in record]}
    beside = (_read_sidecar(sidecar_path(model_dir)) if model_dir else None) or []
    texts = [*record.get("questions", []), *beside, *(qa.question for qa in given)]
    by_hash = {question_sha256(text): text for text in texts}
    hashes = record.get("sha256", [])
    return [QA(by_hash[h]) for h in hashes if h in by_hash], [h for h in hashes if h not in by_hash]


def base_record(folder: Path) -> dict:
    """How a later request finds and recognises this unedited base: its absolute folder and the
    SHA-256 of its weight files."""
    checkpoint = Checkpoint.open(folder)
    return {"path": str(checkpoint.root), "sha256": {rel: file_sha256(checkpoint.root / rel) for rel in sorted(checkpoint.weight_files)}}


def unedited_base(earlier: dict) -> Path | None:
    """The unedited base of an earlier request, when its folder still holds the same weights (checked
    by their SHA-256); else None, with a warning: the directions then come from the edited model.

    Measured: on the edited model the second request's direction redirects only part of its forget set
    (refusal 0.79 vs 1.00 on the toy world, experiments/sequential_requests.py)."""
    base = earlier.get("base_model")
    if not base:
        return None
    if not isinstance(base, dict) or not isinstance(base.get("sha256"), dict):
        problem = "was recorded without its hashes (an older lunar-lens)"
    elif not Path(base["path"]).is_dir():
        problem = "is gone"
    else:
        try:
            same = base_record(Path(base["path"]))["sha256"] == base["sha256"]
        except LunarError:
            same = False
        if same:
            return Path(base["path"])
        problem = "no longer holds the weights it had"
    where = base.get("path") if isinstance(base, dict) else base
    warnings.warn(f"the unedited base model {where} {problem}: directions come from the edited model (weaker)", stacklevel=2)
    return None


def unlearn(
    model: str | Path | TransformerBridge,
    forget: str | Path | Sequence[QA],
    retain: str | Path | Sequence[QA],
    reference: str | Path | Sequence[QA],
    out: str | Path | None = None,
    layers: Sequence[int] | None = None,
    settings: EditSettings | None = None,
    run: RunSettings | None = None,
    parallel: DataParallel | None = None,
    figure_probes: bool = False,
    keep_forgotten: Sequence[QA | str | Path] = (),
    embed_forgotten: bool = False,
    keep: str | Path | Sequence[QA] = (),
    choice_settings: ChoiceSettings | None = None,
    accept_below_floor: bool = False,
) -> UnlearnOutcome:
    """Forget `forget`, keep `retain`, using `reference` (questions the model already declines).

    `layers=None` / `settings.coeff=None` choose them on held-out generations (`lunar_lens.choose.choice`); the
    report records the c used (`settings`, written with `EditSettings.to_dict`). With `out`, the edited model
    is exported (`export_outcome`). `run`: where the model loads (device, dtype, device map), `force` and
    `progress` (`RunSettings`). Under `torchrun`, each process collects its shard of the prompts, all make the
    same edit, and only rank 0 exports (`parallel=None`: from the environment,
    `lunar_lens.core.distributed.init_from_env`). `figure_probes` runs the localisation probes, which only feed
    the figures (`lunar_lens.core.figures.save_localisation`). When the model is an earlier export, the
    questions it forgot stay forgotten: their text comes from its sidecar or `keep_forgotten` (the earlier
    forget sets: questions, or files of them). Every argument, file and output is checked before the model loads.
    `embed_forgotten` stores the forgotten questions' text in the report (and the exported folder).
    `keep`: questions about knowledge the user did not list (answers optional: the model's own greedy answers
    fill them), kept like retain and judged apart by the automatic choice (`lunar_lens.choose.choice`).
    With `run.progress`, a bar per pass on a terminal and a line per stage (`lunar_lens.core.progress`).
    `choice_settings`: how the automatic choice searches and its floors (`ChoiceSettings`: `min_retain`,
    `target_refusal`). When the edit it chose is not acceptable (below the retain floor, or refusing too
    little), nothing is exported and `BelowFloor` is raised (its report also goes to `OUT.choice.json`),
    unless `accept_below_floor`.
    """
    settings = settings or EditSettings()
    run = run or RunSettings()
    parallel = init_from_env() if parallel is None else parallel
    progress = run.progress and parallel.is_main
    stages = Stages(progress)
    with stages("load", "loaded the model and the sets"):
        # everything that needs no model is checked before it loads: the sets, the outputs, the layers, the base
        files = [data for data in (forget, retain, reference, keep, *keep_forgotten) if isinstance(data, (str, Path))]
        forget_set = list(forget) if not isinstance(forget, (str, Path)) else load_qa(forget)
        retain_set = list(retain) if not isinstance(retain, (str, Path)) else load_qa(retain)
        reference_set = list(reference) if not isinstance(reference, (str, Path)) else load_qa(reference)
        retain_set = check_disjoint(forget_set, retain_set)
        keep_set = list(keep) if not isinstance(keep, (str, Path)) else load_qa(keep)
        keep_set = check_disjoint(forget_set, keep_set, "keep")
        given = [qa for item in keep_forgotten for qa in (load_qa(item) if isinstance(item, (str, Path)) else [item])]
        source = loaded_from(model) if isinstance(model, TransformerBridge) else model
        if out is not None and parallel.is_main:
            inputs = [i for i in (source, *files) if i is not None]
            check_output(out, folder=True, force=run.force, inputs=inputs)
            if not embed_forgotten:
                check_sidecar(out, run.force, inputs)
            if layers is None or settings.coeff is None:
                check_output(rejected_path(out), folder=False, force=run.force, inputs=inputs)
        choice_settings = choice_settings or ChoiceSettings()
        folder = None if source is None else model_folder(source)
        if layers is not None and not layers:
            raise LunarError("no layer to edit: give at least one layer in {layers}", ("layers",))
        if isinstance(model, TransformerBridge):  # the layers are checked once, before any forward pass
            for layer in layers or ():
                check_layer(model, layer)
        else:
            check_folder_layers(folder, layers or ())
        earlier = earlier_request(folder)
        kept, unkept = earlier_forgotten(folder, earlier, given)
        if unkept:
            warnings.warn(
                f"{len(unkept)} of {len(kept) + len(unkept)} questions forgotten by earlier requests of {folder} have no text here "
                f"(no {sidecar_path(folder).name} beside it): pass the earlier forget sets with --keep-forgotten FILE, "
                "or they may be answered again", stacklevel=2,
            )
        base = unedited_base(earlier)
        torch.manual_seed(settings.seed)

        def load(path: str | Path) -> TransformerBridge:  # this process's device (torchrun), the device map
            return load_model(path, device=parallel.device(run.device), dtype=run.dtype, device_map=run.device_map,
                              max_memory=parallel.max_memory(run.device_map))

        bridge = model if isinstance(model, TransformerBridge) else load(model)

    localising = layers is None or settings.coeff is None
    deepest = None if localising else max(layers)  # the choice tries every layer
    read_from = bridge if base is None else load(base)  # placed like the model itself
    with stages("refusal", "the model's own refusal (its answers to the reference questions)"):
        refusal = model_refusal(read_from, reference_set, refusal=settings.refusal)
    settings = replace(settings, refusal=refusal.target)  # a copy: the caller's settings stay as they were
    kept = [QA(qa.question, refusal.target) for qa in kept]  # earlier requests stay forgotten: they keep the refusal
    if keep_set:
        with stages("keep", f"the model's own answers to {len(keep_set)} keep questions"):
            keep_set = own_answers(bridge, keep_set)
    unlisted: list[QA] = []
    if settings.unlisted:
        with stages("unlisted", "the model's own answers to general-knowledge questions (knowledge nobody listed)"):
            unlisted = unlisted_keep(
                bridge, settings.unlisted, [qa.question for qa in [*forget_set, *kept]], [qa.question for qa in [*retain_set, *keep_set]]
            )
    keep_rows = keep_set + unlisted  # kept like retain, judged apart
    with stages("directions", f"directions from {len(forget_set)} forget and {len(reference_set)} reference prompts"):
        directions = directions_for(read_from, forget_set, reference_set, settings, progress, parallel, deepest)
    directions.metadata["model"] = str(loaded_from(read_from))
    localisation = choice = None
    if figure_probes:
        from lunar_lens.choose.probes import LocaliseSettings, localise

        with stages("localise", "localisation probes (steering, ablation, patching) for the figures"):
            localisation = localise(
                bridge, forget_set, retain_set, reference_set, settings=LocaliseSettings(edit=settings, figure_probes=True), directions=directions,
                progress=progress,
            )
    if localising:
        with stages("choice", "choosing the layer(s) and c on held-out generations"):
            choice = choose_edit(
                bridge, forget_set, retain_set + kept, refusal, directions, settings,
                replace(choice_settings, coeffs=choice_settings.coeffs if settings.coeff is None else (settings.coeff,)),
                layer_sets=None if layers is None else [sorted(layers)], progress=progress, keep=keep_rows,
            )
        choice = parallel.gather(choice)[0]  # every rank makes the edit rank 0 chose
        settings = replace(settings, coeff=choice.coeff)
        result = apply_edits(bridge, choice.edits, directions, settings.coeff, refusal.target)
    else:
        with stages("edit", f"edit of W_out, layer(s) {', '.join(map(str, sorted(layers)))}, c = {settings.coeff:g}"):
            result = edit_layers(bridge, forget_set, retain_set + keep_rows, reference_set, layers, settings, directions, kept, progress, parallel)

    forgotten = list(dict.fromkeys(qa.question for qa in [*kept, *forget_set]))
    hashes = list(dict.fromkeys([*(question_sha256(qa.question) for qa in kept), *unkept, *(question_sha256(qa.question) for qa in forget_set)]))
    report = {
        "source": None if folder is None else str(folder),
        "base_model": earlier.get("base_model") or (None if folder is None else base_record(folder)),
        "settings": settings.to_dict(),
        "layers": [layer.layer for layer in result.layers],
        "coeff": settings.coeff,
        "refusal": refusal.summary(),
        "choice": None if choice is None else choice.summary(),
        "sizes": {
            "forget": len(forget_set), "retain": len(retain_set), "reference": len(reference_set),
            "keep": len(keep_set), "unlisted": len(unlisted), "kept_forgotten": len(kept),
        },
        "edit": result.report(),
        "localisation": None if localisation is None else localisation.summary(),  # the probes' view (figures)
        "forgotten": {"count": len(hashes), "sha256": hashes, **({"questions": forgotten} if embed_forgotten else {})},
        "timings_s": stages.seconds,
        "processes": parallel.size,
    }
    outcome = UnlearnOutcome(bridge, result, report, None, localisation, forgotten)
    if choice is not None and not choice.acceptable and not accept_below_floor:
        if out is not None and parallel.is_main:
            record = {"format": f"{FORMAT} rejected choice 1", **{k: v for k, v in report.items() if k != "forgotten"}}
            write_json(rejected_path(out), record, force=run.force)
        where = "" if out is None else f" (nothing written to {out}; the choice's report: {rejected_path(out)})"
        raise BelowFloor(
            f"no edit found that keeps what it must: the best candidate, {choice.verdict}{where}; "
            "pass {accept_below_floor} to export it anyway, or lower {min_retain}", report,
        )
    if out is not None and parallel.is_main:
        outcome.out_dir = export_outcome(outcome, out, force=run.force, progress=progress)
    return outcome


def export_outcome(outcome: UnlearnOutcome, out: str | Path, force: bool = False, results_table: str | None = None, progress: bool = True) -> Path:
    """Export the edited model of `outcome` as a verified checkpoint folder with its report, directions,
    patch and model card (`results_table`: a before/after table for the card), and write the forgotten
    questions' sidecar beside it (unless the report embeds them)."""
    embedded = "questions" in outcome.report["forgotten"]
    if not embedded:
        check_sidecar(out, force)
    from lunar_lens.artefacts.export import export_checkpoint

    report = outcome.report
    stages = Stages(progress)
    with stages("export", f"export to {out}, verified by reloading"):
        info = {key: report[key] for key in ("layers", "coeff", "settings", "base_model")}
        export = export_checkpoint(
            outcome.bridge, out, [edit.layer for edit in outcome.result.edits], manifest=report, force=force,
            extra_files={REPORT_NAME: report}, patch=outcome.result.edits, patch_info=info,
            directions=outcome.result.directions, results_table=results_table,
        )
        if not embedded:  # the private text: readable by its owner only
            record = {"format": SIDECAR_FORMAT, "checkpoint": export.out_dir.name, "questions": outcome.forgotten}  # the folder beside it
            write_json(sidecar_path(out), record, force=force, private=True)
    report["timings_s"]["export"] = stages.seconds["export"]
    return Path(export.out_dir)
