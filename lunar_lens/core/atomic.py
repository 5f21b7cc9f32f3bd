"""Where lunar-lens writes. Every output target is checked before anything runs; it is written
atomically (a hidden partial beside it, renamed into place, removed on failure, SIGINT or SIGTERM, and
by a later run when the process that made it is gone) with the user's umask; and an existing target is
replaced only with `force`, and only when lunar-lens wrote it: a folder holding a lunar-lens manifest,
a JSON report or a figure marked as lunar-lens's. Never a data file, never a folder it did not make."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from lunar_lens.core.errors import LunarError

MANIFEST = "lunar_manifest.json"
FORMAT = "lunar-lens"  # every record lunar-lens writes has "format": "lunar-lens <kind> <version>"
PARTIAL = ".partial-"
SIGNALS = (signal.SIGINT, signal.SIGTERM)
_PRIVATE: set[Path] = set()  # outputs written with `private`: an output folder around one leaves it so


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that partial outputs are cleaned up on the way out."""


def raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def written_by_lunar_lens(path: Path) -> bool:
    """Whether `path` is an output of lunar-lens: a folder with a lunar-lens manifest, a JSON record
    whose "format" is lunar-lens's, a PNG figure whose Software tag is, or a patch file."""
    try:
        if path.is_dir():
            return _record_format(path / MANIFEST).startswith(FORMAT)
        if path.suffix == ".json":
            return _record_format(path).startswith(FORMAT)
        if path.suffix == ".png":
            from PIL import Image

            with Image.open(path) as image:
                return str(image.info.get("Software", "")).startswith(FORMAT)
        if path.suffix == ".safetensors":
            with open(path, "rb") as file:
                length = int.from_bytes(file.read(8), "little")
                return "lunar_patch" in (json.loads(file.read(min(length, 1 << 24))).get("__metadata__") or {})
    except (OSError, ValueError, AttributeError):
        return False
    return False


def _record_format(path: Path) -> str:
    record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return str(record.get("format", "")) if isinstance(record, dict) else ""


def check_output(
    path: str | Path, *, folder: bool, force: bool = False, inputs: Sequence[str | Path] = (), parameter: str = "out"
) -> Path:
    """The absolute target `path` (named `parameter` in errors), refused when it overlaps an input
    folder, is a link, is of the wrong kind, cannot be created, or exists and may not be replaced."""
    names = (parameter, "force")
    given = Path(path).expanduser()
    if given.is_symlink():
        raise LunarError(f"{{{parameter}}} {given} is a symbolic link: name the real location", names)
    target = given.absolute().parent.resolve() / given.name
    kind = "folder" if folder else "file"
    for source in (Path(i).expanduser().resolve() for i in inputs):
        if target == source or source in target.parents or (folder and target in source.parents):
            raise LunarError(f"{{{parameter}}} {target} overlaps the source {source}, which is never written: choose a {kind} outside it", names)
    if target.is_dir() != folder and target.exists():
        found = "folder" if target.is_dir() else "file"
        raise LunarError(f"{{{parameter}}} {target} is a {found}, not a {kind}: name a new {kind}", names)
    if target.exists() and not (folder and not any(target.iterdir())):
        if not force:
            raise LunarError(f"{{{parameter}}} {target} already exists: pass {{force}} to replace it, or choose another {{{parameter}}}", names)
        if not written_by_lunar_lens(target):
            raise LunarError(
                f"{{{parameter}}} {target} was not written by lunar-lens (no lunar-lens manifest or record), so it is never "
                f"replaced, even with {{force}}: choose another {{{parameter}}}", names,
            )
    ancestor = target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise LunarError(f"{{{parameter}}} {target} cannot be created: {ancestor} is a file, not a folder: choose another location", names)
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise LunarError(f"{{{parameter}}} {target} cannot be created: {ancestor} is not writable: choose a writable location", names)
    return target


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(target: Path) -> None:
    """Remove what an earlier, dead lunar-lens process left beside `target` (`.NAME.partial-PID-…`);
    a replaced output it had set aside (`….old`) goes back into place when `target` is missing."""
    prefix = f".{target.name}{PARTIAL}"
    for partial in sorted(target.parent.glob(prefix + "*")):
        pid = partial.name[len(prefix):].split("-")[0]
        if pid.isdigit() and _alive(int(pid)):
            continue
        if partial.name.endswith(".old") and not target.exists():
            os.replace(partial, target)
        else:
            _remove(partial)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _follow_umask(path: Path) -> None:
    """Give `path` (and, for a folder, all it holds) the modes a plain file or folder made under the
    user's umask has: writers such as mkdtemp and safetensors make them private."""
    mask = os.umask(0)
    os.umask(mask)
    for item in [path, *(path.rglob("*") if path.is_dir() else [])]:
        if not item.is_symlink() and item not in _PRIVATE:
            item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def blocked_signals() -> Iterator[None]:
    """SIGINT and SIGTERM held back (delivered on exit), so a step that must not be cut is not."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGTERM raises `Terminated` (unless the program already handles it; main thread only)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def atomic_output(
    path: str | Path, *, folder: bool, force: bool = False, inputs: Sequence[str | Path] = (), parameter: str = "out", private: bool = False
) -> Iterator[Path]:
    """A hidden partial folder (or file) beside `path`, renamed onto it when the block succeeds and
    removed when it fails or is interrupted: `path` is never left half written (`check_output` first).
    It follows the umask, or with `private` is readable by its owner only."""
    target = check_output(path, folder=folder, force=force, inputs=inputs, parameter=parameter)
    remove_stale_partials(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with signals_raise():
        with blocked_signals():
            prefix = f".{target.name}{PARTIAL}{os.getpid()}-"
            if folder:
                tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
            else:
                handle, name = tempfile.mkstemp(prefix=prefix, suffix=target.suffix, dir=target.parent)
                os.close(handle)
                tmp = Path(name)
        try:
            yield tmp
            if not private:
                _follow_umask(tmp)
            with blocked_signals():
                if target.exists():
                    old = tmp.with_name(tmp.name + ".old")
                    os.replace(target, old)
                    os.replace(tmp, target)
                    _remove(old)
                else:
                    os.replace(tmp, target)
            if private:
                _PRIVATE.add(target)
        except BaseException:
            with blocked_signals():
                _remove(tmp)
            raise


def write_manifest(folder: Path, record: dict) -> None:
    """The lunar-lens manifest of an output folder (`record` names its lunar-lens "format")."""
    (folder / MANIFEST).write_text(json.dumps(record, indent=2) + "\n")


def write_json(
    path: str | Path, record: dict, *, force: bool = False, inputs: Sequence[str | Path] = (), parameter: str = "out", private: bool = False
) -> Path:
    """Write `record` (which names its lunar-lens "format") as a JSON file, atomically (`atomic_output`)."""
    with atomic_output(path, folder=False, force=force, inputs=inputs, parameter=parameter, private=private) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    return Path(path)
