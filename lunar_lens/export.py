"""Export an edited model as a Hugging Face checkpoint folder, verified by reloading it with plain
transformers. Every tensor but the edited W_out keeps the source's bytes (only the shards holding an
edited tensor are rewritten, in place in a copy), the source dtype is kept, tokenizer, chat template
and config files are carried over, and `lunar_manifest.json` records the source hashes, the edit and
the verification. The folder appears atomically, or not at all."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge
from transformers import AutoModelForCausalLM

from lunar_lens.cli import add_device_arguments
from lunar_lens.errors import LunarError
from lunar_lens.model import TOLERANCE, load_model, w_out_parameter, w_out_tensor_name
from lunar_lens.outputs import atomic_output, check_output, write_manifest
from lunar_lens.patches import (
    ST_NAMES,
    Checkpoint,
    apply_to_model,
    copy_checkpoint,
    load_patch,
    read_manifest,
    show_patch,
    tensor_sha256,
)
from lunar_lens.prompts import tokenize

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


@dataclass
class EditedTensor:
    """An edited W_out: its live value, and what goes into the checkpoint (in the source dtype)."""

    layer: int
    name: str  # HF parameter name
    key: str  # checkpoint tensor name
    value: Tensor  # written, source dtype, HF orientation
    source: Tensor  # the source checkpoint's tensor
    live: Tensor  # the in-memory parameter, float32 on CPU


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
    return EditedTensor(layer, name, key, live.to("cpu", source.dtype).contiguous(), source, live.float().cpu())


def _edit_record(edited: EditedTensor, checkpoint: Checkpoint) -> dict:
    change = edited.live - edited.source.float()
    cast_error = (edited.value.float() - edited.live).norm() / change.norm().clamp_min(torch.finfo(torch.float32).tiny)
    return {
        "tensor": edited.key, "layer": edited.layer, "file": checkpoint.weight_map[edited.key],
        "dtype": ST_NAMES[edited.value.dtype], "shape": list(edited.value.shape),
        "sha256": tensor_sha256(edited.value), "source_sha256": tensor_sha256(edited.source),
        "edit_norm": float(change.norm()), "cast_relative_error": float(cast_error),
    }


@contextlib.contextmanager
def _weights_as_written(bridge: TransformerBridge, edited: list[EditedTensor]) -> Iterator[None]:
    """Temporarily give the in-memory W_out the exported values (rounded to the source dtype)."""
    params = [w_out_parameter(bridge, e.layer) for e in edited]
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for param, e in zip(params, edited):
                param.copy_(e.value)
        yield
    finally:
        with torch.no_grad():
            for param, old in zip(params, saved):
                param.copy_(old)


@torch.no_grad()
def verify_export(
    bridge: TransformerBridge, folder: Path, edited: list[EditedTensor], prompts: Sequence[str], trust_remote_code: bool = False
) -> dict:
    """Reload `folder` with plain `AutoModelForCausalLM` and compare its logits with the in-memory model's.

    Compares with the HF model the bridge wraps (`original_model`, hooks included): the same code as
    the reload, so any difference is in the weights. The reload uses the in-memory dtype and attention
    implementation; an edited W_out held at a higher precision than the source is compared as written
    (rounded), and the logit change that rounding causes is recorded. Raises LunarError on a mismatch.
    """
    model = bridge.original_model
    batch = tokenize(bridge.tokenizer, list(prompts)).to(model.device)
    real = batch.attention_mask.bool()

    def logits(m: torch.nn.Module) -> Tensor:
        return m(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()[real]

    live = logits(model)
    rounded = any(not torch.equal(w_out_parameter(bridge, e.layer), e.value.to(model.device, model.dtype)) for e in edited)
    with _weights_as_written(bridge, edited if rounded else []):
        expected = logits(model) if rounded else live
    reloaded = AutoModelForCausalLM.from_pretrained(
        folder, dtype=model.dtype, attn_implementation=model.config._attn_implementation, trust_remote_code=trust_remote_code
    ).to(model.device).eval()
    diff = float((logits(reloaded) - expected).abs().max())
    exact = all(torch.equal(reloaded.get_parameter(e.name), e.value.to(model.device, model.dtype)) for e in edited)
    tolerance = TOLERANCE[model.dtype]
    if diff > tolerance or not exact:
        raise LunarError(
            f"export verification failed: the reloaded checkpoint's logits differ from the in-memory model's by {diff:.3g} "
            f"(tolerance {tolerance:g}; edited tensors exact: {exact}); nothing was written. The in-memory model differs "
            "from its source beyond W_out of the layers passed: pass every edited layer, remove active hooks, "
            "and do not export a model with processed weights (enable_compatibility_mode)"
        )
    return {
        "prompts": len(prompts), "dtype": str(model.dtype).removeprefix("torch."), "max_abs_logit_diff": diff,
        "tolerance": tolerance, "edited_tensors_exact": exact, "rounding_max_abs_logit_change": float((expected - live).abs().max()),
    }


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


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
) -> ExportResult:
    """Write the in-memory model, whose W_out of `edited_layers` was edited, as a checkpoint folder.

    The source is `bridge.source_path` (a local folder of safetensors, or a hub id found in the local
    cache). `manifest`: the run's record (coefficient, direction norms, solver, seed, metrics…), stored
    under "run"; `extra_files`: more JSON files to write into the folder. Refuses an existing non-empty
    `out_dir` unless `force`, and any `out_dir` overlapping the source.
    """
    if getattr(bridge, "source_path", None) is None:
        raise LunarError(
            "this model has no source folder (it was built in memory): load it with lunar_lens.model.load_model(folder) to export it"
        )
    checkpoint = Checkpoint.open(bridge.source_path)
    edited = [_edited_tensor(bridge, checkpoint, layer) for layer in sorted(set(edited_layers))]
    with atomic_output(out_dir, folder=True, force=force, inputs=[checkpoint.root]) as tmp:
        hashes, skipped = copy_checkpoint(checkpoint, tmp, {e.key: e.value for e in edited})
        verification = verify_export(bridge, tmp, edited, sample_prompts or DEFAULT_PROMPTS, trust_remote_code) if verify else None
        record = {
            "format": "lunar-lens export 1",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": {
                "path": str(bridge.source_path), "folder": str(checkpoint.root), "sha256": hashes,
                "skipped_weight_files": skipped, "lunar_manifest": read_manifest(checkpoint.root) or None,
            },
            "edited_tensors": [_edit_record(e, checkpoint) for e in edited],
            "layers": [e.layer for e in edited],
            "run": manifest or {},
            "versions": package_versions(),
            "verification": verification,
        }
        write_manifest(tmp, record)
        for name, content in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
    rewritten = sorted({checkpoint.weight_map[e.key] for e in edited})
    return ExportResult(Path(out_dir), [e.key for e in edited], rewritten, verification, record)


# ---------------------------------------------------------------- CLI

def add_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="apply a saved patch to a model and export it as a verified checkpoint")
    parser.add_argument("--model", required=True, help="the patch's base: HF model folder or cached hub id")
    parser.add_argument("--edit", required=True, help="a patch file (written by save_patch / `lunar-lens unlearn`)")
    parser.add_argument("--out", required=True, help="output folder (a Hugging Face checkpoint)")
    parser.add_argument("--force", action="store_true", help="replace an earlier lunar-lens output in --out")
    add_device_arguments(parser, dtype_help="in-memory dtype (the file keeps the source's)")
    parser.add_argument("--no-verify", action="store_true", help="skip the reload-and-compare check")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code (off by default)")
    parser.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> None:
    load_patch(args.edit)  # a missing or corrupted patch is refused before the model loads
    check_output(args.out, folder=True, force=args.force, inputs=[args.model, args.edit])
    bridge = load_model(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    patch = apply_to_model(bridge, args.edit)
    result = export_checkpoint(
        bridge, args.out, patch.layers, manifest={"patch": show_patch(args.edit)}, force=args.force,
        verify=not args.no_verify, trust_remote_code=args.trust_remote_code,
    )
    check = result.verification
    verified = "not verified"
    if check is not None:
        verified = f"verified: max |Δ logit| {check['max_abs_logit_diff']:.2g} on {check['prompts']} prompts"
    print(f"wrote {result.out_dir} (edited {', '.join(result.edited_tensors)}; {verified})")
