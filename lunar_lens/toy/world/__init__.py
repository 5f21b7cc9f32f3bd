"""The embedded toy world: a fictitious world generator and a tiny Llama trained on it (shipped)."""

from __future__ import annotations

from pathlib import Path

from lunar_lens.data.qa import QA
from lunar_lens.toy.world.world import REFUSALS, World, build_world

__all__ = ["QA", "REFUSALS", "World", "build_world", "checkpoint_path"]


def checkpoint_path() -> Path:
    """The shipped checkpoint (reproduced by `lunar-lens train-toy --out DIR --seed 0`)."""
    return Path(__file__).resolve().parent / "checkpoint"
