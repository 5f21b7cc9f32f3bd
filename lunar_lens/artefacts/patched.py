"""Patched checkpoints: a patch applied to, or reverted from, a checkpoint folder, written as a new folder.

A patched checkpoint remembers its base: `lunar_patches/base_tensors.safetensors` keeps the original
bytes of every touched tensor, `lunar_patches/<sha>.safetensors` a copy of every applied patch, and
`lunar_manifest.json` their order and scales. A touched tensor is always
`cast(base_float32 + Σ scale·delta, dtype)` (`model.added`, the rule in-memory edits follow too), so any
patch reverts while the others stay (unless a later patch was solved on top of it), and reverting the
last one restores the base bit for bit, which is checked.

An exported checkpoint (`lunar_lens.artefacts.export`) is its source with the export's patch applied, plus the
files that export brought (`ARTEFACTS`: model card, directions, report, the patch itself); the source's
own versions of those files, and its manifest, are kept in `lunar_patches/<sha>/`, so reverting that
patch gives the source folder back file for file.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from lunar_lens.artefacts.patches import Patch, check_base, check_scale, load_patch
from lunar_lens.core.atomic import FORMAT, MANIFEST, atomic_output, check_output, write_manifest
from lunar_lens.core.errors import LunarError
from lunar_lens.model.checkpoint import (
    PATCH_DIR,
    Checkpoint,
    copy_checkpoint,
    dense,
    file_sha256,
    local_folder,
    read_manifest,
    safetensors_header,
    tensor_sha256,
)
from lunar_lens.model.weights import added

BASE_TENSORS = f"{PATCH_DIR}/base_tensors.safetensors"
PATCHED = f"{FORMAT} patched 1"  # the manifest format of a patched plain checkpoint


def _deltas(applied: list[tuple[dict, Patch]], key: str) -> list[Tensor]:
    """What the `applied` patches add to tensor `key`, each at the scale it was applied with (0: nothing)."""
    return [
        record.get("scale", 1.0) * entry.delta
        for record, patch in applied for entry in patch.entries if entry.tensor == key and record.get("scale", 1.0) != 0
    ]


def _patch_file(sha256: str) -> str:
    return f"{PATCH_DIR}/{sha256[:16]}.safetensors"


def _applied(checkpoint: Checkpoint) -> list[tuple[dict, Patch]]:
    """The patches applied to `checkpoint`, in order, as (manifest record, patch), each checked."""
    applied = []
    for record in read_manifest(checkpoint.root).get("patches", []):
        sha = record.get("sha256") if isinstance(record, dict) else None
        if not isinstance(sha, str) or record.get("file") != _patch_file(sha):
            raise LunarError(
                f"{checkpoint.root / MANIFEST} names the patch file {record.get('file') if sha else record!r}, not "
                f"{PATCH_DIR}/<its SHA-256>.safetensors: the manifest was modified; start again from the checkpoint's base"
            )
        patch = load_patch(checkpoint.root / record["file"])
        if patch.sha256 != sha:
            raise LunarError(
                f"{patch.path} no longer matches its SHA-256 in {checkpoint.root / MANIFEST}: the checkpoint was modified; "
                "start again from its base"
            )
        applied.append((record, patch))
    return applied


def _base_tensors(checkpoint: Checkpoint, applied: list[tuple[dict, Patch]]) -> dict[str, Tensor]:
    """The original tensors kept by a patched checkpoint, each checked against the SHA-256 of the base
    its first patch was solved on."""
    if not applied:
        return {}
    path = checkpoint.root / BASE_TENSORS
    if not path.is_file():
        raise LunarError(f"{checkpoint.root} has patches applied but no {BASE_TENSORS}: the checkpoint was modified; start again from its base")
    _, _, problem = safetensors_header(path)
    try:
        if problem:
            raise SafetensorError(problem)
        with safe_open(path, framework="pt") as file:
            base = {key: file.get_tensor(key) for key in file.keys()}
    except SafetensorError as error:
        raise LunarError(f"{path} is corrupted ({error}): start again from the checkpoint's base") from None
    for key in {e.tensor for _, p in applied for e in p.entries}:
        first = next(e for _, p in applied for e in p.entries if e.tensor == key)
        if key not in base or tensor_sha256(base[key]) != first.base_sha256:
            raise LunarError(
                f"{path} is corrupted: its {key} is not the tensor the first patch was solved on (SHA-256 {first.base_sha256[:12]}…): "
                "start again from the checkpoint's base"
            )
    return base


def _check_stack(applied: list[tuple[dict, Patch]], base: dict[str, Tensor]) -> None:
    """Refuse a stack in which a patch would not sit on what it was solved on: its base tensors (or the
    original ones), after the patches its base checkpoint had applied."""
    done: list[str] = []
    for record, patch in applied:
        missing = [sha for sha in patch.base_patches if sha not in done]
        below = [e.tensor for e in patch.entries
                 if e.base_sha256 not in {tensor_sha256(base[e.tensor]), tensor_sha256(added(base[e.tensor], _deltas(applied[: len(done)], e.tensor)))}]
        if missing or below:
            what = f"patch {missing[0][:12]}…" if missing else f"the patches below it (it edits {below[0]})"
            raise LunarError(
                f"{record['source']} was solved on top of {what}, which it would no longer sit on: "
                "keep a patch below the ones solved on it (revert those first; apply it first)"
            )
        done.append(patch.sha256)


def patch_state(checkpoint: Checkpoint, patch: Patch) -> tuple[list[tuple[dict, Patch]], dict[str, Tensor]]:
    """The patches already applied to `checkpoint` and the base tensors once `patch` goes on top: the
    recorded originals, plus the current bytes of tensors `patch` is the first to touch."""
    applied = _applied(checkpoint)
    base = _base_tensors(checkpoint, applied)
    for key in ({entry.tensor for entry in patch.entries} - base.keys()) & checkpoint.weight_map.keys():
        base[key] = checkpoint.read(key)  # (a tensor the checkpoint lacks is refused by check_base)
    return applied, base


def patch_record(patch: Patch, scale: float = 1.0) -> dict:
    """The manifest entry of an applied patch (an export adds the files it brought: `files`, `replaced`)."""
    return {
        "sha256": patch.sha256, "file": _patch_file(patch.sha256), "source": str(patch.path),
        "tensors": sorted({entry.tensor for entry in patch.entries}), "layers": patch.layers, "scale": scale, "info": patch.info,
    }


def stash_dir(record: dict) -> str:
    """Where the source's versions of the files an export replaced are kept: lunar_patches/<sha16>/."""
    return f"{PATCH_DIR}/{record['sha256'][:16]}"


