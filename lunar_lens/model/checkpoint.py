"""Checkpoint folders on disk: a local folder of safetensors weights (`Checkpoint`: its index, headers
and tensors, read without unpickling anything), its copy with some tensors rewritten in place, the
hashes that identify files and tensors, and the names of the files lunar-lens adds to a checkpoint.

Everything read is checked: safetensors headers and sizes (a truncated file is called so), and every
file an index or manifest names lies inside its folder. Patches (`lunar_lens.artefacts.patches`) and exports
(`lunar_lens.artefacts.export`) are built on this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import torch
from safetensors import safe_open
from torch import Tensor

from lunar_lens.core.atomic import MANIFEST
from lunar_lens.core.errors import LunarError, first_line

PATCH_DIR = "lunar_patches"
INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"  # the weights of an unsharded checkpoint
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.py"]  # what a download fetches
WEIGHT_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".npz", ".pkl", ".safetensors"}
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
ST_NAMES = {dtype: name for name, dtype in ST_DTYPES.items()}
PATCH_FILE = "lunar_patch.safetensors"
DIRECTIONS_FILE = "lunar_directions"  # .safetensors (vectors) and .json (metadata): `Directions.save`
REPORT_FILE = "lunar_report.json"
CARD_FILE = "README.md"
# What an export writes beside the weights. A source's own versions are replaced (and kept for revert).
ARTEFACTS = (CARD_FILE, PATCH_FILE, f"{DIRECTIONS_FILE}.safetensors", f"{DIRECTIONS_FILE}.json", REPORT_FILE)


# ---------------------------------------------------------------- hashes and bytes

def dense_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """The row-major strides PyTorch gives a fresh tensor of `shape` (a size-0 dimension counts as 1)."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def dense(tensor: Tensor) -> Tensor:
    """`tensor` itself when its strides are those of a fresh tensor of its shape, else a dense copy.

    `Tensor.contiguous()` is not enough: `is_contiguous` ignores the strides of size-1 dimensions, so the
    `(n, 1)` column of a transposed row (stride `(1, n)`, as a rank-one factor `shifts[used].T` is) counts as
    contiguous and is returned as it is, while a dtype view (`view(torch.uint8)`) needs the last stride to be 1."""
    if tensor.stride() == dense_strides(tensor.shape):
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def tensor_bytes(tensor: Tensor) -> bytes:
    """The bytes of `tensor`'s values, row-major: the same for any strides (and for a 0-dim tensor)."""
    return dense(tensor.detach().cpu()).reshape(-1).view(torch.uint8).numpy().tobytes()


def tensor_sha256(tensor: Tensor) -> str:
    return hashlib.sha256(tensor_bytes(tensor)).hexdigest()


READ_CHUNK_BYTES = 4 * 2**20  # a file is hashed or copied through one buffer of this size


def _chunks(file: BinaryIO) -> Iterator[memoryview]:
    """The file's bytes, READ_CHUNK_BYTES at a time, each read into the same buffer (valid until the next)."""
    buffer = memoryview(bytearray(READ_CHUNK_BYTES))
    while count := file.readinto(buffer):
        yield buffer[:count]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in _chunks(file):
            digest.update(chunk)
    return digest.hexdigest()


def _copy_hashed(src: Path, dst: Path) -> str:
    """Copy `src` to `dst` byte for byte and return the SHA-256 of what was read."""
    digest = hashlib.sha256()
    with open(src, "rb") as source, open(dst, "wb") as target:
        for chunk in _chunks(source):
            digest.update(chunk)
            target.write(chunk)
    return digest.hexdigest()


