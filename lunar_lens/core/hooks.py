"""Forward hooks on TransformerLens hook points, shared by the localisation probes and the attacks: a
hook is a (hook point name, function) pair, as `bridge.hooks(fwd_hooks=...)` takes them."""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Float, Int

Hook = tuple[str, Callable]


def add_hook(shift: Float[torch.Tensor, "*shape d_model"]) -> Callable:
    """A forward hook adding `shift` (broadcast over batch and positions) to the activation."""

    def hook(activation: torch.Tensor, hook=None) -> torch.Tensor:
        return activation + shift.to(activation.device, activation.dtype)

    return hook


def ablation_hook(direction: Float[torch.Tensor, " d_model"]) -> Callable:
    """A forward hook projecting `direction` out of the activation at every position."""
    unit = direction / direction.norm().clamp_min(1e-12)

    def hook(activation: torch.Tensor, hook=None) -> torch.Tensor:
        u = unit.to(activation.device, activation.dtype)
        return activation - (activation @ u)[..., None] * u

    return hook


def patch_hook(columns: Int[torch.Tensor, " batch"], values: Float[torch.Tensor, "batch d_model"]) -> Callable:
    """A forward hook writing `values[b]` into row b at position `columns[b]`."""

    def hook(activation: torch.Tensor, hook=None) -> torch.Tensor:
        patched = activation.clone()
        patched[torch.arange(len(patched)), columns.to(patched.device)] = values.to(patched.device, patched.dtype)
        return patched

    return hook
