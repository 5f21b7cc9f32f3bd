"""Data parallelism for large runs, on `torch.distributed` as started by `torchrun`.

Every process (rank) reads the whole data set, so decisions that depend on all of it (the refusal text,
the shared prompt prefix) are the same everywhere; it runs the model only on its shard of the prompts.
Everything the edit needs is a sum (direction totals, the Gram matrix XᵀX, the forget sums ΣX), so
the sums are all-reduced and every rank solves the same system: all ranks hold the same edited model
for the next layer, and only rank 0 writes files. The sums are float64 tensors in CPU memory, so the
backend is gloo, with or without GPUs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from lunar_lens.core.errors import LunarError

T = TypeVar("T")


@dataclass(frozen=True)
class DataParallel:
    """This process's place among `size` processes; `DataParallel()` is a single process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # rank on this machine (picks its GPU)
    local_size: int = 1  # processes on this machine

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's items: rank, rank + size, rank + 2·size, … (possibly none)."""
        return list(items[self.rank :: self.size])

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of `tensor` over all ranks (in place; every rank gets the same values)."""
        if self.size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def gather(self, value: Any) -> list[Any]:
        """`value` (any picklable object) of every rank, in rank order."""
        if self.size == 1:
            return [value]
        values: list[Any] = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def gpus(self) -> list[int]:
        """The CUDA devices of this rank: visible devices split evenly between this machine's ranks."""
        per_rank = torch.cuda.device_count() // self.local_size
        if per_rank == 0:
            raise LunarError(
                f"{self.local_size} processes per machine but {torch.cuda.device_count()} GPU(s): "
                "launch torchrun with --nproc-per-node at most the number of GPUs"
            )
        return list(range(self.local_rank * per_rank, (self.local_rank + 1) * per_rank))

    def device(self, device: str) -> str:
        """`cuda` → this rank's first GPU; anything else unchanged."""
        return f"cuda:{self.gpus()[0]}" if device == "cuda" and self.size > 1 else device

    def max_memory(self, device_map: str | dict | None) -> dict[int, int] | None:
        """With several ranks per machine, restrict an automatic device map to this rank's GPUs."""
        if not isinstance(device_map, str) or self.local_size == 1 or not torch.cuda.is_available():
            return None
        return {gpu: torch.cuda.mem_get_info(gpu)[0] for gpu in self.gpus()}


SINGLE = DataParallel()


def init_from_env() -> DataParallel:
    """Join the process group `torchrun` describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT);
    a single process when WORLD_SIZE is unset or 1."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return SINGLE
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return DataParallel(
        dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    )