def safetensors_header(path: Path) -> tuple[int, dict, str | None]:
    """(offset of the data section, header, what is wrong) of a safetensors file: the header is {}
    when it cannot be read, and the problem names a truncated or inconsistent file (None: intact)."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        length = int.from_bytes(file.read(8), "little")
        if size < 8 or length > size - 8:
            return 8, {}, f"its {size} bytes hold no complete safetensors header"
        try:
            header = json.loads(file.read(length))
            ends = [int(info["data_offsets"][1]) for key, info in header.items() if key != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return 8, {}, "its safetensors header is not valid"
    needed = 8 + length + max(ends, default=0)
    if needed != size:
        return 8 + length, header, f"{'truncated: ' if needed > size else ''}{size} bytes where its header describes {needed}"
    return 8 + length, header, None


def inside(root: Path, rel: str, where: str) -> str:
    """`rel` (a path read from `where`), refused unless it is a plain relative path inside `root`."""
    parts = PurePosixPath(rel).parts if isinstance(rel, str) else ("..",)
    if not parts or PurePosixPath(rel).is_absolute() or ".." in parts or "\\" in rel:
        raise LunarError(
            f"{where} names {rel!r}, which is not a file inside {root}: the file was modified or is not lunar-lens's; "
            "start again from an unmodified copy"
        )
    return rel


# ---------------------------------------------------------------- checkpoints

def local_folder(path_or_id: str | Path, download: bool = False) -> Path:
    """The local folder of a model: the path itself, or the cached snapshot of a hub id; with
    `download`, a hub id missing from the cache is fetched (config, tokenizer and safetensors only)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise LunarError(f"{path} is not a model folder: pass the folder that holds config.json and the safetensors weights")
    if str(path_or_id).startswith((".", "/", "~")):
        raise LunarError(f"model folder {path} does not exist: check the path")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path_or_id), local_files_only=True))
    except (OSError, ValueError) as error:
        cached = error
    if download and os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("0", "false", "no", ""):
        try:
            return Path(snapshot_download(str(path_or_id), allow_patterns=HUB_FILES))
        except (OSError, ValueError) as error:
            cached = error
    raise LunarError(
        f"{path_or_id} is neither a local folder nor a model in the Hugging Face cache ({first_line(cached)}): "
        f"check the path, or download it first (`hf download {path_or_id}`) and pass its folder"
    ) from None


@dataclass(frozen=True)
class Checkpoint:
    """A local folder of safetensors weights; `weight_map` maps each tensor name to its file."""

    root: Path
    weight_map: dict[str, str]

    @classmethod
    def open(cls, path_or_id: str | Path, download: bool = False) -> Checkpoint:
        """The checkpoint, its index and every weight file's header checked (no tensor data is read)."""
        root = local_folder(path_or_id, download)
        if (root / INDEX).is_file():
            try:
                weight_map = json.loads((root / INDEX).read_text())["weight_map"]
                files = {inside(root, rel, f"{root / INDEX}") for rel in weight_map.values()}
            except (ValueError, KeyError, TypeError, AttributeError):
                raise LunarError(f"{root / INDEX} is not a valid safetensors index: re-download or re-save the checkpoint") from None
        elif (root / SINGLE_FILE).is_file():
            weight_map, files = {}, {SINGLE_FILE}
        elif any((root / name).exists() for name in PICKLED):
            raise LunarError(
                f"{root} holds only PyTorch pickle weights (pytorch_model.bin), which lunar-lens never unpickles: "
                "convert the folder to safetensors first (transformers' save_pretrained writes model.safetensors)"
            )
        else:
            raise LunarError(f"{root} holds no {SINGLE_FILE} or {INDEX}: pass a Hugging Face model folder saved with safetensors")
        for rel in sorted(files):
            if not (root / rel).is_file():
                raise LunarError(f"{root} lacks {rel}, which its {INDEX} names: re-download or re-save the checkpoint")
            _, header, problem = safetensors_header(root / rel)
            if problem:
                raise LunarError(f"{root / rel} is corrupted ({problem}): re-download or re-save the checkpoint")
            if rel == SINGLE_FILE and not weight_map:
                weight_map = {name: SINGLE_FILE for name in header if name != "__metadata__"}
        return cls(root, weight_map)

    @property
    def weight_files(self) -> set[str]:
        return set(self.weight_map.values()) | ({INDEX} if (self.root / INDEX).is_file() else set())

    def key(self, name: str) -> str:
        """The checkpoint's name for parameter `name` (some checkpoints drop the base-model prefix)."""
        if name in self.weight_map:
            return name
        matches = [key for key in self.weight_map if name.endswith("." + key) or key.endswith("." + name)]
        if len(matches) != 1:
            raise LunarError(
                f"{self.root} has no tensor {name} (candidates: {matches or 'none'}): pass the checkpoint the model was loaded from"
            )
        return matches[0]

    def layout(self) -> dict[str, tuple[str, list[int]]]:
        """Each tensor's (safetensors dtype, shape), from the headers."""
        headers = {rel: safetensors_header(self.root / rel)[1] for rel in set(self.weight_map.values())}
        return {key: (headers[rel][key]["dtype"], headers[rel][key]["shape"]) for key, rel in self.weight_map.items()}

    def read(self, key: str) -> Tensor:
        with safe_open(self.root / self.weight_map[key], framework="pt") as file:
            return file.get_tensor(key)


