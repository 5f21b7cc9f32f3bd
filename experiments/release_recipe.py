"""The released LUNAR procedure, re-implemented faithfully on a plain Hugging Face Llama-family model,
for experiments that compare lunar-lens against it (timing, objective, unlearning quality).

Source: facebookresearch/LUNAR (`run_lunar.py`; `src/generate_directions.py`, `src/hook_for_unlearn.py`,
`src/dataset_utils.py`, `src/estimated_net_utils.py`). What it does, for one edited layer l:

1. **Directions** (`generate_candidate_directions`): mean over reference ("harmful"/unverified) prompts minus
   mean over forget prompts of the residual leaving block l at the last prompt token, in float64; batches of
   32 (left padding), full depth, a hook on every block. The release hooks the *input* of block l + 1; the
   output of block l is the same tensor and also exists for the last layer.
2. **Activations** (`get_activations`): six separate passes over the data at batch size 1, each through the
   full model with a single hook — block output, input of `post_attention_layernorm` (resid_mid) and input
   of `mlp.down_proj`, each for the forget set and then for the retain set. The MLP output (the target) is
   block output − resid_mid; forget targets get + c·r at *every* position (`perturb_post_block_activations_forget`).
3. **Training** (`train_multiple_layers`): a copy of down_proj trained with AdamW (lr 1e-2, default weight
   decay), ExponentialLR(0.9) per epoch, 20 epochs, shuffled batches of 64 token rows, MSE loss. This is
   `lunar_lens.solvers.solve_adamw`, fed with the rows gathered here: its target x·W0 + shift equals the
   release's (block output − resid_mid) + shift, which `ReleaseRows.target_error` checks.

Differences, all in the release's favour for timing: float32 instead of bf16 (same on a CPU), and tensor
indexing instead of a `DataLoader` over a `ConcatDataset` (no per-row Python collation).

    from release_recipe import run_release          # with experiments/ on sys.path
    run = run_release(hf_model, tokenizer, layer, forget_questions, retain_questions, reference_questions)
    apply_edit(hf_model, layer, run.solution.delta)  # or lunar_lens.model.add_to_w_out(bridge, layer, delta)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Float
from transformers import BatchEncoding, PreTrainedModel, PreTrainedTokenizerBase

from lunar_lens.core.errors import LunarError
from lunar_lens.data.prompts import add_special_tokens, format_prompt
from lunar_lens.edit.solvers import EditStatistics, Solution, solve_adamw

RELEASE_COEFF = 2.0
DIRECTION_BATCH = 32


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    """`model.model.layers`, each with `post_attention_layernorm` and `mlp.down_proj` (the release's
    Llama/Qwen/Mistral/Gemma layout)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not hasattr(layers[0], "post_attention_layernorm") or not hasattr(layers[0].mlp, "down_proj"):
        raise LunarError(
            f"{type(model).__name__} does not have the Llama layout the released recipe hooks "
            "(model.layers[l].post_attention_layernorm, .mlp.down_proj): use a Llama-family model"
        )
    return layers


def down_proj_w_out(model: PreTrainedModel, layer: int) -> Float[torch.Tensor, "d_mlp d_model"]:
    """W_out of `layer` in TransformerLens orientation (down_proj.weight is [d_model, d_mlp])."""
    return decoder_layers(model)[layer].mlp.down_proj.weight.detach().T


@torch.no_grad()
def apply_edit(model: PreTrainedModel, layer: int, delta: Float[torch.Tensor, "d_mlp d_model"]) -> None:
    """down_proj.weight of `layer` += deltaᵀ, in place (what the release does with the trained copy)."""
    weight = decoder_layers(model)[layer].mlp.down_proj.weight
    weight.add_(delta.T.to(device=weight.device, dtype=weight.dtype))


def release_tokenize(tokenizer: PreTrainedTokenizerBase, questions: Sequence[str]) -> BatchEncoding:
    """`tokenize_instructions_fn`: the prompt template, tokenised and left-padded, nothing else."""
    if tokenizer.padding_side != "left":
        raise LunarError("the released recipe reads the last position as the last prompt token: load the tokenizer "
                         "with lunar_lens.model.load_tokenizer (left padding)")
    texts = [format_prompt(tokenizer, q) for q in questions]
    return tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=add_special_tokens(tokenizer))


def _first(value: torch.Tensor | tuple) -> torch.Tensor:
    return value[0] if isinstance(value, tuple) else value


Hook = tuple[torch.nn.Module, Callable[[torch.Tensor], None], bool]  # module, fn, on its input (else output)


@contextmanager
def hooked(hooks: Sequence[Hook]) -> Iterator[None]:
    """While inside, each hook's `fn` gets its module's first input or its output on every forward
    (`add_hooks`). `fn` must return None: a value returned by a torch hook replaces the activation."""
    handles = []
    try:
        for module, fn, on_input in hooks:
            if on_input:
                handles.append(module.register_forward_pre_hook(lambda _m, args, fn=fn: fn(_first(args))))
            else:
                handles.append(module.register_forward_hook(lambda _m, _args, out, fn=fn: fn(_first(out))))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _forward(model: PreTrainedModel, encoded: BatchEncoding) -> None:
    model(input_ids=encoded.input_ids.to(model.device), attention_mask=encoded.attention_mask.to(model.device))


