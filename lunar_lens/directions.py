"""Unanswerability directions: per layer, mean residual (leaving the block) on reference prompts minus
the mean on forget prompts, for every layer in one batched pass per set, accumulated in float64."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from transformer_lens.model_bridge import TransformerBridge

from lunar_lens.activations import capture, token_batches
from lunar_lens.errors import LunarError
from lunar_lens.model import n_layers, resid_post

DIRECTION_RULES = ("last", "question")


@dataclass
class Directions:
    """r[l] = mean_reference(h_l) − mean_forget(h_l) for each layer l (h_l = `blocks.l.hook_resid_post`)."""

    vectors: Float[torch.Tensor, "n_layers d_model"]
    rule: str = "last"
    n_reference: int = 0
    n_forget: int = 0
    metadata: dict = field(default_factory=dict)

    def __getitem__(self, layer: int) -> Float[torch.Tensor, "d_model"]:
        return self.vectors[layer]

    @property
    def norms(self) -> list[float]:
        return self.vectors.norm(dim=-1).tolist()

    def cosine_between_layers(self) -> Float[torch.Tensor, "n_layers n_layers"]:
        unit = self.vectors / self.vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return unit @ unit.T

    def summary(self) -> dict:
        return {
            "rule": self.rule,
            "hook": "blocks.{l}.hook_resid_post",
            "n_reference": self.n_reference,
            "n_forget": self.n_forget,
            "norms": self.norms,
            "cosine_between_layers": self.cosine_between_layers().tolist(),
            **self.metadata,
        }

    def save(self, path: str | Path) -> None:
        """`path`.safetensors (the vectors) and `path`.json (metadata)."""
        path = Path(path)
        save_file({"directions": self.vectors.contiguous()}, str(path.with_suffix(".safetensors")))
        path.with_suffix(".json").write_text(json.dumps(self.summary(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "Directions":
        path = Path(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        vectors = load_file(str(path.with_suffix(".safetensors")))["directions"]
        extra = {k: v for k, v in meta.items() if k not in {"rule", "hook", "n_reference", "n_forget", "norms", "cosine_between_layers"}}
        return cls(vectors, meta["rule"], meta["n_reference"], meta["n_forget"], extra)


@torch.no_grad()
def mean_residuals(
    bridge: TransformerBridge,
    questions: list[str],
    rule: str = "last",
    layers: list[int] | None = None,
    batch_size: int = 32,
    desc: str | None = None,
) -> Float[torch.Tensor, "n_layers d_model"]:
    """Mean of `blocks.l.hook_resid_post` over prompts (float64), at the last prompt token or
    averaged over each prompt's question tokens; one pass per batch, stopped after the deepest layer."""
    if rule not in DIRECTION_RULES:
        raise LunarError(f"unknown direction rule {rule!r}: use one of {', '.join(DIRECTION_RULES)}")
    if not questions:
        raise LunarError("cannot compute a mean residual over an empty set of prompts: give at least one question")
    layers = list(range(n_layers(bridge))) if layers is None else layers
    names = [resid_post(layer) for layer in layers]
    total = torch.zeros(len(layers), bridge.cfg.d_model, dtype=torch.float64)
    for batch in token_batches(bridge.tokenizer, questions, batch_size=batch_size, desc=desc):
        cache = capture(bridge, batch, names, stop_at_layer=max(layers) + 1)
        if rule == "last":
            weights = torch.zeros(batch.input_ids.shape, dtype=torch.float64)
            weights[torch.arange(len(weights)), batch.last_prompt_index] = 1.0
        else:
            weights = batch.question_mask.double()
            weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1.0)
        for i, name in enumerate(names):
            total[i] += torch.einsum("bs,bsd->d", weights, cache[name].double().cpu())
    return total / len(questions)


def compute_directions(
    bridge: TransformerBridge,
    forget_questions: list[str],
    reference_questions: list[str],
    rule: str = "last",
    batch_size: int = 32,
    progress: bool = False,
) -> Directions:
    """Unanswerability directions for every layer (not normalised, as in the release)."""
    reference = mean_residuals(bridge, reference_questions, rule, batch_size=batch_size, desc="reference activations" if progress else None)
    forget = mean_residuals(bridge, forget_questions, rule, batch_size=batch_size, desc="forget activations" if progress else None)
    return Directions((reference - forget).float(), rule, len(reference_questions), len(forget_questions))