def _write_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    """Overwrite the data of `tensors` in the safetensors file `path`, in place (header untouched)."""
    start, header, _ = safetensors_header(path)
    with open(path, "r+b") as file:
        for key, value in tensors.items():
            info = header[key]
            if info["shape"] != list(value.shape) or info["dtype"] != ST_NAMES.get(value.dtype):
                raise LunarError(
                    f"{key} in {path.name} is {info['dtype']} {info['shape']} but the new value is {value.dtype} "
                    f"{list(value.shape)}: pass the checkpoint the model was loaded from"
                )
            file.seek(start + info["data_offsets"][0])
            file.write(tensor_bytes(value))


def _is_lunar(rel: str) -> bool:
    return rel == MANIFEST or rel.startswith(PATCH_DIR + "/")


def copy_checkpoint(checkpoint: Checkpoint, dst: Path, new_tensors: dict[str, Tensor]) -> tuple[dict[str, str], list[str]]:
    """Copy `checkpoint` into `dst`, writing `new_tensors` (checkpoint name → value of the same dtype and
    shape) into the copies of the shards that hold them; every other file is copied byte for byte.

    Skipped: hidden entries, the lunar files (callers write their own) and weights that are not the
    model's safetensors (pickles, stray `consolidated.safetensors`: stale copies of unedited weights).
    A symbolic link (other than a Hugging Face cache snapshot's) is copied by content, with a warning.
    Returns the SHA-256 of every file copied (relative path → hex) and the skipped weight files.
    """
    by_file: dict[str, dict[str, Tensor]] = {}
    for key, value in new_tensors.items():
        by_file.setdefault(checkpoint.weight_map[key], {})[key] = value
    hashes, skipped = {}, []
    for folder, dirs, files in os.walk(checkpoint.root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".")):
            src = Path(folder) / name
            rel = src.relative_to(checkpoint.root).as_posix()
            if _is_lunar(rel):
                continue
            if src.is_symlink() and src.resolve().parent != checkpoint.root.parent.parent / "blobs":
                warnings.warn(f"{src} is a symbolic link to {src.resolve()}: its content is copied as a plain file", stacklevel=2)
            stale = rel not in checkpoint.weight_files and rel not in ARTEFACTS
            if stale and Path(rel.removesuffix(".index.json")).suffix in WEIGHT_SUFFIXES:
                skipped.append(rel)
                continue
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            hashes[rel] = _copy_hashed(src, dst / rel)
            if rel in by_file:
                _write_tensors(dst / rel, by_file[rel])
    return hashes, sorted(skipped)


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except ValueError:
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("patches", []), list):
        raise LunarError(f"{path} is not a valid lunar-lens manifest: the checkpoint was modified; start again from its base")
    return record
