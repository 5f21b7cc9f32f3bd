"""`unlearn`: load → directions → localise → edit → export, as one call (Python API and CLI)."""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformer_lens.model_bridge import TransformerBridge

from lunar_lens.cli import add_device_arguments, non_negative_number, parse_numbers, whole_number
from lunar_lens.data import QA, check_disjoint, load_qa
from lunar_lens.distributed import DataParallel, init_from_env
from lunar_lens.edit import EditResult, EditSettings, check_coeff, directions_for, edit_layers
from lunar_lens.errors import LunarError
from lunar_lens.model import check_folder_layers, check_layer, load_model, model_folder
from lunar_lens.outputs import check_output
from lunar_lens.patches import Checkpoint, file_sha256

REPORT_NAME = "lunar_report.json"


@dataclass
class UnlearnOutcome:
    bridge: TransformerBridge  # the edited in-memory model
    result: EditResult
    report: dict
    out_dir: Path | None
    localisation: object | None = None  # lunar_lens.localise.Localisation when the layer or c was chosen automatically


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
) -> UnlearnOutcome:
    """Forget `forget`, keep `retain`, using `reference` (questions the model already declines).

    `layers=None` / `coeff=None` choose them by localisation (`lunar_lens.localise`). With `out`, the
    edited model is exported as a verified Hugging Face checkpoint plus `lunar_report.json`.
    `device_map` spreads the model over devices (`load_model`). Under `torchrun`, each process
    collects its shard of the prompts, all make the same edit, and only rank 0 exports
    (`parallel=None`: from the environment, `lunar_lens.distributed.init_from_env`). `figure_probes`
    runs the localisation probes that only feed its figures (`lunar_lens.localise.save_localisation`).
    """
    started = time.perf_counter()
    settings = settings or EditSettings()
    coeff = None if coeff is None else check_coeff(coeff)
    parallel = init_from_env() if parallel is None else parallel
    progress = progress and parallel.is_main
    # everything that needs no model is checked before it loads: the sets, the output, the layers, the base
    files = [data for data in (forget, retain, reference) if isinstance(data, (str, Path))]
    forget_set = list(forget) if not isinstance(forget, (str, Path)) else load_qa(forget)
    retain_set = list(retain) if not isinstance(retain, (str, Path)) else load_qa(retain)
    reference_set = list(reference) if not isinstance(reference, (str, Path)) else load_qa(reference)
    retain_set = check_disjoint(forget_set, retain_set)
    source = model.source_path if isinstance(model, TransformerBridge) else model
    if out is not None and parallel.is_main:
        check_output(out, folder=True, force=force, inputs=[i for i in (source, *files) if i is not None])
    folder = None if source is None else model_folder(source)
    if folder is not None:
        check_folder_layers(folder, layers or ())
    earlier = earlier_request(folder)
    base = unedited_base(earlier)
    torch.manual_seed(settings.seed)
    bridge = model if isinstance(model, TransformerBridge) else load_model(
        model, device=parallel.device(device), dtype=dtype, device_map=device_map, max_memory=parallel.max_memory(device_map)
    )
    timings = {"load": time.perf_counter() - started}

    for layer in layers or ():
        check_layer(bridge, layer)  # fail before any forward pass
    localising = layers is None or coeff is None
    deepest = None if localising else max(layers)  # localisation probes every layer
    direction_bridge = bridge if base is None else load_model(base, device=device, dtype=dtype)
    directions = directions_for(direction_bridge, forget_set, reference_set, settings, progress, parallel, deepest)
    localisation = None
    if localising:
        from lunar_lens.localise import choose_layer_and_coeff

        chosen_layers, chosen_coeff, localisation = choose_layer_and_coeff(
            bridge, forget_set, retain_set, reference_set, settings, directions=directions, progress=progress,
            figure_probes=figure_probes,
        )
        layers = chosen_layers if layers is None else layers
        coeff = chosen_coeff if coeff is None else coeff
        layers, coeff = parallel.gather((layers, coeff))[0]  # every rank edits what rank 0 chose
    timings["localise"] = time.perf_counter() - started - timings["load"]
    settings.coeff = float(coeff)

    kept = [QA(question) for question in earlier.get("forgotten", [])]  # earlier requests stay forgotten
    result = edit_layers(
        bridge, forget_set, retain_set, reference_set, layers, settings, directions, kept, progress, parallel
    )
    timings["edit"] = sum(layer.seconds_collect + layer.seconds_solve for layer in result.layers)

    report = {
        "source": None if folder is None else str(folder),
        "base_model": earlier.get("base_model") or (None if folder is None else base_record(folder)),
        "settings": asdict(settings),
        "layers": [layer.layer for layer in result.layers],
        "coeff": settings.coeff,
        "sizes": {"forget": len(forget_set), "retain": len(retain_set), "reference": len(reference_set), "kept_forgotten": len(kept)},
        "edit": result.report(),
        "localisation": None if localisation is None else localisation.summary(),
        "forgotten": [qa.question for qa in kept] + [qa.question for qa in forget_set],
        "timings_s": timings,
        "processes": parallel.size,
    }
    out_dir = None
    if out is not None and parallel.is_main:
        from lunar_lens.export import export_checkpoint

        export_started = time.perf_counter()
        export = export_checkpoint(bridge, out, [edit.layer for edit in result.edits], manifest=report, force=force, extra_files={REPORT_NAME: report})
        timings["export"] = time.perf_counter() - export_started
        out_dir = Path(export.out_dir)
    return UnlearnOutcome(bridge, result, report, out_dir, localisation)


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
    parser.add_argument("--lora-rank", type=whole_number(), default=EditSettings.lora_rank)
    parser.add_argument("--ridge", type=non_negative_number, default=EditSettings.ridge)
    add_device_arguments(parser, device_help="cpu or cuda (under torchrun: one GPU per process)")
    parser.add_argument("--device-map", default=None, help="spread the model over devices: auto, balanced, or a JSON {module: device}")
    parser.add_argument("--batch-size", type=whole_number(), default=EditSettings.batch_size, help="prompts per forward pass (activation memory)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace an earlier lunar-lens output in --out (and --localisation)")
    parser.add_argument(
        "--localisation", metavar="DIR",
        help="with --layer/--coeff auto: also write localisation.json and its figures to DIR (as `lunar-lens localise`)",
    )
    parser.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> None:
    coeff = None if args.coeff == "auto" else _parse_coeff(args.coeff)
    layers = parse_layers(args.layer)
    if args.localisation and layers is not None and coeff is not None:
        raise LunarError("--localisation writes the automatic choice's scores: use it with --layer auto or --coeff auto")
    if args.localisation:
        check_output(args.localisation, folder=True, force=args.force, inputs=[args.out, args.model], parameter="localisation")
    settings = EditSettings(
        positions=args.positions, solver=args.solver, retain_answers=not args.no_retain_answers, lora_rank=args.lora_rank, ridge=args.ridge, seed=args.seed, batch_size=args.batch_size
    )
    outcome = unlearn(
        args.model, args.forget, args.retain, args.reference, args.out, layers, coeff, settings,
        device=args.device, dtype=args.dtype, force=args.force, device_map=parse_device_map(args.device_map),
        figure_probes=bool(args.localisation),
    )
    if outcome.out_dir is None:  # not rank 0 of a torchrun launch: rank 0 reports
        return
    if args.localisation:
        from lunar_lens.localise import save_localisation

        written = save_localisation(outcome.localisation, args.localisation, force=args.force)
        print("\n".join(f"wrote {path}" for path in written.values()))
    layers = ", ".join(f"{l['layer']} (objective {l['objective_before']:.3g} → {l['objective_after']:.3g})" for l in outcome.report["edit"]["layers"])
    print(f"edited layer(s) {layers} with c = {outcome.report['coeff']:g}; wrote {outcome.out_dir}")


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
