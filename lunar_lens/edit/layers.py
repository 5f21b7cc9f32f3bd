"""The LUNAR edit: redirect forget-set MLP outputs of chosen layers along the unanswerability
direction by changing only W_out, keeping retain-set outputs where they are."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from lunar_lens.core.distributed import SINGLE, DataParallel
from lunar_lens.core.errors import LunarError
from lunar_lens.core.settings import Settings
from lunar_lens.data.qa import QA
from lunar_lens.directions.activations import POSITION_RULES, capture, shared_prefix_length, shift_index, token_batches
from lunar_lens.directions.mean_difference import Directions, directions_for
from lunar_lens.directions.refusals import refusal_target
from lunar_lens.edit.refine import RefineSettings, refine_edits
from lunar_lens.edit.solvers import SOLVERS, EditStatistics, Solution, solve_closed, sum_statistics
from lunar_lens.model.generation import own_answers
from lunar_lens.model.memory import memory_budget
from lunar_lens.model.names import check_layer, mlp_post
from lunar_lens.model.weights import add_to_w_out, added, w_out, w_out_tensor_name

EDIT_NORM_WARNING = 1e3  # an edit this many times its W_out's norm (useful ones: 5–100× on the toy world) breaks the model


# the float64 Gram matrices collected in one pass (several layers' when they fit): a quarter of the weights'
# bytes, within these bounds (one layer's at least)
STATISTICS_SHARE, STATISTICS_BYTES = 0.25, (64 * 2**20, 512 * 2**20)


def check_coeff(coeff: float | None) -> float:
    """The redirection coefficient c, refused unless it is a finite number ≥ 0 (0: no redirection, the
    refinement alone trains W_out on behaviour)."""
    if isinstance(coeff, bool) or not isinstance(coeff, (int, float)) or not math.isfinite(coeff) or coeff < 0:
        raise LunarError(f"{{coeff}} {coeff} is not a finite number ≥ 0: give the redirection coefficient c, e.g. 4", ("coeff",))
    return float(coeff)


@dataclass
class EditSettings(Settings):
    """How the edit is made. Defaults are the measured ones (experiments/choose_defaults.py). `coeff` is the
    redirection coefficient c; None: `unlearn` chooses it (`lunar_lens.choose.choice`), and the report records the c used."""

    coeff: float | None = None
    positions: str = "last+answer"
    solver: str = "closed"
    ridge: float = 1e-4
    lora_rank: int = 4
    direction_rule: str = "last"
    retain_answers: bool = True  # teacher-forced retain answers are kept too, not only their prompts
    refusal: str | None = None  # the response redirected forget prompts should give; default: from the reference set
    batch_size: int = 32
    seed: int = 0
    # packaged general-knowledge questions kept with the model's own answers (knowledge nobody listed:
    # lunar_lens.choose.unlisted), added to any keep set; 0: none
    unlisted: int = 100
    # after the solve, W_out is trained on behaviour (the refusal on forget prompts, the answers on retain
    # ones: lunar_lens.edit.refine); steps = 0 keeps the solver's edit as it is
    refine: RefineSettings = field(default_factory=RefineSettings)

    def __post_init__(self) -> None:
        if self.positions not in POSITION_RULES:
            raise LunarError(f"unknown {{positions}} {self.positions!r}: use one of {', '.join(POSITION_RULES)}", ("positions",))
        if self.solver not in SOLVERS:
            raise LunarError(f"unknown {{solver}} {self.solver!r}: use one of {', '.join(SOLVERS)}", ("solver",))
        if isinstance(self.unlisted, bool) or not isinstance(self.unlisted, int) or self.unlisted < 0:
            raise LunarError(f"{{unlisted}} {self.unlisted} is not a whole number ≥ 0: the general-knowledge questions kept, e.g. 100 (0: none)", ("unlisted",))
        for name in ("batch_size", "lora_rank"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise LunarError(f"{{{name}}} {getattr(self, name)} is not a whole number ≥ 1: e.g. 32", (name,))
        if not math.isfinite(self.ridge) or self.ridge < 0:
            raise LunarError(f"{{ridge}} {self.ridge} is not a finite number ≥ 0: e.g. 1e-4", ("ridge",))
        if self.coeff is not None:
            check_coeff(self.coeff)
            if self.coeff == 0 and not self.refine.steps:
                raise LunarError("{coeff} 0 with no refinement steps changes nothing: give c > 0, or refinement steps (behaviour only)", ("coeff",))


@dataclass
class WOutEdit:
    """One edit of W_out. `delta` is in TransformerLens orientation, float32; when the solver gives
    factors, `delta == u @ v.T` and the patch stores only the factors."""

    layer: int
    tensor_name: str  # the HF parameter name, e.g. model.layers.3.mlp.down_proj.weight
    delta: Float[Tensor, "d_mlp d_model"]
    u: Float[Tensor, "d_mlp k"] | None = None
    v: Float[Tensor, "d_model k"] | None = None


@dataclass
class LayerReport:
    layer: int
    tensor_name: str
    coeff: float
    direction_norm: float
    objective_before: float | None  # None: the edit was not solved here (e.g. chosen and refined by lunar_lens.choose.choice)
    objective_after: float | None
    rows: int
    shifted_rows: int
    seconds_collect: float
    seconds_solve: float


@dataclass
class EditResult:
    edits: list[WOutEdit]
    directions: Directions
    layers: list[LayerReport] = field(default_factory=list)
    seconds_refine: float = 0.0
    refine_steps: int = 0  # steps the refinement trained (its monitor may stop it before the settings' steps)
    refine_stopped: str | None = None  # converged | patience | steps
    refusal: str | None = None  # what forget prompts were redirected towards

    def report(self) -> dict:
        return {
            "layers": [asdict(layer) for layer in self.layers], "directions": self.directions.summary(), "seconds_refine": self.seconds_refine,
            "refine_steps": self.refine_steps, "refine_stopped": self.refine_stopped, "refusal": self.refusal,
        }


def collect_statistics(
    bridge: TransformerBridge,
    layers: Sequence[int],
    forget: Sequence[QA],
    keep: Sequence[QA],
    settings: EditSettings,
    refusal: str,
    n_shifts: int = 1,
    keep_rows: bool = False,
    progress: bool = False,
    parallel: DataParallel = SINGLE,
) -> list[EditStatistics]:
    """Stream the edit's statistics at each of `layers` (of the model as it is: one set per layer, from
    the same passes): one batched pass over forget prompts (+ the refusal, teacher-forced, for `+answer`
    rules) and one over kept prompts (+ their answers), truncated after the deepest layer. With
    `parallel`, each rank runs its shard of both sets and the statistics are summed over ranks."""
    stats = [EditStatistics.empty(w_out(bridge, layer).shape[0], n_shifts, keep_rows=keep_rows) for layer in layers]
    names = [mlp_post(layer) for layer in layers]
    stop = max(layers) + 1
    forget_questions = [qa.question for qa in forget]
    mine = parallel.shard(forget)
    forget_answers = [refusal] * len(mine) if settings.positions.endswith("+answer") else None
    prefix = 0
    if settings.positions.startswith("suffix"):
        prefix = shared_prefix_length(list(token_batches(bridge.tokenizer, forget_questions, batch_size=settings.batch_size)))
    where = f"layer{'s' * (len(layers) > 1)} {', '.join(map(str, layers))}"
    desc = f"{where}: forget" if progress else None
    for batch in token_batches(bridge.tokenizer, [qa.question for qa in mine], forget_answers, settings.batch_size, desc, by_length=True):
        cache = capture(bridge, batch, names, stop_at_layer=stop)
        real = batch.attention_mask.bool()
        shift_ids = shift_index(batch, settings.positions, prefix, n_answer=n_shifts - 1)[real]
        for layer_stats, name in zip(stats, names):
            layer_stats.add(cache[name].cpu()[real], shift_ids)
    mine = parallel.shard(keep)
    answered = [qa for qa in mine if settings.retain_answers and qa.answer]
    prompts_only = [qa for qa in mine if not (settings.retain_answers and qa.answer)]
    desc = f"{where}: retain" if progress else None
    for items, answers in ((answered, [qa.answer for qa in answered]), (prompts_only, None)):
        for batch in token_batches(bridge.tokenizer, [qa.question for qa in items], answers, settings.batch_size, desc, by_length=True):
            cache = capture(bridge, batch, names, stop_at_layer=stop)
            real = batch.attention_mask.bool()
            for layer_stats, name in zip(stats, names):
                layer_stats.add(cache[name].cpu()[real], torch.full((int(real.sum()),), -1))
    return [sum_statistics(parallel, layer_stats) for layer_stats in stats]


def unit_solutions(
    bridge: TransformerBridge, layers: Sequence[int], forget: Sequence[QA], retain: Sequence[QA], refusal: str, directions: Directions,
    settings: EditSettings,
) -> Iterator[Solution]:
    """The closed-form edit at c = 1 of each of `layers` alone, on the model as it is, one layer after the other
    (at any c its ΔW is c·ΔW, since u does not depend on c). The statistics of several layers come from the same
    passes, as many layers per pass as keep their float64 Gram matrices within the statistics budget."""
    tables = {layer: directions.shift_table(layer, 1.0) for layer in layers}
    gram_bytes = max(w_out(bridge, layer).shape[0] for layer in layers) ** 2 * 8 if layers else 1
    per_pass = max(1, memory_budget(bridge, STATISTICS_SHARE, STATISTICS_BYTES) // gram_bytes)
    for start in range(0, len(layers), per_pass):
        group = list(layers[start : start + per_pass])
        stats = collect_statistics(bridge, group, forget, retain, settings, refusal, len(tables[group[0]]))
        for layer in group:
            yield solve_closed(stats.pop(0), tables[layer], settings.ridge, consume=True)


def edit_layers(
    bridge: TransformerBridge,
    forget: Sequence[QA],
    retain: Sequence[QA],
    reference: Sequence[QA],
    layers: Sequence[int],
    settings: EditSettings,
    directions: Directions | None = None,
    keep_forgotten: Sequence[QA] = (),
    progress: bool = False,
    parallel: DataParallel = SINGLE,
) -> EditResult:
    """Edit W_out of `layers` (in increasing order) in place, at c = `settings.coeff` (a number here).

    Directions come from the unedited model; each later layer's statistics are collected on the model
    with the earlier edits applied. `keep_forgotten` (questions forgotten by an earlier request) are
    kept where the current model puts them, so a second request does not undo the first. With
    `parallel` (`lunar_lens.core.distributed`), every rank passes the whole sets, runs its shard, and makes
    the same edit.
    """
    check_coeff(settings.coeff)
    if not forget:
        raise LunarError("the forget set is empty: give at least one question to forget")
    if not retain:
        raise LunarError("the retain set is empty: give the questions whose answers must stay")
    layers = sorted({check_layer(bridge, layer) for layer in layers})
    if not layers:
        raise LunarError("no layer to edit: give at least one layer in {layers}", ("layers",))
    refusal = refusal_target(bridge, reference, settings)
    settings = replace(settings, refusal=refusal)
    with_answer = settings.positions.endswith("+answer")
    if directions is None:
        directions = directions_for(bridge, forget, reference, settings, progress, parallel, deepest_layer=layers[-1])
    if with_answer and directions.answer_vectors is None:
        raise LunarError(
            f"{{positions}} {settings.positions} needs per-answer-token directions: compute them with compute_directions(..., refusal=...)", ("positions",)
        )
    result = EditResult([], directions, refusal=refusal)
    # earlier forgotten questions are kept where the model now puts them: answering with the refusal
    keep = list(retain) + [QA(qa.question, qa.answer or refusal) for qa in keep_forgotten]
    originals = {layer: w_out(bridge, layer).detach().clone() for layer in layers} if settings.refine.steps else {}
    # what the refinement keeps: answers given, else what the model says before any edit (not after the solve)
    kept_answers = own_answers(bridge, keep) if settings.refine.steps else []
    for layer in layers:
        shifts = directions.shift_table(layer, settings.coeff) if with_answer else settings.coeff * directions[layer][None]
        started = time.perf_counter()
        solver = SOLVERS[settings.solver]
        stats = collect_statistics(
            bridge, [layer], forget, keep, settings, refusal, len(shifts), keep_rows=solver.needs_rows, progress=progress,
            parallel=parallel,
        )[0]
        collected = time.perf_counter()
        solution = solver.solve(stats, shifts, w_out(bridge, layer), settings.ridge, settings.lora_rank, settings.seed)
        solved = time.perf_counter()
        add_to_w_out(bridge, layer, solution.delta)
        ratio = float(solution.delta.norm() / (w_out(bridge, layer).detach().float().cpu() - solution.delta).norm())
        if not ratio <= EDIT_NORM_WARNING:
            warnings.warn(
                f"the edit of layer {layer} is {ratio:.3g} times the norm of its W_out: c = {settings.coeff:g} is far too large "
                "for this model and will break its other answers; use a smaller c, or let localisation choose it", stacklevel=2,
            )
        tensor = w_out_tensor_name(bridge, layer)
        result.edits.append(WOutEdit(layer, tensor, solution.delta, solution.u, solution.v))
        result.layers.append(
            LayerReport(
                layer, tensor, settings.coeff, float(directions[layer].norm()), solution.objective_before,
                solution.objective_after, stats.n_rows, stats.n_shifted, collected - started, solved - collected,
            )
        )
        del stats  # its d_mlp² Gram matrix is not held through the next layer's passes and the refinement
    if settings.refine.steps:
        refine_in_place(bridge, result, originals, forget, kept_answers, refusal, settings, progress)
    return result


def apply_edits(bridge: TransformerBridge, edits: dict[int, torch.Tensor], directions: Directions, coeff: float, refusal: str) -> EditResult:
    """Add ready-made edits (ΔW per layer, e.g. `choice.Choice.edits`) to W_out, recorded as an EditResult."""
    result = EditResult([], directions, refusal=refusal)
    for layer, delta in sorted(edits.items()):
        add_to_w_out(bridge, layer, delta)
        tensor = w_out_tensor_name(bridge, layer)
        result.edits.append(WOutEdit(layer, tensor, delta.float().cpu()))
        result.layers.append(LayerReport(layer, tensor, coeff, float(directions[layer].norm()), None, None, 0, 0, 0.0, 0.0))
    return result


def refine_in_place(
    bridge: TransformerBridge, result: EditResult, originals: dict[int, torch.Tensor], forget: Sequence[QA], keep: Sequence[QA], refusal: str,
    settings: EditSettings, progress: bool = False,
) -> None:
    """Train the solved edits further on behaviour (`lunar_lens.edit.refine`), keeping `keep`'s answers (every row
    has one): W_out goes back to `originals` (the unedited weights) while the solved ΔW trains through hooks (so the
    monitor compares with the unedited model), then becomes `originals` + the refined ΔW, and `result`'s edits
    hold it (their factors no longer describe them)."""
    started = time.perf_counter()
    with torch.no_grad():
        for edit in result.edits:
            w_out(bridge, edit.layer).copy_(originals[edit.layer])
    refined = refine_edits(
        bridge, {edit.layer: edit.delta for edit in result.edits}, [qa.question for qa in forget], [refusal] * len(forget),
        [qa.question for qa in keep], [qa.answer for qa in keep], settings.refine, progress,
    )
    for edit in result.edits:
        edit.delta, edit.u, edit.v = refined.edits[edit.layer].to(edit.delta), None, None
        with torch.no_grad():  # W0 + the whole ΔW, rounded once: as a patch applies it, bit for bit
            w_out(bridge, edit.layer).copy_(added(originals[edit.layer], [edit.delta]))
    result.seconds_refine = time.perf_counter() - started
    result.refine_steps, result.refine_stopped = refined.steps, refined.stopped