@torch.no_grad()
def mean_block_outputs(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, questions: Sequence[str], batch_size: int = DIRECTION_BATCH
) -> Float[torch.Tensor, "n_layers d_model"]:
    """`get_mean_activations`: mean of every block's output at the last position, float64."""
    layers = decoder_layers(model)
    mean = torch.zeros(len(layers), model.config.hidden_size, dtype=torch.float64)

    def accumulate(total: torch.Tensor) -> Callable[[torch.Tensor], None]:
        def add(out: torch.Tensor) -> None:
            total.add_(out[:, -1].double().sum(0).cpu() / len(questions))
        return add

    with hooked([(layer, accumulate(mean[i]), False) for i, layer in enumerate(layers)]):
        for start in range(0, len(questions), batch_size):
            _forward(model, release_tokenize(tokenizer, questions[start : start + batch_size]))
    return mean


def release_directions(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, forget: Sequence[str], reference: Sequence[str]
) -> Float[torch.Tensor, "n_layers d_model"]:
    """`generate_directions`: r_l = mean_reference − mean_forget of block l's output, last position."""
    return (mean_block_outputs(model, tokenizer, reference) - mean_block_outputs(model, tokenizer, forget)).float()


@torch.no_grad()
def one_pass(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, questions: Sequence[str], module: torch.nn.Module, on_input: bool
) -> list[Float[torch.Tensor, "1 seq d"]]:
    """One of the release's passes: every prompt alone (batch size 1), the full model, one hook, the
    activation kept per prompt on the model's device (`get_post_block_activation` and its two twins)."""
    kept: list[torch.Tensor] = []
    with hooked([(module, lambda act: kept.append(act.detach().clone()), on_input)]):
        for question in questions:
            _forward(model, release_tokenize(tokenizer, [question]))
    return kept


@dataclass
class ReleaseRows:
    """The release's training rows for one layer (`prepare_trainset_raw`): W_out inputs and MLP outputs
    (block output − resid_mid), unshifted, one row per token."""

    forget_inputs: Float[torch.Tensor, "n_forget d_mlp"]
    forget_outputs: Float[torch.Tensor, "n_forget d_model"]
    retain_inputs: Float[torch.Tensor, "n_retain d_mlp"]
    retain_outputs: Float[torch.Tensor, "n_retain d_model"]

    def target_error(self, w_out: Float[torch.Tensor, "d_mlp d_model"]) -> float:
        """Largest |MLP output − x·W_out| over all rows: ~1e-6 when `solve_adamw`'s targets are the release's."""
        w = w_out.float().to(self.forget_inputs.device)
        return max(float((out - x @ w).abs().max()) for x, out in
                   ((self.forget_inputs, self.forget_outputs), (self.retain_inputs, self.retain_outputs)))

    def statistics(self) -> EditStatistics:
        """The rows as `EditStatistics` on the CPU (forget rows shifted by shift 0, retain rows kept), rows
        retained for `solve_adamw`; the Gram matrix lets lunar-lens's objective score any ΔW on these rows."""
        stats = EditStatistics.empty(self.forget_inputs.shape[1], 1, keep_rows=True)
        stats.add(self.forget_inputs.cpu(), torch.zeros(len(self.forget_inputs), dtype=torch.long))
        stats.add(self.retain_inputs.cpu(), torch.full((len(self.retain_inputs),), -1))
        return stats


def gather_rows(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, layer: int, forget: Sequence[str], retain: Sequence[str]
) -> ReleaseRows:
    """`get_activations` + `prepare_trainset_raw`: the six batch-size-1 passes, then the rows."""
    block = decoder_layers(model)[layer]
    passes = {}
    hooks = (("post", block, False), ("mid", block.post_attention_layernorm, True), ("x", block.mlp.down_proj, True))
    for kind, module, on_input in hooks:
        for name, questions in (("forget", forget), ("retain", retain)):
            passes[kind, name] = torch.cat([act[0] for act in one_pass(model, tokenizer, questions, module, on_input)])
    return ReleaseRows(
        passes["x", "forget"], passes["post", "forget"] - passes["mid", "forget"],
        passes["x", "retain"], passes["post", "retain"] - passes["mid", "retain"],
    )


@dataclass
class ReleaseRun:
    """One release edit: the direction used, the AdamW solution, the rows' statistics and phase timings."""

    direction: Float[torch.Tensor, " d_model"]
    solution: Solution
    statistics: EditStatistics
    seconds: dict[str, float]  # directions, collect (the six passes), solve (20 epochs of AdamW)
    target_error: float


def run_release(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    layer: int,
    forget: Sequence[str],
    retain: Sequence[str],
    reference: Sequence[str],
    coeff: float = RELEASE_COEFF,
    seed: int = 0,
) -> ReleaseRun:
    """The released recipe for one layer, timed per phase; the model is left unchanged (see `apply_edit`).
    Building the statistics (not part of the release) happens between the timed phases."""
    started = time.perf_counter()
    direction = release_directions(model, tokenizer, forget, reference)[layer]
    directed = time.perf_counter()
    rows = gather_rows(model, tokenizer, layer, forget, retain)
    collected = time.perf_counter()
    stats = rows.statistics()
    w_out = down_proj_w_out(model, layer)
    error = rows.target_error(w_out)
    solving = time.perf_counter()
    solution = solve_adamw(stats, coeff * direction[None], w_out, seed=seed)
    solved = time.perf_counter()
    seconds = {"directions": directed - started, "collect": collected - directed, "solve": solved - solving}
    return ReleaseRun(direction, solution, stats, seconds, error)
