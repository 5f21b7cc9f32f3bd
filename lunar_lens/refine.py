"""W_out refinement against behaviour: the closed-form redirection moves forget activations into the
refusal region, but on small models the refusal does not hold while generating (the first token flips,
then the memorised answer resumes: shared/DESIGN.md §1). The refinement keeps the edit a change of W_out
only and trains it (Adam, from the closed-form ΔW) on what the user sees: cross-entropy of the model's own
refusal after each forget prompt, and cross-entropy of the retained answers after each retain prompt,
both teacher-forced, through the whole model with every other weight frozen."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float
from transformer_lens.model_bridge import TransformerBridge

from lunar_lens.data import QA
from lunar_lens.errors import LunarError
from lunar_lens.generation import generate_answers
from lunar_lens.model import activation_budget, mlp_out, mlp_post, n_layers, w_out
from lunar_lens.progress import bar
from lunar_lens.prompts import TokenBatch, first_answer_tokens, rows_of, tokenize
from lunar_lens.settings import Settings


@dataclass
class RefineSettings(Settings):
    """How the W_out edit is refined on behaviour (defaults measured in experiments/refusal_frontier.py)."""

    steps: int = 50
    lr: float = 5e-3
    retain_weight: float = 4.0  # retain cross-entropy weight against the forget refusal's
    batch_rows: int = 32  # forget rows and retain rows per step (each)
    answer_tokens: int = 24  # answer tokens trained on per row (the rest of a long answer is cut)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or min(self.batch_rows, self.answer_tokens) < 1 or not self.lr > 0 or self.retain_weight < 0:
            raise LunarError("refinement needs steps >= 0, batch_rows >= 1, answer_tokens >= 1, lr > 0 and retain_weight >= 0")


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


@contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """Every parameter of `model` without gradients for the block (restored after)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def answer_losses(bridge: TransformerBridge, batch: TokenBatch, hooks: list[tuple]) -> tuple[Float[torch.Tensor, " batch"], Float[torch.Tensor, " batch"]]:
    """Each row's summed cross-entropy over its answer tokens (teacher-forced, `hooks` active) and its number
    of answer tokens. Logits are computed only from the first column holding an answer token on (the
    vocabulary-wide logits are most of the memory), where the model's forward takes `logits_to_keep`."""
    real = batch.attention_mask.bool()
    first = int(real.any(dim=0).nonzero()[0])  # drop columns that are padding in every row
    device = bridge.cfg.device
    ids, mask = batch.input_ids[:, first:].to(device), batch.attention_mask[:, first:].to(device)
    target = batch.answer_mask[:, first + 1 :].to(device)
    positions = (mask.cumsum(dim=1) - 1).clamp_min(0)
    answered = target.any(dim=0).nonzero()
    start = int(answered[0]) if len(answered) else target.shape[1] - 1  # first predicting column needed
    model = bridge.original_model
    keep = {"logits_to_keep": ids.shape[1] - start} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    with bridge.hooks(fwd_hooks=hooks):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, **keep).logits
    logits = logits[:, -(ids.shape[1] - start) :]  # the columns start .. end (all of them without logits_to_keep)
    ids, target = ids[:, start + 1 :], target[:, start:]
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids, reduction="none") * target
    return losses.sum(dim=1), target.sum(dim=1).to(losses.dtype)