def write_patch_state(folder: Path, checkpoint: Checkpoint, applied: list[tuple[dict, Patch]], base: dict[str, Tensor]) -> None:
    """`folder/lunar_patches/`: the base bytes of every tensor the `applied` patches touch, a copy of each
    patch, and the files earlier exports replaced (kept in `checkpoint`)."""
    if not applied:
        return
    (folder / PATCH_DIR).mkdir(exist_ok=True)
    touched = {entry.tensor for _, patch in applied for entry in patch.entries}
    save_file({key: dense(base[key]) for key in sorted(touched)}, str(folder / BASE_TENSORS))
    for record, patch in applied:
        shutil.copyfile(patch.path, folder / record["file"])
        if (checkpoint.root / stash_dir(record)).is_dir():
            shutil.copytree(checkpoint.root / stash_dir(record), folder / stash_dir(record))


def _restore_files(checkpoint: Checkpoint, folder: Path, record: dict) -> None:
    """Take off the files an export brought: each goes back to the source's version, or away, unless
    something changed it since."""
    for name, sha in record["files"].items():
        if (folder / name).is_file() and file_sha256(folder / name) == sha:
            (folder / name).unlink()
    for name in record["replaced"]:
        if name != MANIFEST and not (folder / name).exists():
            shutil.copyfile(checkpoint.root / stash_dir(record) / name, folder / name)


