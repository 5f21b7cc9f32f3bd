"""Export an edited model as a Hugging Face checkpoint folder, verified by reloading it with plain
transformers. Every tensor but the edited W_out keeps the source's bytes (only the shards holding an
edited tensor are rewritten, in place in a copy), the source dtype is kept, tokenizer, chat template
and config files are carried over, and `lunar_manifest.json` records the source hashes, the edit and
the verification. Beside the weights: the edit as a patch (`lunar_patch.safetensors`, registered as
applied to the source, so `lunar-lens patch revert` gives the source back), the directions when given
(`lunar_directions.*`) and a model card (`README.md`). The folder appears atomically, or not at all."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelCardData
from transformer_lens.model_bridge import TransformerBridge

from lunar_lens.artefacts.patched import patch_record, patch_state, stash_dir, write_patch_state
from lunar_lens.artefacts.patches import load_patch, save_patch
from lunar_lens.artefacts.verification import EditedTensor, verify_export
from lunar_lens.core.atomic import MANIFEST, atomic_output, write_manifest
from lunar_lens.core.errors import LunarError
from lunar_lens.directions.mean_difference import Directions
from lunar_lens.edit.layers import WOutEdit
from lunar_lens.model.checkpoint import (
    ARTEFACTS,
    CARD_FILE,
    DIRECTIONS_FILE,
    PATCH_FILE,
    ST_NAMES,
    Checkpoint,
    copy_checkpoint,
    file_sha256,
    read_manifest,
    tensor_sha256,
)
from lunar_lens.model.load import loaded_from
from lunar_lens.model.weights import w_out_is_transposed, w_out_parameter, w_out_tensor_name

DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Who wrote the novel Pride and Prejudice?",
    "Explain photosynthesis in one sentence.",
)
PACKAGES = ("lunar-lens", "torch", "transformers", "transformer-lens", "safetensors")


@dataclass
class ExportResult:
    out_dir: Path
    edited_tensors: list[str]  # checkpoint names
    rewritten_files: list[str]  # shards that differ from the source
    verification: dict | None
    manifest: dict


def _edited_tensor(bridge: TransformerBridge, checkpoint: Checkpoint, layer: int) -> EditedTensor:
    name = w_out_tensor_name(bridge, layer)
    key = checkpoint.key(name)
    source = checkpoint.read(key)
    live = w_out_parameter(bridge, layer).detach()
    if live.shape != source.shape:
        raise LunarError(
            f"W_out of layer {layer} is {list(live.shape)} in memory but {key} is {list(source.shape)} in {checkpoint.root}: "
            "export a model loaded (with lunar_lens.model.load_model) from that folder"
        )
    # copies, never views: a view would keep the loaded file's whole mapping resident through the verification
    return EditedTensor(layer, name, key, live.to("cpu", source.dtype, copy=True), source, live.to("cpu", torch.float32, copy=True))


def _edit_record(edited: EditedTensor, checkpoint: Checkpoint) -> dict:
    change = edited.live - edited.source.float()
    cast_error = (edited.value.float() - edited.live).norm() / change.norm().clamp_min(torch.finfo(torch.float32).tiny)
    return {
        "tensor": edited.key, "layer": edited.layer, "file": checkpoint.weight_map[edited.key],
        "dtype": ST_NAMES[edited.value.dtype], "shape": list(edited.value.shape),
        "sha256": tensor_sha256(edited.value), "source_sha256": tensor_sha256(edited.source),
        "edit_norm": float(change.norm()), "cast_relative_error": float(cast_error),
    }


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def _full_edits(bridge: TransformerBridge, edited: list[EditedTensor]) -> list[WOutEdit]:
    """Each edited W_out's whole change from the source, as edits (when no factors are known)."""
    edits = []
    for e in edited:
        change = e.live - e.source.float()
        edits.append(WOutEdit(e.layer, e.name, change.T if w_out_is_transposed(bridge, e.layer) else change))
    return edits


