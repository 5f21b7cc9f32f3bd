"""Progress that fits the place: tqdm bars on a terminal; with `TQDM_DISABLE`, `--quiet` (`quiet()`) or
output that is not a terminal, no bars, and every stage ends with one line saying what it did and how long
it took (on stderr, so stdout keeps only results)."""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from lunar_lens.core.host_memory import release_freed

if TYPE_CHECKING:  # tqdm is imported when a bar is made, so that `lunar-lens --help` starts fast
    from tqdm import tqdm

_QUIET = contextvars.ContextVar("lunar_lens_quiet", default=False)


def bars_wanted() -> bool:
    """Bars only on a terminal, never with `TQDM_DISABLE` set (to anything but 0/false) or inside `quiet()`."""
    disabled = os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no")
    return not (_QUIET.get() or disabled) and sys.stderr.isatty()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No progress bars inside the block (stage lines stay)."""
    token = _QUIET.set(True)
    try:
        yield
    finally:
        _QUIET.reset(token)


def bar(iterable: Iterable | None = None, desc: str | None = None, total: int | None = None, leave: bool = False) -> tqdm:
    """A tqdm bar when `desc` is given and bars are wanted; otherwise the same object, disabled."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=leave, disable=desc is None or not bars_wanted())


@contextlib.contextmanager
def library_bars() -> Iterator[None]:
    """transformers' and huggingface_hub's own bars (weight loading) follow `bars_wanted()` in the block."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    if was_enabled and not bars_wanted():
        logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not logging.is_progress_bar_enabled():
            logging.enable_progress_bar()


class Stages:
    """Times named stages; with `report`, each finished stage prints one line ("what: 1.2 s") to stderr.
    A finished stage's freed memory goes back to the system (`host_memory.release_freed`).

    `seconds` maps each stage's key to its wall-clock time (summed when a key repeats)."""

    def __init__(self, report: bool = True) -> None:
        self.report = report
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, key: str, what: str | None = None) -> Iterator[None]:
        started = time.perf_counter()
        yield
        seconds = time.perf_counter() - started
        release_freed()
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds
        if self.report:
            print(f"{what or key}: {seconds:.1f} s", file=sys.stderr, flush=True)
