"""W_out of a layer: the parameter, its orientation and checkpoint name, the one rule by which an edit changes it, and ΔW simulated by hooks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from jaxtyping import Float
from transformer_lens.model_bridge import TransformerBridge

from lunar_lens.core.errors import LunarError
from lunar_lens.model.names import check_layer, mlp_out, mlp_post, n_layers


def _dense(bridge: TransformerBridge, layer: int) -> bool:
    weight = getattr(getattr(bridge.blocks[layer].mlp, "out", None), "weight", None)
    return isinstance(weight, torch.nn.Parameter) and weight.ndim == 2


def check_dense_mlp(bridge: TransformerBridge, layer: int | None = None) -> None:
    """LUNAR edits a dense MLP down-projection: refuse a `layer` without one (None: a model with none)."""
    layers = range(n_layers(bridge)) if layer is None else [layer]
    if not any(_dense(bridge, index) for index in layers):
        where = "in any layer" if layer is None else f"in layer {layer}"
        raise LunarError(
            f"{bridge.cfg.architecture} has no dense MLP down-projection (W_out) {where} to edit "
            f"(mixture-of-experts or fused MLP): use {'a model with a dense MLP' if layer is None else 'a layer with a dense MLP'}"
        )


def w_out_parameter(bridge: TransformerBridge, layer: int) -> torch.nn.Parameter:
    """The HF parameter holding W_out of `layer` (Linear: [d_model, d_mlp]; GPT-2 Conv1D: [d_mlp, d_model])."""
    check_dense_mlp(bridge, check_layer(bridge, layer))
    return bridge.blocks[layer].mlp.out.weight


def w_out_is_transposed(bridge: TransformerBridge, layer: int) -> bool:
    """True when the HF tensor is W_outᵀ (nn.Linear stores [out, in])."""
    module = bridge.blocks[layer].mlp.out.original_component
    return isinstance(module, torch.nn.Linear)


def w_out(bridge: TransformerBridge, layer: int) -> Float[torch.Tensor, "d_mlp d_model"]:
    """W_out of `layer` in TransformerLens orientation (a live view of the HF parameter)."""
    weight = w_out_parameter(bridge, layer)
    return weight.T if w_out_is_transposed(bridge, layer) else weight


def hf_name(name: str) -> str:
    """A parameter's Hugging Face name: the bridge wraps the HF modules in place (`…._original_component.…`)."""
    return name.replace("._original_component", "")


def w_out_tensor_name(bridge: TransformerBridge, layer: int) -> str:
    """The checkpoint (state-dict) name of W_out of `layer`, e.g. `model.layers.3.mlp.down_proj.weight`."""
    target = w_out_parameter(bridge, layer)
    for name, param in bridge.original_model.named_parameters(remove_duplicate=False):
        if param is target:
            return hf_name(name)
    raise LunarError(f"could not find W_out of layer {layer} among the model's parameters")


def added(base: Float[torch.Tensor, "*shape"], deltas: Sequence[Float[torch.Tensor, "*shape"]]) -> Float[torch.Tensor, "*shape"]:
    """cast(base + Σ deltas) to base's dtype, summed in order in float32 (float64 for a float64 base): the one
    rule by which an edit changes a weight, in memory and in a patched checkpoint alike, so both agree bit for bit."""
    if not deltas:
        return base
    total = base.to(torch.promote_types(base.dtype, torch.float32))
    for delta in deltas:
        total = total + delta.to(total.device, total.dtype)
    return total.to(base.dtype)


@torch.no_grad()
def add_to_w_out(bridge: TransformerBridge, layer: int, delta: Float[torch.Tensor, "d_mlp d_model"]) -> None:
    """W_out[layer] = added(W_out[layer], [delta]), in place, in the parameter's own dtype."""
    view = w_out(bridge, layer)
    if view.is_meta:
        raise LunarError(
            f"W_out of layer {layer} is offloaded to disk by the device map, so it cannot be edited in place: "
            "map that layer to a GPU or the CPU (or use {device_map} auto with enough GPU/CPU memory)", ("device_map",)
        )
    view.copy_(added(view, [delta]))


@contextlib.contextmanager
def weights_restored(params: Sequence[torch.nn.Parameter]) -> Iterator[None]:
    """Whatever the block does to `params`, they hold their current values again, bit for bit, on exit."""
    saved = [param.detach().clone() for param in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for param, old in zip(params, saved):
                param.copy_(old)


Factors = tuple[Float[torch.Tensor, "d_mlp k"], Float[torch.Tensor, "d_model k"]]


def delta_hooks(edits: dict[int, Float[torch.Tensor, "d_mlp d_model"] | Factors], scale: Float[torch.Tensor, " batch"] | None = None) -> list[tuple]:
    """Hooks that act as W_out[l] + edits[l] for every edited layer l: the MLP output gains `mlp.hook_post @ Δ`
    (differentiable in Δ), × `scale[b]` in row b when given (one batch simulates several multiples). An edit
    given as factors (u, v) is Δ = u·vᵀ, applied without forming it."""
    hooks = []
    for layer, delta in edits.items():
        inputs: list[torch.Tensor] = []

        def keep(activation: torch.Tensor, hook=None, inputs: list = inputs) -> torch.Tensor:
            inputs[:] = [activation]
            return activation

        def add(activation: torch.Tensor, hook=None, inputs: list = inputs, delta: torch.Tensor | Factors = delta) -> torch.Tensor:
            if isinstance(delta, tuple):
                u, v = (factor.to(activation.device, activation.dtype) for factor in delta)
                change = (inputs[0] @ u) @ v.T
            else:
                change = inputs[0] @ delta.to(activation.device, activation.dtype)
            return activation + (change if scale is None else change * scale.to(change)[:, None, None])

        hooks += [(mlp_post(layer), keep), (mlp_out(layer), add)]
    return hooks
