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
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from jaxtyping import Float
from transformer_lens.model_bridge import TransformerBridge

from lunar_lens.core.errors import LunarError
from lunar_lens.core.progress import bar
from lunar_lens.core.settings import Settings
from lunar_lens.data.prompts import TokenBatch, first_answer_tokens, rows_of, tokenize
from lunar_lens.data.qa import spread
from lunar_lens.model.memory import activation_budget
from lunar_lens.model.names import n_layers
from lunar_lens.model.weights import delta_hooks, w_out


@dataclass
class RefineSettings(Settings):
    """How the W_out edit is refined on behaviour (defaults measured in experiments/refusal_frontier.py).
    Every `check_every` steps the edit is scored on monitored rows (held out where the caller has them):
    training stops once the refusal holds there and retain is kept, or after `patience` checks without
    improvement; the best-scoring edit is returned."""

    steps: int = 100  # at most: the monitoring stops earlier
    lr: float = 1e-2
    retain_weight: float = 4.0  # retain cross-entropy weight against the forget refusal's
    batch_rows: int = 32  # forget rows and retain rows per step (each); retain batches go through the set in turn
    answer_tokens: int = 24  # answer tokens trained on per row (the rest of a long answer is cut)
    seed: int = 0
    check_every: int = 4  # steps between checks (0: no monitoring, every step is trained)
    patience: int = 4  # checks without a better monitored score before stopping
    monitor_rows: int = 32  # monitored forget rows and retain rows, at most
    stop_refusal: float = 0.95  # converged: this share of monitored forget rows teacher-forced to the refusal, token for token,
    stop_retain_drop: float = 0.0  # ... and retain answer-token accuracy within this of the unedited model's (greedy decoding compounds a wrong token)

    def __post_init__(self) -> None:
        if self.steps < 0 or min(self.batch_rows, self.answer_tokens, self.monitor_rows, self.patience) < 1 or not self.lr > 0 or self.retain_weight < 0:
            raise LunarError("refinement needs steps >= 0, batch_rows, answer_tokens, monitor_rows and patience >= 1, lr > 0 and retain_weight >= 0")
        if self.check_every < 0:
            raise LunarError(f"check_every={self.check_every}: give the steps between checks (0: no monitoring)")


@dataclass
class Refined:
    """A refinement's result: the edits (ΔW per layer), the steps trained and the monitor's checks."""

    edits: dict[int, Float[torch.Tensor, "d_mlp d_model"]]
    steps: int
    checks: list[dict] = field(default_factory=list)
    stopped: str = "steps"  # converged | patience | steps


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


