"""Verification of an export: a plain-transformers reload of the written folder gives the in-memory model's
logits, with one copy of the weights in memory at a time. Every written tensor is first checked equal to
the in-memory one (read in chunks), then the in-memory weights are released for the reload (on the model's
device map) and read back from the folder, bit for bit (`verify_export`)."""

from __future__ import annotations

import contextlib
import gc
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge
from transformers import AutoModelForCausalLM

from lunar_lens.core.errors import LunarError
from lunar_lens.core.progress import library_bars
from lunar_lens.data.prompts import tokenize
from lunar_lens.model.checkpoint import READ_CHUNK_BYTES, ST_DTYPES, Checkpoint, safetensors_header
from lunar_lens.model.load import TOLERANCE
from lunar_lens.model.weights import hf_name, w_out_parameter, weights_restored


@dataclass
class EditedTensor:
    """An edited W_out: its live value, and what goes into the checkpoint (in the source dtype)."""

    layer: int
    name: str  # HF parameter name
    key: str  # checkpoint tensor name
    value: Tensor  # written, source dtype, HF orientation
    source: Tensor  # the source checkpoint's tensor
    live: Tensor  # the in-memory parameter, float32 on CPU


@contextlib.contextmanager
def _weights_as_written(bridge: TransformerBridge, edited: list[EditedTensor]) -> Iterator[None]:
    """Temporarily give the in-memory W_out the exported values (rounded to the source dtype)."""
    params = [w_out_parameter(bridge, e.layer) for e in edited]
    with weights_restored(params), torch.no_grad():
        for param, e in zip(params, edited):
            param.copy_(e.value)
        yield


def _tensor_owners(model: torch.nn.Module, checkpoint: Checkpoint) -> dict[str, Tensor]:
    """Checkpoint tensor name → the in-memory parameter or persistent buffer it loads into (a tied tensor
    once, under the name the checkpoint holds)."""
    owners: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        try:
            key = checkpoint.key(hf_name(name))
        except LunarError:
            continue  # not saved under this name (a tied copy, or missing: the reload's logits then disagree)
        seen.add(id(tensor))
        owners[key] = tensor
    return owners


