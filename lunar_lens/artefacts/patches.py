"""Edits as data: the W_out edit record, patch files, and a patch or an edit applied to a live model
(`lunar_lens.artefacts.patched` applies patches to checkpoint folders and reverts them; `lunar_lens.model.checkpoint`
reads and copies the folders themselves).

A patch file is a small safetensors file. For its i-th tensor it holds the factors `i.a`, `i.b`
(ΔW = a·bᵀ) when the edit has them, else the full `i.delta`; float32, in the **Hugging Face
orientation** (the checkpoint tensor's own layout: W_outᵀ for nn.Linear, W_out for GPT-2's Conv1D),
so applying one needs no model code. Its `lunar_patch` metadata (JSON) names each tensor, its layer,
and the SHA-256 of the base tensor's bytes the edit was solved against.

Everything read is checked: safetensors headers and sizes (a truncated file is called so), the SHA-256
of every stored tensor, finite values, and every file a manifest or index names lies inside its folder.
Only safetensors are read; nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from lunar_lens.core.atomic import atomic_output, check_output
from lunar_lens.core.errors import LunarError
from lunar_lens.directions.mean_difference import Directions
from lunar_lens.edit.layers import WOutEdit
from lunar_lens.model.checkpoint import ST_NAMES, Checkpoint, dense, file_sha256, read_manifest, safetensors_header, tensor_sha256
from lunar_lens.model.load import loaded_from
from lunar_lens.model.weights import add_to_w_out, w_out_is_transposed, w_out_parameter, w_out_tensor_name, weights_restored

PATCH_FORMAT = 2  # 2: adds the SHA-256 of every stored tensor and the patches the base had applied


# ---------------------------------------------------------------- patch files

@dataclass
class PatchEntry:
    """One tensor of a patch; `delta` is float32 in the HF orientation (the checkpoint tensor's shape)."""

    layer: int
    tensor: str  # the checkpoint's tensor name
    base_sha256: str
    shape: list[int]
    dtype: str  # safetensors dtype of the base tensor, e.g. BF16
    hf_is_transposed: bool  # True when the checkpoint stores W_outᵀ (nn.Linear)
    rank: int | None  # k of the stored factors; None for a full delta
    delta: Float[Tensor, "rows cols"]


@dataclass
class Patch:
    path: Path
    sha256: str
    entries: list[PatchEntry]
    info: dict
    base_patches: list[str] = field(default_factory=list)  # SHA-256 of the patches its base checkpoint had applied

    @property
    def layers(self) -> list[int]:
        return sorted({entry.layer for entry in self.entries})


def _hf_is_transposed(checkpoint: Checkpoint, edit: WOutEdit, shape: tuple[int, ...]) -> bool:
    """Whether the checkpoint stores W_outᵀ: read from the shapes, or from the model class when W_out is square."""
    rows, cols = edit.delta.shape
    if shape not in ((rows, cols), (cols, rows)):
        raise LunarError(
            f"the edit of {edit.tensor_name} is {rows}×{cols} but {checkpoint.root} stores it as {shape}: "
            "pass the checkpoint the edit was solved on"
        )
    if rows != cols:
        return shape == (cols, rows)
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint.root))
    return isinstance(model.get_submodule(edit.tensor_name.rsplit(".", 1)[0]), torch.nn.Linear)