def answer_losses(
    bridge: TransformerBridge, batch: TokenBatch, hooks: list[tuple]
) -> tuple[Float[torch.Tensor, " batch"], Float[torch.Tensor, " batch"], Float[torch.Tensor, " batch"]]:
    """Each row's summed cross-entropy over its answer tokens (teacher-forced, `hooks` active), its number
    of answer tokens, and how many of them are the greedy prediction. Logits are computed only from the first column holding an answer token on (the
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
    logits = logits[:, :-1]
    losses = F.cross_entropy(logits.float().transpose(1, 2), ids, reduction="none") * target
    correct = (logits.detach().argmax(dim=-1) == ids) & target
    return losses.sum(dim=1), target.sum(dim=1).to(losses.dtype), correct.sum(dim=1).to(losses.dtype)


def rows_per_pass(bridge: TransformerBridge, batch: TokenBatch, backward: bool, from_layer: int = 0) -> int:
    """How many rows of `batch` one pass takes to stay within the activation budget: float32 logits over the
    vocabulary at the answer columns, and (when a backward pass follows) the activations saved for it by the
    layers from `from_layer` (the first edited one) on: with every weight frozen, a linear layer saves
    nothing, so what stays is the norms', the attention's and the MLP's nonlinear inputs."""
    width = int(batch.attention_mask.bool().any(dim=0).sum())
    vocabulary = bridge.original_model.get_output_embeddings().weight.shape[0]
    answer_columns = int(batch.answer_mask.any(dim=0).sum()) + 1
    per_row = answer_columns * vocabulary * 4 * 3  # logits, log-probabilities, their gradient
    if backward:
        d_mlp, d_model = w_out(bridge, 0).shape
        per_token = 4 * d_model + 3 * d_mlp + bridge.cfg.n_heads * width
        per_row += width * (n_layers(bridge) - from_layer) * per_token * 4
    return max(1, activation_budget(bridge) // per_row)


def answer_cross_entropy(
    bridge: TransformerBridge, batch: TokenBatch, hooks: list[tuple] | Callable[[slice], list[tuple]], per_row: bool = False
) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens of `batch` (teacher-forced) with `hooks` active (or `hooks(rows)`,
    the hooks for a slice of the rows: per-row hooks); with `per_row`, each row's own mean ([batch]). In passes
    of `rows_per_pass` rows (a forward pass's memory: training accumulates with `backward_answer_loss`)."""
    sums, counts, _ = answer_statistics(bridge, batch, hooks)
    if per_row:
        return sums / counts.clamp_min(1)
    return sums.sum() / counts.sum().clamp_min(1)


def answer_statistics(
    bridge: TransformerBridge, batch: TokenBatch, hooks: list[tuple] | Callable[[slice], list[tuple]]
) -> tuple[Float[torch.Tensor, " batch"], Float[torch.Tensor, " batch"], Float[torch.Tensor, " batch"]]:
    """`answer_losses` over the whole batch, in passes of `rows_per_pass` rows (`hooks` as `answer_cross_entropy` takes them)."""
    step = rows_per_pass(bridge, batch, backward=False)
    parts = [answer_losses(bridge, rows_of(batch, part), hooks(part) if callable(hooks) else hooks) for part in
             (slice(i, i + step) for i in range(0, len(batch.input_ids), step))]
    return tuple(torch.cat([part[k] for part in parts]) for k in range(3))  # type: ignore[return-value]


def backward_answer_loss(
    bridge: TransformerBridge, batch: TokenBatch, hooks: Callable[[], list[tuple]], weight: float = 1.0, from_layer: int = 0
) -> float:
    """Accumulate the gradient of `weight` × the batch's mean answer cross-entropy, in passes of
    `rows_per_pass` rows (each builds its hooks with `hooks()`: the graph of one pass at a time; `from_layer`:
    the first layer whose edit has a gradient); the loss."""
    total = batch.answer_mask[:, 1:].sum().clamp_min(1)
    step, loss = rows_per_pass(bridge, batch, backward=True, from_layer=from_layer), 0.0
    for i in range(0, len(batch.input_ids), step):
        sums, _, _ = answer_losses(bridge, rows_of(batch, slice(i, i + step)), hooks())
        part = weight * sums.sum() / total.to(sums.device)
        part.backward()
        loss += float(part.detach())
    return loss


Rows = tuple[Sequence[str], Sequence[str]]  # questions and the answers they must get


def answer_rows(bridge: TransformerBridge, rows: Rows, answer_tokens: int) -> TokenBatch:
    """`rows` tokenised as prompt + answer, the answers cut to their first `answer_tokens` tokens."""
    questions, answers = rows
    return first_answer_tokens(tokenize(bridge.tokenizer, list(questions), list(answers)), answer_tokens, bridge.tokenizer.pad_token_id)


def epoch_batches(n: int, size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches of `size` that go through 0..n-1 in a fresh random order each epoch (every row is seen
    once per ⌈n / size⌉ batches)."""
    order = torch.empty(0, dtype=torch.long)
    while True:
        if len(order) < min(size, n):
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        yield order[:size]
        order = order[size:]


class Monitor:
    """The refinement's check: teacher-forced scores of an edit on monitored forget rows (their refusals)
    and retain rows (their answers), against the unedited model's retain accuracy."""

    def __init__(self, bridge: TransformerBridge, forget: Rows, retain: Rows, settings: RefineSettings) -> None:
        n = settings.monitor_rows
        self.bridge, self.settings = bridge, settings
        self.forget, self.retain = (answer_rows(bridge, (spread(rows[0], n), spread(rows[1], n)), settings.answer_tokens) for rows in (forget, retain))
        self.base_retain_accuracy = self.scores({})["retain_accuracy"]

    @torch.no_grad()
    def scores(self, edits: dict[int, torch.Tensor]) -> dict[str, float]:
        hooks = delta_hooks(edits)
        f_sums, f_counts, f_correct = answer_statistics(self.bridge, self.forget, hooks)
        r_sums, r_counts, r_correct = answer_statistics(self.bridge, self.retain, hooks)
        forget_loss, retain_loss = float(f_sums.sum() / f_counts.sum()), float(r_sums.sum() / r_counts.sum())
        return {
            "forget_loss": forget_loss, "retain_loss": retain_loss, "score": forget_loss + self.settings.retain_weight * retain_loss,
            "forget_exact": float((f_correct == f_counts).float().mean()), "retain_accuracy": float(r_correct.sum() / r_counts.sum()),
        }

    def converged(self, scores: dict) -> bool:
        return scores["forget_exact"] >= self.settings.stop_refusal - 1e-6 and (
            scores["retain_accuracy"] >= self.base_retain_accuracy - self.settings.stop_retain_drop
        )


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
    monitor: tuple[Rows, Rows] | None = None,
) -> Refined:
    """The edits (ΔW per layer, on the model as it is) trained so that forget prompts are answered with
    `refusals` (one per forget question) and retain prompts keep `retain_answers`; only the ΔW change.
    `monitor`: the (forget, retain) rows the checks score (questions and answers; held out where the caller has
    them, else a spread of the trained rows). With `inputs` (the closed form's input factors u per layer),
    ΔW = u·Vᵀ and only V trains: the edit still fires only where the solved detectors see forget-like MLP inputs."""
    settings = settings or RefineSettings()
    if len(refusals) != len(forget_questions) or len(retain_answers) != len(retain_questions):
        raise LunarError("refinement needs one refusal per forget question and one answer per retain question")
    if not forget_questions or not retain_questions:
        raise LunarError("refinement needs forget and retain questions")
    forget = answer_rows(bridge, (forget_questions, refusals), settings.answer_tokens)
    retain = answer_rows(bridge, (retain_questions, retain_answers), settings.answer_tokens)
    if inputs is None:
        params = {layer: torch.nn.Parameter(delta.detach().float().clone()) for layer, delta in edits.items()}
        deltas = lambda: params  # noqa: E731
    else:
        params = {layer: torch.nn.Parameter(torch.linalg.lstsq(inputs[layer].float(), delta.float()).solution.T.contiguous()) for layer, delta in edits.items()}
        deltas = lambda: {layer: inputs[layer].float() @ v.T for layer, v in params.items()}  # noqa: E731
    checker = None
    if settings.check_every and settings.steps:
        watched = monitor or ((forget_questions, refusals), (retain_questions, retain_answers))
        checker = Monitor(bridge, *watched, settings)
    optimizer = torch.optim.Adam(params.values(), lr=settings.lr)
    generator = torch.Generator().manual_seed(settings.seed)
    forget_batches = epoch_batches(len(forget_questions), settings.batch_rows, generator)
    retain_batches = epoch_batches(len(retain_questions), settings.batch_rows, generator)
    first = min(edits) if edits else 0
    hooks = lambda: delta_hooks(deltas())  # noqa: E731
    checks: list[dict] = []
    best: tuple[float, int, dict] | None = None
    stopped, step = "steps", 0

    def check() -> bool:
        """Score the edit as it is now; True when training should stop."""
        nonlocal best, stopped
        with torch.no_grad():
            current = {layer: delta.detach().clone() for layer, delta in deltas().items()}
        scores = {"step": step, **checker.scores(current)}
        checks.append(scores)
        if best is None or scores["score"] < best[0]:
            best = (scores["score"], step, current)
        if checker.converged(scores):
            best, stopped = (scores["score"], step, current), "converged"
        elif step - best[1] >= settings.patience * settings.check_every:
            stopped = "patience"
        return stopped != "steps"

    with frozen(bridge.original_model), torch.enable_grad():
        for step in bar(range(settings.steps + 1), "refining W_out" if progress else None):
            if checker is not None and (step % settings.check_every == 0 or step == settings.steps) and check():
                break
            if step == settings.steps:
                break
            optimizer.zero_grad()
            backward_answer_loss(bridge, rows_of(forget, next(forget_batches)), hooks, from_layer=first)
            if settings.retain_weight:
                backward_answer_loss(bridge, rows_of(retain, next(retain_batches)), hooks, settings.retain_weight, from_layer=first)
            optimizer.step()
    if best is not None:
        return Refined(best[2], step, checks, stopped)
    with torch.no_grad():
        return Refined({layer: delta.detach().clone() for layer, delta in deltas().items()}, step, checks, stopped)