def _table(rows: Sequence[tuple[str, object]]) -> str:
    return "\n".join(["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows if value not in (None, ""))])


def model_card(record: dict, source_card: Path | None = None, results_table: str | None = None) -> ModelCard:
    """The Hugging Face model card of an export, from its manifest `record`: front matter (base_model,
    library_name, tags, and the source card's license) and what was done, measured and how to undo it."""
    from huggingface_hub.repocard import metadata_load

    run, patch = record["run"], record["patches"][-1]
    settings = run.get("settings") or patch["info"].get("settings") or {}
    recorded = run.get("base_model")  # lunar_lens.pipeline.base_record: the unedited base's folder and hashes
    base = (recorded["path"] if isinstance(recorded, dict) else recorded) or record["source"]["path"]
    licence = (metadata_load(source_card) or {}).get("license") if source_card else None
    data = ModelCardData(base_model=base, library_name="transformers", tags=["lunar-lens", "unlearning", "lunar"], license=licence)
    sizes = run.get("sizes") or {}
    facts = _table([
        ("base model", f"`{base}`"),
        ("edited", ", ".join(f"`{t['tensor']}` (layer {t['layer']}, ‖ΔW‖ = {t['edit_norm']:.4g})" for t in record["edited_tensors"])),
        ("coefficient c", run.get("coeff")),
        ("solver", settings.get("solver")),
        ("redirected positions", settings.get("positions")),
        ("layer and c chosen by", "localisation (`--layer auto`)" if run.get("localisation") else None),
        ("forget / retain / reference questions", " / ".join(str(sizes[k]) for k in ("forget", "retain", "reference")) if sizes else None),
        ("kept forgotten from earlier requests", sizes.get("kept_forgotten") or None),
        ("patch scale", patch["scale"] if patch["scale"] != 1 else None),
    ])
    versions = ", ".join(f"{name} {number}" for name, number in record["versions"].items() if number)
    check = record["verification"]
    verified = (
        f"Reloaded with plain `transformers` and compared with the in-memory edit: max |Δ logit| {check['max_abs_logit_diff']:.2g} "
        f"on {check['prompts']} prompts ({check['dtype']})." if check else "Not verified by reloading."
    )
    results = f"\n## Before and after\n\n{results_table}\n" if results_table else ""
    body = f"""
# Unlearned with lunar-lens

This is `{base}` with one matrix per edited layer changed: the MLP down-projection `W_out`, edited by
lunar-lens with LUNAR (*LLM Unlearning via Neural Activation Redirection*, Shen et al.,
NeurIPS 2025, [arXiv 2502.07218](https://arxiv.org/abs/2502.07218)). Forget-set prompts have their MLP output
redirected along the layer's unanswerability direction (mean residual on questions the model already declines
minus the mean on the forget set), so the model declines them; retain-set outputs are kept where they were.
Every other tensor is byte-identical to the base. Load it with `AutoModelForCausalLM.from_pretrained`.

{facts}
{results}
## What this folder holds

- the checkpoint (weights, config, tokenizer) as `transformers` reads it;
- `{PATCH_FILE}`: the edit as a patch (ΔW factors, base tensor hashes);
- `{DIRECTIONS_FILE}.safetensors` / `.json` (when present): the directions `r_l`, one row per layer, read at
  `blocks.{{l}}.hook_resid_post` (`lunar_lens.Directions.load`, `Directions.hooks` for TransformerLens);
- `lunar_report.json` (when present): settings, objective, localisation scores. The forgotten questions are
  not in this folder, only their count and SHA-256 hashes (unless the run chose to embed them);
- `{MANIFEST}`: source file hashes, edited tensors, versions, verification; `lunar_patches/`: what revert needs.

{verified}

## How to revert, or scale the edit

```bash
lunar-lens patch revert THIS_FOLDER THIS_FOLDER/{PATCH_FILE} --out base-again      # the base, bit for bit
lunar-lens patch apply BASE_FOLDER THIS_FOLDER/{PATCH_FILE} --scale 0.5 --out half  # half the edit
```

## Versions

{versions}.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def export_checkpoint(
    bridge: TransformerBridge,
    out_dir: str | Path,
    edited_layers: Sequence[int],
    *,
    manifest: dict | None = None,
    force: bool = False,
    verify: bool = True,
    sample_prompts: Sequence[str] | None = None,
    extra_files: dict[str, dict] | None = None,
    trust_remote_code: bool = False,
    patch: Sequence[WOutEdit] | str | Path | None = None,
    patch_info: dict | None = None,
    scale: float = 1.0,
    directions: Directions | None = None,
    results_table: str | None = None,
) -> ExportResult:
    """Write the in-memory model, whose W_out of `edited_layers` was edited, as a checkpoint folder.

    The source is where the bridge was loaded from (`model.loaded_from`: a local folder of safetensors, or a hub id found in the local
    cache). `manifest`: the run's record (coefficient, direction norms, solver, seed, metrics…), stored
    under "run"; `extra_files`: more JSON files to write into the folder. `patch`: the edit as written
    to `lunar_patch.safetensors` — the edits themselves (their factors are stored, with `patch_info`), the
    patch file the model was edited with (applied at `scale`), or None (each edited tensor's whole
    change). `directions` are saved as `lunar_directions.*`; `results_table` (markdown) goes into the
    model card. An existing `out_dir` is replaced only with `force`, and only when lunar-lens wrote it;
    one overlapping the source is refused (`lunar_lens.core.atomic`).
    """
    source = loaded_from(bridge)
    if source is None:
        raise LunarError(
            "this model has no source folder (it was built in memory): load it with lunar_lens.model.load_model(folder) to export it"
        )
    checkpoint = Checkpoint.open(source)
    edited = [_edited_tensor(bridge, checkpoint, layer) for layer in sorted(set(edited_layers))]
    with atomic_output(out_dir, folder=True, force=force, inputs=[checkpoint.root]) as tmp:
        hashes, skipped = copy_checkpoint(checkpoint, tmp, {e.key: e.value for e in edited})
        verification = verify_export(bridge, tmp, edited, sample_prompts or DEFAULT_PROMPTS, trust_remote_code) if verify else None
        ours = list(dict.fromkeys([*ARTEFACTS, *(extra_files or {})]))
        for name in ours:  # the source's versions are kept in the stash below, for revert
            (tmp / name).unlink(missing_ok=True)
        if isinstance(patch, (str, Path)):
            shutil.copyfile(patch, tmp / PATCH_FILE)
        else:
            save_patch(list(patch) if patch is not None else _full_edits(bridge, edited), checkpoint.root, tmp / PATCH_FILE, patch_info)
        this = load_patch(tmp / PATCH_FILE)
        applied, base = patch_state(checkpoint, this)
        entry = patch_record(this, scale)
        entry["replaced"] = [name for name in [*ours, MANIFEST] if (checkpoint.root / name).is_file()]
        for name in entry["replaced"]:
            (tmp / stash_dir(entry)).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(checkpoint.root / name, tmp / stash_dir(entry) / name)
        write_patch_state(tmp, checkpoint, applied + [(entry, this)], base)
        if directions is not None:
            directions.save(tmp / DIRECTIONS_FILE)
        for name, content in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        record = {
            "format": "lunar-lens export 1",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": {
                "path": str(source), "folder": str(checkpoint.root), "sha256": hashes,
                "skipped_weight_files": skipped, "lunar_manifest": read_manifest(checkpoint.root) or None,
            },
            "edited_tensors": [_edit_record(e, checkpoint) for e in edited],
            "layers": [e.layer for e in edited],
            "run": manifest or {},
            "versions": package_versions(),
            "verification": verification,
            "patches": [*(record for record, _ in applied), entry],
        }
        source_card = checkpoint.root / CARD_FILE
        model_card(record, source_card if source_card.is_file() else None, results_table).save(tmp / CARD_FILE)
        entry["files"] = {name: file_sha256(tmp / name) for name in ours if (tmp / name).is_file()}
        write_manifest(tmp, record)
    rewritten = sorted({checkpoint.weight_map[e.key] for e in edited})
    return ExportResult(Path(out_dir), [e.key for e in edited], rewritten, verification, record)