def _mapped(checkpoint: Checkpoint, keys: Iterable[str]) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) of the checkpoint's tensors, each a copy-on-write mapping of its file, as transformers
    loads them: nothing is resident until used (a tensor that is not a float one, or not aligned to its
    element size, is read through safetensors instead)."""
    files: dict[str, tuple[torch.UntypedStorage, int, dict]] = {}
    for key in keys:
        rel = checkpoint.weight_map[key]
        if rel not in files:
            path = checkpoint.root / rel
            start, header, _ = safetensors_header(path)
            files[rel] = (torch.UntypedStorage.from_file(str(path), shared=False, nbytes=path.stat().st_size), start, header)
        storage, start, header = files[rel]
        dtype, offset = ST_DTYPES.get(header[key]["dtype"]), start + header[key]["data_offsets"][0]
        if dtype is None or offset % dtype.itemsize:
            yield key, checkpoint.read(key)
        else:
            yield key, torch.empty(0, dtype=dtype).set_(storage, offset // dtype.itemsize, header[key]["shape"])


def _check_tensors(owners: dict[str, Tensor], written: Checkpoint, edited: dict[str, Tensor]) -> None:
    """Every tensor of the written folder equals the in-memory one (cast to its dtype; an edited W_out equals
    its written value), read from the files READ_CHUNK_BYTES at a time into one buffer (not mapped whole)."""
    keys = [key for key, tensor in owners.items() if tensor.device.type != "meta"]
    by_file: dict[str, list[str]] = {}
    for key in keys:
        by_file.setdefault(written.weight_map[key], []).append(key)
    buffer = bytearray(READ_CHUNK_BYTES)
    for rel, names in sorted(by_file.items()):
        start, header, _ = safetensors_header(written.root / rel)
        with open(written.root / rel, "rb") as file:
            for key in names:
                mine = (edited[key] if key in edited else owners[key]).detach()
                info, dtype = header[key], ST_DTYPES.get(header[key]["dtype"])
                same = info["shape"] == list(mine.shape)
                if dtype is None:  # not a float tensor: read whole
                    same = same and torch.equal(written.read(key).to(mine.device, mine.dtype), mine)
                flat, step = mine.reshape(-1), READ_CHUNK_BYTES // max(1, dtype.itemsize if dtype else 1)
                file.seek(start + info["data_offsets"][0])
                for first in range(0, mine.numel(), step) if same and dtype is not None else ():
                    count = min(step, mine.numel() - first)
                    file.readinto(memoryview(buffer)[: count * dtype.itemsize])
                    stored = torch.frombuffer(buffer, dtype=dtype, count=count)
                    if not torch.equal(stored.to(flat.device, flat.dtype), flat[first : first + count]):
                        same = False
                        break
                if not same:
                    raise LunarError(
                        f"export verification failed: {key} in the written checkpoint differs from the in-memory model's; nothing "
                        "was written. The in-memory model differs from its source beyond W_out of the layers passed: pass every "
                        "edited layer, and do not export a model with processed weights (enable_compatibility_mode)"
                    )


@contextlib.contextmanager
def _weights_released(owners: dict[str, Tensor], written: Checkpoint, kept: Sequence[str]) -> Iterator[None]:
    """The in-memory weights freed for the block (a reload then fits beside the rest) and given back after:
    the `kept` ones (the edited W_out, held apart as copies, possibly at a higher precision than written: a
    view would keep its source file mapped) as they were, the others mapped from `written` — which
    `_check_tensors` proved equal — so the model is as it was, bit for bit, and pages in as it is used."""
    released = {key: (tensor.device, tensor.dtype) for key, tensor in owners.items() if tensor.device.type != "meta"}
    held = {key: owners[key].data.clone() for key in kept}
    for key in released:
        owners[key].data = owners[key].data.new_empty(0)
    try:
        yield
    finally:
        for key, stored in _mapped(written, [key for key in released if key not in held]):
            device, dtype = released[key]
            owners[key].data = stored.to(device, dtype)
        for key, data in held.items():
            owners[key].data = data


@torch.no_grad()
def verify_export(
    bridge: TransformerBridge, folder: Path, edited: list[EditedTensor], prompts: Sequence[str], trust_remote_code: bool = False
) -> dict:
    """Reload `folder` with plain `AutoModelForCausalLM` (on the model's device map) and compare its logits
    with the in-memory model's, holding one copy of the weights at a time.

    First every tensor of the folder is checked equal to the in-memory one (streamed); then, with the
    in-memory weights released (`_weights_released`: read back from the folder after), the reload's logits
    must match those the in-memory model (`original_model`, hooks included: the same code as the reload)
    gave before. The reload uses the in-memory dtype and attention implementation; an edited W_out held at
    a higher precision than the source is compared as written (rounded), and the logit change that
    rounding causes is recorded. Raises LunarError on a mismatch. Afterwards the model's weights (but the edited
    W_out) are copy-on-write mappings of the written files: resident as they are used, and the files' space
    is freed when the model is (writes to the weights never reach the files).
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
    written = Checkpoint.open(folder)
    owners = _tensor_owners(model, written)
    _check_tensors(owners, written, {e.key: e.value for e in edited})
    device_map = getattr(model, "hf_device_map", None)
    on_disk = bool(device_map) and "disk" in device_map.values()
    with _weights_released(owners, written, kept=[e.key for e in edited]), tempfile.TemporaryDirectory() as offload:
        with library_bars():
            reloaded = AutoModelForCausalLM.from_pretrained(
                folder, dtype=model.dtype, attn_implementation=model.config._attn_implementation, trust_remote_code=trust_remote_code,
                device_map=device_map, **({"offload_folder": offload} if on_disk else {}),
            ).eval()
        if device_map is None:
            reloaded.to(model.device)
        diff = float((logits(reloaded) - expected).abs().max())
        exact = all(torch.equal(reloaded.get_parameter(e.name), e.value.to(reloaded.get_parameter(e.name).device, model.dtype)) for e in edited)
        del reloaded
        gc.collect()
    tolerance = TOLERANCE[model.dtype]
    if diff > tolerance or not exact:
        raise LunarError(
            f"export verification failed: the reloaded checkpoint's logits differ from the in-memory model's by {diff:.3g} "
            f"(tolerance {tolerance:g}; edited tensors exact: {exact}); nothing was written. The in-memory model differs "
            "from its source beyond its weights: remove active hooks, and do not export a model with processed weights "
            "(enable_compatibility_mode)"
        )
    return {
        "prompts": len(prompts), "dtype": str(model.dtype).removeprefix("torch."), "max_abs_logit_diff": diff,
        "tolerance": tolerance, "edited_tensors_exact": exact, "rounding_max_abs_logit_change": float((expected - live).abs().max()),
        "tensors_checked": len(owners), "device_map": bool(device_map),
    }