def _write_patched(
    checkpoint: Checkpoint, applied: list[tuple[dict, Patch]], base: dict[str, Tensor], touched: set[str], out_dir: str | Path,
    force: bool, reverted: dict | None = None,
) -> Path:
    """Write `checkpoint` with `applied` patches on top of `base`, recomputing the `touched` tensors
    (read back and checked before the folder appears). `reverted`: the manifest entry of the patch taken
    off; an export's files go back to its source's, and when it was the last patch, so does the manifest."""
    _check_stack(applied, base)
    new = {key: added(base[key], _deltas(applied, key)) for key in touched}
    record = read_manifest(checkpoint.root)
    record.pop("patches", None)
    if record.get("format") == PATCHED:
        record.pop("format")
    exported = reverted is not None and "files" in reverted
    with atomic_output(out_dir, folder=True, force=force, inputs=[checkpoint.root]) as tmp:
        copy_checkpoint(checkpoint, tmp, new)
        written = Checkpoint(tmp, checkpoint.weight_map)
        wrong = [key for key, value in new.items() if tensor_sha256(written.read(key)) != tensor_sha256(value)]
        if wrong:
            raise LunarError(f"{wrong[0]} read back from the new checkpoint differs from what was written: check the disk; nothing was written")
        write_patch_state(tmp, checkpoint, applied, base)
        if exported:
            _restore_files(checkpoint, tmp, reverted)
        if applied:
            record = {"format": PATCHED} | record | {"patches": [entry for entry, _ in applied]}
        if exported and record.get("patches") == read_manifest(checkpoint.root / stash_dir(reverted)).get("patches"):
            if MANIFEST in reverted["replaced"]:  # the export's source state, byte for byte
                shutil.copyfile(checkpoint.root / stash_dir(reverted) / MANIFEST, tmp / MANIFEST)
        elif record:
            write_manifest(tmp, record)
    return Path(out_dir)


def apply_patch(checkpoint_dir: str | Path, patch_path: str | Path, out_dir: str | Path, force: bool = False, scale: float = 1.0) -> Path:
    """Write `checkpoint_dir` + `scale`·the patch to `out_dir` (the patch stacks on any already applied;
    scale 0 leaves every tensor as it is, 1 is the whole edit)."""
    scale = check_scale(scale)
    check_output(out_dir, folder=True, force=force, inputs=[local_folder(checkpoint_dir), patch_path])
    checkpoint, patch = Checkpoint.open(checkpoint_dir), load_patch(patch_path)
    applied, base = patch_state(checkpoint, patch)
    if any(p.sha256 == patch.sha256 for _, p in applied):
        raise LunarError(f"{patch.path} is already applied to {checkpoint.root}: nothing to do")
    check_base(patch, checkpoint, base)
    touched = {entry.tensor for entry in patch.entries}
    return _write_patched(checkpoint, applied + [(patch_record(patch, scale), patch)], base, touched, out_dir, force)


def revert_patch(checkpoint_dir: str | Path, patch_path: str | Path, out_dir: str | Path, force: bool = False) -> Path:
    """Write `checkpoint_dir` without the patch to `out_dir`, keeping every other applied patch
    (refused when one of them was solved on top of it)."""
    check_output(out_dir, folder=True, force=force, inputs=[local_folder(checkpoint_dir), patch_path])
    checkpoint, patch = Checkpoint.open(checkpoint_dir), load_patch(patch_path)
    applied = _applied(checkpoint)
    if not any(p.sha256 == patch.sha256 for _, p in applied):
        names = [entry["source"] for entry, _ in applied] or "none"
        raise LunarError(
            f"{patch.path} is not applied to {checkpoint.root} (applied: {names}): `lunar-lens patch show {checkpoint.root}` lists them"
        )
    remaining = [(entry, p) for entry, p in applied if p.sha256 != patch.sha256]
    reverted = next(entry for entry, p in applied if p.sha256 == patch.sha256)
    touched = {e.tensor for e in patch.entries}
    return _write_patched(checkpoint, remaining, _base_tensors(checkpoint, applied), touched, out_dir, force, reverted)
