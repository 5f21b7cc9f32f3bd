"""Memory budgets: what one pass may hold beside the weights, as a share of the weights' bytes."""

from __future__ import annotations

from transformer_lens.model_bridge import TransformerBridge


def weight_bytes(bridge: TransformerBridge) -> int:
    """The bytes of the model's parameters (each shared one once)."""
    return sum(p.numel() * p.element_size() for p in bridge.original_model.parameters())


def memory_budget(bridge: TransformerBridge, share: float, bounds: tuple[int, int]) -> int:
    """`share` of the model's weight bytes, within `bounds` (bytes): what one pass may hold beside the weights
    (experiments/bench_memory.py), so that host memory stays near one copy of the weights at every size."""
    return int(min(max(share * weight_bytes(bridge), bounds[0]), bounds[1]))


# what one forward (and backward) pass may hold: a tenth of the weights' bytes, within these bounds; larger
# batches are split into passes (experiments/bench_memory.py)
ACTIVATION_SHARE, ACTIVATION_BYTES = 0.1, (16 * 2**20, 256 * 2**20)


def activation_budget(bridge: TransformerBridge) -> int:
    return memory_budget(bridge, ACTIVATION_SHARE, ACTIVATION_BYTES)
