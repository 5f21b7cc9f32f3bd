"""Unanswerability directions: per layer, mean residual (leaving the block) on reference prompts minus
the mean on forget prompts, for every layer in one batched pass per set, accumulated in float64."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from transformer_lens.model_bridge import TransformerBridge

from lunar_lens.core.distributed import SINGLE, DataParallel
from lunar_lens.core.errors import LunarError
from lunar_lens.data.qa import QA
from lunar_lens.directions.activations import capture, token_batches
from lunar_lens.directions.refusals import DirectionRequest, refusal_target
from lunar_lens.model.names import n_layers, resid_post

DIRECTION_RULES = ("last", "question")


@dataclass
class Directions:
    """r[l] = mean_reference(h_l) − mean_forget(h_l) for each layer l (h_l = `blocks.l.hook_resid_post`)."""

    vectors: Float[torch.Tensor, "n_layers d_model"]
    rule: str = "last"
    n_reference: int = 0
    n_forget: int = 0
    metadata: dict = field(default_factory=dict)
    # the same difference at each token of a teacher-forced refusal (None when no refusal was given)
    answer_vectors: Float[torch.Tensor, "n_layers n_answer d_model"] | None = None

    def shift_table(self, layer: int, coeff: float) -> Float[torch.Tensor, "n_shifts d_model"]:
        """coeff × [r_l, r_l(answer token 0), r_l(answer token 1), …]: row j is the shift of
        `activations.shift_index` j."""
        self.check_layer(layer)
        rows = [self.vectors[layer : layer + 1]]
        if self.answer_vectors is not None:
            rows.append(self.answer_vectors[layer])
        return coeff * torch.cat(rows)

    def __getitem__(self, layer: int) -> Float[torch.Tensor, " d_model"]:
        self.check_layer(layer)
        return self.vectors[layer]

    def check_layer(self, layer: int) -> None:
        """Fail clearly when the directions stop before `layer` (computed with a shallower `deepest_layer`)."""
        if not 0 <= layer < len(self.vectors):
            raise LunarError(
                f"these directions cover layers 0..{len(self.vectors) - 1}, not layer {layer}: "
                "compute them with deepest_layer >= the deepest layer you edit"
            )

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
            "answer_tokens": 0 if self.answer_vectors is None else self.answer_vectors.shape[1],
            "cosine_between_layers": self.cosine_between_layers().tolist(),
            **self.metadata,
        }

    def hooks(self, coeff: float = 1.0, layers: Sequence[int] | None = None) -> list[tuple[str, Callable]]:
        """TransformerLens forward hooks adding coeff·r_l to `blocks.{l}.hook_resid_post` at every position,
        for `layers` (default: all): `bridge.hooks(fwd_hooks=...)`, `bridge.run_with_hooks(..., fwd_hooks=...)`."""
        layers = range(len(self.vectors)) if layers is None else layers

        def steer(layer: int) -> Callable:
            shift = coeff * self[layer]

            def hook(activation: Float[torch.Tensor, "batch seq d_model"], hook=None) -> Float[torch.Tensor, "batch seq d_model"]:
                return activation + shift.to(activation.device, activation.dtype)

            return hook

        return [(resid_post(layer), steer(layer)) for layer in layers]

    def save(self, path: str | Path) -> None:
        """`path`.safetensors (the vectors) and `path`.json (metadata)."""
        path = Path(path)
        tensors = {"directions": self.vectors.contiguous()}
        if self.answer_vectors is not None:
            tensors["answer_directions"] = self.answer_vectors.contiguous()
        save_file(tensors, str(path.with_suffix(".safetensors")))
        path.with_suffix(".json").write_text(json.dumps(self.summary(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "Directions":
        path = Path(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        tensors = load_file(str(path.with_suffix(".safetensors")))
        derived = {"rule", "hook", "n_reference", "n_forget", "norms", "answer_tokens", "cosine_between_layers"}
        extra = {k: v for k, v in meta.items() if k not in derived}
        return cls(tensors["directions"], meta["rule"], meta["n_reference"], meta["n_forget"], extra, tensors.get("answer_directions"))


@torch.no_grad()
def residual_means(
    bridge: TransformerBridge,
    questions: list[str],
    rule: str = "last",
    answer: str | None = None,
    layers: list[int] | None = None,
    batch_size: int = 32,
    desc: str | None = None,
    parallel: DataParallel = SINGLE,
) -> tuple[Float[torch.Tensor, "n_layers d_model"], Float[torch.Tensor, "n_layers n_answer d_model"] | None]:
    """Means of `blocks.l.hook_resid_post` over prompts (float64), from one pass per batch stopped after
    the deepest layer: at the last prompt token (or averaged over each prompt's question tokens), and,
    with `answer` teacher-forced after every prompt, at each of its tokens (the prompt positions of a
    causal model are the same with or without the answer appended). Answers that tokenise longer are cut
    to the shortest (over all ranks with `parallel`, where each rank runs its shard of the prompts)."""
    if rule not in DIRECTION_RULES:
        raise LunarError(f"unknown direction rule {rule!r}: use one of {', '.join(DIRECTION_RULES)}")
    if not questions:
        raise LunarError("cannot compute a mean residual over an empty set of prompts: give at least one question")
    layers = list(range(n_layers(bridge))) if layers is None else layers
    names = [resid_post(layer) for layer in layers]
    prompt_total = torch.zeros(len(layers), bridge.cfg.d_model, dtype=torch.float64)
    answer_total: torch.Tensor | None = None
    shard = parallel.shard(questions)
    answers = None if answer is None else [answer] * len(shard)
    for batch in token_batches(bridge.tokenizer, shard, answers, batch_size, desc, by_length=True):
        cache = capture(bridge, batch, names, stop_at_layer=max(layers) + 1)
        if rule == "last":
            weights = torch.zeros(batch.input_ids.shape, dtype=torch.float64)
            weights[torch.arange(len(weights)), batch.last_prompt_index] = 1.0
        else:
            weights = batch.question_mask.double()
            weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1.0)
        if answer is not None:
            offset = batch.answer_mask.long().cumsum(dim=1) - 1
            n_answer = int(batch.answer_mask.sum(dim=1).min())
            n_answer = n_answer if answer_total is None else min(answer_total.shape[1], n_answer)
            answer_total = torch.zeros(len(names), n_answer, prompt_total.shape[1], dtype=torch.float64) if answer_total is None else answer_total[:, :n_answer]
        for i, name in enumerate(names):  # one layer's float64 copy at a time
            resid = cache.pop(name).cpu().double()  # [batch, seq, d]
            prompt_total[i] += torch.einsum("bs,bsd->d", weights, resid)
            if answer is not None:
                for k in range(n_answer):
                    answer_total[i, k] += resid[batch.answer_mask & (offset == k)].sum(dim=0)
    prompt_mean = parallel.sum(prompt_total) / len(questions)
    if answer is None:
        return prompt_mean, None
    n_answer = min(n for n in parallel.gather(None if answer_total is None else answer_total.shape[1]) if n is not None)
    if answer_total is None:
        answer_total = torch.zeros(len(names), n_answer, bridge.cfg.d_model, dtype=torch.float64)
    return prompt_mean, parallel.sum(answer_total[:, :n_answer].contiguous()) / len(questions)


def compute_directions(
    bridge: TransformerBridge,
    forget_questions: list[str],
    reference_questions: list[str],
    rule: str = "last",
    batch_size: int = 32,
    progress: bool = False,
    refusal: str | None = None,
    parallel: DataParallel = SINGLE,
    deepest_layer: int | None = None,
) -> Directions:
    """Unanswerability directions for every layer (not normalised, as in the release); with `refusal`,
    also one per token of that refusal, teacher-forced after reference and forget prompts alike.
    With `deepest_layer`, only layers 0..deepest_layer (the passes stop there). With `parallel` (every
    rank passes the whole sets), each rank runs its shard of the prompts."""
    last = n_layers(bridge) - 1 if deepest_layer is None else deepest_layer
    if not 0 <= last < n_layers(bridge):
        raise LunarError(f"deepest_layer {deepest_layer} is outside the model's layers 0..{n_layers(bridge) - 1}")

    def means(questions: list[str], name: str):
        desc = f"{name} activations" if progress else None
        return residual_means(bridge, questions, rule, refusal or None, list(range(last + 1)), batch_size, desc, parallel)

    reference, answer_reference = means(reference_questions, "reference")
    forget, answer_forget = means(forget_questions, "forget")
    answer = None
    if refusal:
        n_answer = min(answer_reference.shape[1], answer_forget.shape[1])
        answer = (answer_reference[:, :n_answer] - answer_forget[:, :n_answer]).float()
    return Directions((reference - forget).float(), rule, len(reference_questions), len(forget_questions), answer_vectors=answer)


def directions_for(
    bridge: TransformerBridge,
    forget: Sequence[QA],
    reference: Sequence[QA],
    settings: DirectionRequest,
    progress: bool = False,
    parallel: DataParallel = SINGLE,
    deepest_layer: int | None = None,
) -> Directions:
    """The directions an edit with `settings` needs (per refusal token too, for `+answer` rules), for
    layers 0..`deepest_layer` (default: all)."""
    if not reference:
        raise LunarError("the reference set is empty: give questions the model already declines")
    refusal = refusal_target(bridge, reference, settings) if settings.positions.endswith("+answer") else None
    return compute_directions(
        bridge, [qa.question for qa in forget], [qa.question for qa in reference], settings.direction_rule,
        settings.batch_size, progress, refusal=refusal, parallel=parallel, deepest_layer=deepest_layer,
    )