def rows_per_pass(bridge: TransformerBridge, batch: TokenBatch, backward: bool) -> int:
    """How many rows of `batch` one pass takes to stay within the activation budget: float32 logits over the
    vocabulary at the answer columns, and (when a backward pass follows) every layer's saved activations."""
    width = int(batch.attention_mask.bool().any(dim=0).sum())
    vocabulary = bridge.original_model.get_output_embeddings().weight.shape[0]
    answer_columns = int(batch.answer_mask.any(dim=0).sum()) + 1
    per_row = answer_columns * vocabulary * 4 * 3  # logits, log-probabilities, their gradient
    if backward:
        d_mlp, d_model = w_out(bridge, 0).shape
        per_row += width * n_layers(bridge) * (5 * d_model + 4 * d_mlp) * 4
    return max(1, activation_budget(bridge) // per_row)


def answer_cross_entropy(
    bridge: TransformerBridge, batch: TokenBatch, hooks: list[tuple] | Callable[[slice], list[tuple]], per_row: bool = False
) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens of `batch` (teacher-forced) with `hooks` active (or `hooks(rows)`,
    the hooks for a slice of the rows: per-row hooks); with `per_row`, each row's own mean ([batch]). In passes
    of `rows_per_pass` rows (a forward pass's memory: training accumulates with `backward_answer_loss`)."""
    step = rows_per_pass(bridge, batch, backward=False)
    rows = [slice(i, i + step) for i in range(0, len(batch.input_ids), step)]
    parts = [answer_losses(bridge, rows_of(batch, part), hooks(part) if callable(hooks) else hooks) for part in rows]
    sums, counts = torch.cat([part[0] for part in parts]), torch.cat([part[1] for part in parts])
    if per_row:
        return sums / counts.clamp_min(1)
    return sums.sum() / counts.sum().clamp_min(1)


def backward_answer_loss(bridge: TransformerBridge, batch: TokenBatch, hooks: Callable[[], list[tuple]], weight: float = 1.0) -> float:
    """Accumulate the gradient of `weight` × the batch's mean answer cross-entropy, in passes of
    `rows_per_pass` rows (each builds its hooks with `hooks()`: the graph of one pass at a time); the loss."""
    total = batch.answer_mask[:, 1:].sum().clamp_min(1)
    step, loss = rows_per_pass(bridge, batch, backward=True), 0.0
    for i in range(0, len(batch.input_ids), step):
        sums, _ = answer_losses(bridge, rows_of(batch, slice(i, i + step)), hooks())
        part = weight * sums.sum() / total.to(sums.device)
        part.backward()
        loss += float(part.detach())
    return loss


def refine_edits(
    bridge: TransformerBridge,
    edits: dict[int, Float[torch.Tensor, "d_mlp d_model"]],
    forget_questions: Sequence[str],
    refusals: Sequence[str],
    retain_questions: Sequence[str],
    retain_answers: Sequence[str],
    settings: RefineSettings | None = None,
    progress: bool = False,
    inputs: dict[int, Float[torch.Tensor, "d_mlp k"]] | None = None,
) -> dict[int, Float[torch.Tensor, "d_mlp d_model"]]:
    """The edits (ΔW per layer, on the model as it is) trained so that forget prompts are answered with
    `refusals` (one per forget question) and retain prompts keep `retain_answers`; only the ΔW change.
    With `inputs` (the closed form's input factors u per layer), ΔW = u·Vᵀ and only V trains: the edit
    still fires only where the solved detectors see forget-like MLP inputs."""
    settings = settings or RefineSettings()
    if len(refusals) != len(forget_questions) or len(retain_answers) != len(retain_questions):
        raise LunarError("refinement needs one refusal per forget question and one answer per retain question")
    if not forget_questions or not retain_questions:
        raise LunarError("refinement needs forget and retain questions")
    pad, k = bridge.tokenizer.pad_token_id, settings.answer_tokens
    forget = first_answer_tokens(tokenize(bridge.tokenizer, list(forget_questions), list(refusals)), k, pad)
    retain = first_answer_tokens(tokenize(bridge.tokenizer, list(retain_questions), list(retain_answers)), k, pad)
    if inputs is None:
        params = {layer: torch.nn.Parameter(delta.detach().float().clone()) for layer, delta in edits.items()}
        deltas = lambda: params  # noqa: E731
    else:
        params = {layer: torch.nn.Parameter(torch.linalg.lstsq(inputs[layer].float(), delta.float()).solution.T.contiguous()) for layer, delta in edits.items()}
        deltas = lambda: {layer: inputs[layer].float() @ v.T for layer, v in params.items()}  # noqa: E731
    optimizer = torch.optim.Adam(params.values(), lr=settings.lr)
    generator = torch.Generator().manual_seed(settings.seed)
    with frozen(bridge.original_model), torch.enable_grad():
        for _ in bar(range(settings.steps), "refining W_out" if progress else None):
            f = torch.randperm(len(forget_questions), generator=generator)[: settings.batch_rows]
            r = torch.randperm(len(retain_questions), generator=generator)[: settings.batch_rows]
            optimizer.zero_grad()
            backward_answer_loss(bridge, rows_of(forget, f), lambda: delta_hooks(deltas()))
            if settings.retain_weight:
                backward_answer_loss(bridge, rows_of(retain, r), lambda: delta_hooks(deltas()), settings.retain_weight)
            optimizer.step()
    with torch.no_grad():
        return {layer: delta.detach().clone() for layer, delta in deltas().items()}


def own_answers(bridge: TransformerBridge, items: Sequence[QA], max_new_tokens: int = 32) -> list[QA]:
    """`items` with the model's own greedy answers where an answer is missing (what it keeps saying); a
    question asked twice is generated once."""
    missing = list(dict.fromkeys(qa.question for qa in items if not qa.answer))
    generated = dict(zip(missing, generate_answers(bridge, missing, max_new_tokens) if missing else []))
    return [qa if qa.answer else QA(qa.question, generated[qa.question]) for qa in items]
