"""Hook names per layer and the layer count: the TransformerLens hook points LUNAR reads and writes."""

from __future__ import annotations

from transformer_lens.model_bridge import TransformerBridge

from lunar_lens.core.errors import LunarError

# ---------------------------------------------------------------- hook names

def resid_pre(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


def resid_post(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def mlp_post(layer: int) -> str:
    """The input of W_out (the MLP hidden activation)."""
    return f"blocks.{layer}.mlp.hook_post"


def mlp_out(layer: int) -> str:
    return f"blocks.{layer}.hook_mlp_out"


# ---------------------------------------------------------------- W_out access

def n_layers(bridge: TransformerBridge) -> int:
    return int(bridge.cfg.n_layers)


def check_layer(bridge: TransformerBridge | int, layer: int) -> int:
    """`layer`, refused unless it is a layer of `bridge` (or of a model with that many layers)."""
    total = bridge if isinstance(bridge, int) else n_layers(bridge)
    if not isinstance(layer, int) or not 0 <= layer < total:
        raise LunarError(f"layer {layer} is out of range: this model has layers 0..{total - 1}")
    return layer