def _check_finite(tensor: Tensor, what: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise LunarError(f"{what} holds non-finite values (NaN or inf): solve the edit again with a finite coefficient")


def _applied_shas(checkpoint: Checkpoint) -> list[str]:
    return [record["sha256"] for record in read_manifest(checkpoint.root).get("patches", [])]


def save_patch(edits: list[WOutEdit], base_dir: str | Path, path: str | Path, info: dict | None = None, force: bool = False) -> Path:
    """Write `edits`, solved on the checkpoint `base_dir`, as a patch file (`info`: any JSON-able run
    record), atomically; an existing `path` is replaced only with `force`, and only if it is a patch."""
    checkpoint = Checkpoint.open(base_dir)
    check_output(path, folder=False, force=force, inputs=[checkpoint.root], parameter="path")
    tensors, records = {}, []
    for i, edit in enumerate(edits):
        key = checkpoint.key(edit.tensor_name)
        base = checkpoint.read(key)
        transposed = _hf_is_transposed(checkpoint, edit, tuple(base.shape))
        if edit.u is not None and edit.v is not None:
            a, b = (edit.v, edit.u) if transposed else (edit.u, edit.v)
            tensors[f"{i}.a"], tensors[f"{i}.b"] = dense(a.float()), dense(b.float())
        else:
            tensors[f"{i}.delta"] = dense((edit.delta.T if transposed else edit.delta).float())
        records.append({
            "layer": edit.layer, "tensor": key, "base_sha256": tensor_sha256(base), "shape": list(base.shape),
            "dtype": ST_NAMES[base.dtype], "hf_is_transposed": transposed,
        })
    for key, tensor in tensors.items():
        _check_finite(tensor, f"the edit of {records[int(key.split('.')[0])]['tensor']}")
    record = {
        "format": PATCH_FORMAT, "tensors": records, "info": info or {}, "base_patches": _applied_shas(checkpoint),
        "sha256": {key: tensor_sha256(tensor) for key, tensor in tensors.items()},
    }
    with atomic_output(path, folder=False, force=force, inputs=[checkpoint.root], parameter="path") as tmp:
        save_file(tensors, str(tmp), metadata={"lunar_patch": json.dumps(record)})
    return Path(path)


def load_patch(path: str | Path) -> Patch:
    """Read a patch file, checked: complete, the SHA-256 of every stored tensor, finite values."""
    path = Path(path)
    if not path.is_file():
        raise LunarError(f"patch file {path} does not exist: check the path (`lunar-lens patch show CHECKPOINT` lists applied patches)")
    _, header, problem = safetensors_header(path)
    if "lunar_patch" not in (header.get("__metadata__") or {}):
        raise LunarError(
            f"{path} is not a lunar-lens patch ({problem or 'no lunar_patch metadata'}): pass a file written by save_patch"
        )
    if problem:
        raise LunarError(f"{path} is a corrupted lunar-lens patch ({problem}): copy it again, or save the edit again")
    try:
        record = json.loads(header["__metadata__"]["lunar_patch"])
        if record.get("format", 1) > PATCH_FORMAT:
            raise LunarError(f"{path} is a patch of format {record['format']}, newer than this lunar-lens reads: upgrade lunar-lens")
        with safe_open(path, framework="pt") as file:
            tensors = {key: file.get_tensor(key) for key in file.keys()}
        hashes = record.get("sha256", {key: tensor_sha256(tensor) for key, tensor in tensors.items()})
        changed = sorted(key for key in set(hashes) | set(tensors) if key not in tensors or hashes.get(key) != tensor_sha256(tensors[key]))
        if changed:
            raise LunarError(f"{path} is corrupted: tensor {changed[0]} does not match the SHA-256 the patch records: copy it again, or save the edit again")
        entries = []
        for i, entry in enumerate(record["tensors"]):
            if f"{i}.a" in tensors:  # formed as u @ vᵀ in W_out's [d_mlp, d_model] layout, as the in-memory edit was
                u, v = (tensors[f"{i}.b"], tensors[f"{i}.a"]) if entry["hf_is_transposed"] else (tensors[f"{i}.a"], tensors[f"{i}.b"])
                delta, rank = (u @ v.T).T if entry["hf_is_transposed"] else u @ v.T, u.shape[1]
            else:
                delta, rank = tensors[f"{i}.delta"], None
            entries.append(PatchEntry(**entry, rank=rank, delta=delta))
    except (SafetensorError, ValueError, KeyError, TypeError, AttributeError, RuntimeError):
        raise LunarError(f"{path} is a corrupted lunar-lens patch (its record does not match its tensors): copy it again, or save the edit again") from None
    for entry in entries:
        _check_finite(entry.delta, f"{path} ({entry.tensor})")
    return Patch(path, file_sha256(path), entries, record.get("info", {}), list(record.get("base_patches", [])))


def show_patch(path: str | Path) -> dict:
    """What a patch file holds, or (for a checkpoint folder) which patches are applied to it, in order."""
    path = Path(path)
    if path.is_dir():
        return {"checkpoint": str(path), "patches": read_manifest(path).get("patches", [])}
    patch = load_patch(path)
    tensors = [
        {"tensor": e.tensor, "layer": e.layer, "shape": e.shape, "dtype": e.dtype, "hf_is_transposed": e.hf_is_transposed,
         "rank": e.rank, "delta_norm": float(e.delta.norm()), "base_sha256": e.base_sha256}
        for e in patch.entries
    ]
    return {"file": str(path), "sha256": patch.sha256, "tensors": tensors, "info": patch.info, "base_patches": patch.base_patches}


# ---------------------------------------------------------------- checks

def check_base(patch: Patch, checkpoint: Checkpoint, base: dict[str, Tensor] | None = None) -> None:
    """Refuse a patch whose tensors are not, byte for byte, the ones it was solved against: the
    checkpoint's current tensor, or its recorded original (`base`)."""
    for entry in patch.entries:
        if entry.tensor not in checkpoint.weight_map:
            raise LunarError(
                f"{patch.path} edits {entry.tensor}, which {checkpoint.root} does not hold: apply it to the checkpoint it was saved against"
            )
        current = checkpoint.read(entry.tensor)
        if list(current.shape) != entry.shape or ST_NAMES.get(current.dtype) != entry.dtype:
            raise LunarError(
                f"{patch.path} was made for a {entry.dtype} {entry.shape} {entry.tensor}, but {checkpoint.root} holds "
                f"{current.dtype} {list(current.shape)}: apply it to the checkpoint it was saved against"
            )
        found = tensor_sha256(current)
        original = tensor_sha256(base[entry.tensor]) if base and entry.tensor in base else None
        if entry.base_sha256 not in (found, original):
            raise LunarError(
                f"{patch.path} was made for another base: {entry.tensor} in {checkpoint.root} has SHA-256 {found[:12]}…, "
                f"the patch expects {entry.base_sha256[:12]}…: apply it to the checkpoint it was saved against, "
                "or solve the edit again on this one"
            )


def check_scale(scale: float) -> float:
    if not math.isfinite(scale):
        raise LunarError(f"{{scale}} {scale} is not a finite number: pass e.g. {{scale}} 0.5 (0: the base, 1: the whole edit)", ("scale",))
    return float(scale)


def apply_to_model(bridge: TransformerBridge, patch_path: str | Path | Patch, scale: float = 1.0) -> Patch:
    """Add `scale`·a patch's edits to a model loaded (by `lunar_lens.model.load_model`) from the patch's base."""
    scale = check_scale(scale)
    checkpoint = Checkpoint.open(loaded_from(bridge))
    patch = patch_path if isinstance(patch_path, Patch) else load_patch(patch_path)
    check_base(patch, checkpoint)
    for entry in patch.entries:
        if checkpoint.key(w_out_tensor_name(bridge, entry.layer)) != entry.tensor:
            raise LunarError(
                f"{patch.path} edits {entry.tensor}, which is not W_out of layer {entry.layer} of this model: "
                "pass the model the patch was saved for"
            )
        if scale != 0:
            delta = scale * entry.delta
            add_to_w_out(bridge, entry.layer, delta.T if w_out_is_transposed(bridge, entry.layer) else delta)
    return patch


@contextlib.contextmanager
def applied(
    bridge: TransformerBridge,
    change: str | Path | Patch | Sequence[WOutEdit] | Directions,
    scale: float = 1.0,
    layers: Sequence[int] | None = None,
) -> Iterator[TransformerBridge]:
    """`change` applied to the live `bridge` inside a `with` block; on exit every weight is back, bit for bit.

    A patch (file or `Patch`, checked against the bridge's source) or a list of `WOutEdit` (e.g.
    `EditResult.edits`) adds `scale`·ΔW to W_out; `Directions` steer instead: `scale`·r_l is added to
    `blocks.{l}.hook_resid_post` at every position, for `layers` (default: all), as hooks removed on exit.
    """
    if isinstance(change, Directions):
        with bridge.hooks(fwd_hooks=change.hooks(scale, layers)):
            yield bridge
        return
    scale = check_scale(scale)
    change = load_patch(change) if isinstance(change, (str, Path)) else change
    touched = change.layers if isinstance(change, Patch) else sorted({edit.layer for edit in change})
    with weights_restored([w_out_parameter(bridge, layer) for layer in touched]):
        if isinstance(change, Patch):
            apply_to_model(bridge, change, scale)
        elif scale != 0:
            for edit in change:
                add_to_w_out(bridge, edit.layer, scale * edit.delta)
        yield bridge
