"""Solvers for the W_out edit.

Objective (DESIGN.md §1): rows x are W_out inputs (`mlp.hook_post`); a shifted row wants its MLP
output moved by one of J shift vectors t_j (row j of a shift table: c·r_l, and per answer token its
own c·r), every other row wants it unchanged:

    f(ΔW) = Σ_rows ‖x·ΔW − t_row‖² = tr(ΔWᵀ G ΔW) − 2·tr(ΔWᵀ Sᵀ T) + Σ_j n_j‖t_j‖²

with G = Σ x xᵀ over all rows, S[j] = Σ x over rows shifted by t_j and n_j their count. These are sums,
so they are streamed and memory does not grow with the data. The exact minimiser is
ΔW = (G + λI)⁻¹ Sᵀ T: rank one (u·rᵀ) with a single shift vector, rank ≤ J in general.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int

from lunar_lens.core.distributed import DataParallel
from lunar_lens.core.errors import LunarError

CHUNK_BYTES = 16 * 2**20  # float64 work at a time: rows copied for the Gram matrix, ΔW columns in the objective


@dataclass
class EditStatistics:
    """Sufficient statistics of one layer's edit problem (float64), plus the rows themselves when a
    row-based solver (the released AdamW recipe) needs them."""

    gram: Float[torch.Tensor, "d_mlp d_mlp"] | None  # None once a consuming solve used it up
    shifted_sums: Float[torch.Tensor, "n_shifts d_mlp"]
    shifted_counts: Int[torch.Tensor, " n_shifts"]
    n_rows: int = 0
    rows: list[torch.Tensor] | None = None
    shift_ids: list[torch.Tensor] | None = None

    @classmethod
    def empty(cls, d_mlp: int, n_shifts: int = 1, keep_rows: bool = False) -> "EditStatistics":
        return cls(
            torch.zeros(d_mlp, d_mlp, dtype=torch.float64),
            torch.zeros(n_shifts, d_mlp, dtype=torch.float64),
            torch.zeros(n_shifts, dtype=torch.long),
            rows=[] if keep_rows else None,
            shift_ids=[] if keep_rows else None,
        )

    @property
    def n_shifted(self) -> int:
        return int(self.shifted_counts.sum())

    def add(self, x: Float[torch.Tensor, "n d_mlp"], shift_id: Int[torch.Tensor, " n"]) -> None:
        """Add rows; `shift_id[i]` is the shift-table row of row i, or -1 to keep its output."""
        shifted = shift_id >= 0
        for chunk in x.split(_chunk(x.shape[1])):  # a float64 copy of CHUNK_BYTES at a time, summed in place
            chunk64 = chunk.double()
            self.gram.addmm_(chunk64.T, chunk64)
        self.shifted_sums.index_add_(0, shift_id[shifted], x[shifted].double())
        self.shifted_counts += torch.bincount(shift_id[shifted], minlength=len(self.shifted_counts))
        self.n_rows += len(x)
        if self.rows is not None:
            self.rows.append(x.float())
            self.shift_ids.append(shift_id)

    def objective(
        self, delta: Float[torch.Tensor, "d_mlp d_model"] | None, shifts: Float[torch.Tensor, "n_shifts d_model"], quadratic: float | None = None
    ) -> float:
        """Mean squared error per element of the MLP output, from the statistics alone (None: of the unedited
        W_out), ΔW's columns CHUNK_BYTES at a time in float64: no d_mlp × d_model temporaries. `quadratic`:
        tr(ΔWᵀ·G·ΔW) when already known (a consuming solve has used the Gram matrix up)."""
        t = shifts.double()
        value = (self.shifted_counts * (t * t).sum(1)).sum() + (quadratic or 0.0)
        step = 1 if delta is None else _chunk(delta.shape[0])
        for start in range(0, 0 if delta is None else delta.shape[1], step):
            d = delta[:, start : start + step].double()
            value -= 2 * ((self.shifted_sums @ d) * t[:, start : start + step]).sum()
            if quadratic is None:
                value += ((self.gram @ d) * d).sum()
        return float(value.clamp_min(0.0)) / max(self.n_rows * t.shape[1], 1)


def sum_statistics(parallel: DataParallel, stats: EditStatistics) -> EditStatistics:
    """Sum one layer's edit statistics over `parallel`'s ranks; kept rows (AdamW solver) are gathered in rank order."""
    if parallel.size == 1:
        return stats
    for tensor in (stats.gram, stats.shifted_sums, stats.shifted_counts):
        parallel.sum(tensor)
    stats.n_rows = int(parallel.sum(torch.tensor(stats.n_rows)))
    if stats.rows is not None:
        stats.rows = [row for part in parallel.gather(stats.rows) for row in part]
        stats.shift_ids = [ids for part in parallel.gather(stats.shift_ids) for ids in part]
    return stats


def _chunk(width: int) -> int:
    """How many float64 vectors of `width` fit CHUNK_BYTES."""
    return max(1, CHUNK_BYTES // (8 * width))


@dataclass
class Solution:
    delta: Float[torch.Tensor, "d_mlp d_model"]
    u: Float[torch.Tensor, "d_mlp k"] | None
    v: Float[torch.Tensor, "d_model k"] | None
    objective_before: float
    objective_after: float


def _check(stats: EditStatistics) -> None:
    if stats.n_shifted == 0:
        raise LunarError("no forget position was selected for redirection: check the forget set and the {positions} rule", ("positions",))


def solve_closed(stats: EditStatistics, shifts: Float[torch.Tensor, "n_shifts d_model"], ridge: float = 1e-4, consume: bool = False) -> Solution:
    """Exact ridge least squares: ΔW = u·vᵀ with u = (G + λI)⁻¹ Sᵀ, v = T (shift vectors with no row
    dropped), λ = ridge·mean(diag G). One shift vector gives the rank-one edit. `torch.linalg.solve` copies G;
    with `consume` (for statistics used once, as the pipeline's are) G is factorised in its own memory instead
    (Cholesky: no d_mlp² copy) and is gone after (`stats.gram` is None)."""
    _check(stats)
    used = stats.shifted_counts > 0
    lam = ridge * float(stats.gram.diagonal().mean().clamp_min(1e-12))
    v = shifts.float()[used].T
    quadratic = None
    if consume:
        u, factor = _solve_in_place(stats.gram, lam, stats.shifted_sums[used].T)
        u64, vv = u.double(), v.double().T @ v.double()
        spread = factor.mT @ u64  # Lᵀu: tr(ΔWᵀ(G + λI)ΔW) = ‖Lᵀu·vᵀ‖²
        quadratic = float((((spread.T @ spread) - lam * (u64.T @ u64)) * vv).sum())
        stats.gram = None
    else:
        diagonal = stats.gram.diagonal().clone()
        stats.gram.diagonal().add_(lam)  # G + λI in place (no second d_mlp² matrix), restored after
        try:
            u = torch.linalg.solve(stats.gram, stats.shifted_sums[used].T).float()
        finally:
            stats.gram.diagonal().copy_(diagonal)
    delta = u @ v.T  # from the float32 factors, as a patch file rebuilds it: the two agree bit for bit
    return Solution(delta, u, v, stats.objective(None, shifts), stats.objective(delta, shifts, quadratic))


def _solve_in_place(
    gram: Float[torch.Tensor, "d_mlp d_mlp"], lam: float, rhs: Float[torch.Tensor, "d_mlp k"]
) -> tuple[Float[torch.Tensor, "d_mlp k"], Float[torch.Tensor, "d_mlp d_mlp"]]:
    """u = (G + λI)⁻¹·rhs (float32) and the Cholesky factor L (G + λI = L·Lᵀ, lower), written over G: LAPACK
    factorises the column-major view of the symmetric matrix where it lies, and the triangular solves copy nothing."""
    gram.diagonal().add_(lam)
    factor = gram.T
    _, info = torch.linalg.cholesky_ex(factor, out=(factor, torch.empty((), dtype=torch.int32)))
    if int(info):
        raise LunarError(f"the edit's Gram matrix plus the ridge is not positive definite (ridge λ = {lam:.3g}): give a larger {{ridge}}", ("ridge",))
    inner = torch.linalg.solve_triangular(factor, rhs, upper=False)
    return torch.linalg.solve_triangular(factor.mT, inner, upper=True).float(), factor


def solve_adamw(
    stats: EditStatistics,
    shifts: Float[torch.Tensor, "n_shifts d_model"],
    w_out: Float[torch.Tensor, "d_mlp d_model"],
    epochs: int = 20,
    lr: float = 1e-2,
    batch_rows: int = 64,
    gamma: float = 0.9,
    seed: int = 0,
) -> Solution:
    """The released recipe: AdamW (default weight decay) on W itself, ExponentialLR(γ) per epoch,
    shuffled batches of `batch_rows` token rows, loss MSE(x·W, x·W0 + t)."""
    _check(stats)
    if stats.rows is None:
        raise LunarError("the AdamW solver needs the activation rows: collect statistics with keep_rows=True")
    x = torch.cat(stats.rows)
    ids = torch.cat(stats.shift_ids)
    table = torch.cat([shifts.float(), torch.zeros(1, shifts.shape[1])])  # id -1 → the zero row
    target_shift = table[ids]
    w0 = w_out.detach().float().cpu()
    target = x @ w0 + target_shift
    weight = torch.nn.Parameter(w0.clone())
    optimizer = torch.optim.AdamW([weight], lr=lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=generator).split(batch_rows):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(x[idx] @ weight, target[idx])
            loss.backward()
            optimizer.step()
        scheduler.step()
    delta = (weight.detach() - w0).float()
    return Solution(delta, None, None, stats.objective(None, shifts), stats.objective(delta, shifts))


def solve_lora(
    stats: EditStatistics,
    shifts: Float[torch.Tensor, "n_shifts d_model"],
    rank: int = 4,
    steps: int = 500,
    lr: float = 1e-2,
    seed: int = 0,
) -> Solution:
    """A rank-k (LoRA-style) ΔW = A·Bᵀ trained with Adam on the exact objective, evaluated from the
    statistics (no rows kept). B starts at zero, as in LoRA, so ΔW starts at zero."""
    _check(stats)
    d_mlp, d_model = len(stats.gram), shifts.shape[1]
    generator = torch.Generator().manual_seed(seed)
    a = torch.nn.Parameter(torch.randn(d_mlp, rank, generator=generator, dtype=torch.float64) / d_mlp**0.5)
    b = torch.nn.Parameter(torch.zeros(d_model, rank, dtype=torch.float64))
    gram = stats.gram / stats.n_rows
    cross = stats.shifted_sums.T @ shifts.double() / stats.n_rows  # Sᵀ T: [d_mlp, d_model]
    optimizer = torch.optim.Adam([a, b], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        delta = a @ b.T
        loss = ((gram @ delta) * delta).sum() - 2 * (delta * cross).sum()
        loss.backward()
        optimizer.step()
    u, v = a.detach().float(), b.detach().float()
    delta = u @ v.T
    return Solution(delta, u, v, stats.objective(None, shifts), stats.objective(delta, shifts))


@dataclass(frozen=True)
class Solver:
    """A registered solver: `solve(stats, shifts, w_out, ridge, rank, seed)`, and whether it needs the
    activation rows themselves (`EditStatistics.rows`), not only their sums."""

    solve: Callable[..., Solution]
    needs_rows: bool = False


# the solvers by name (`EditSettings.solver`, `--solver`)
SOLVERS: dict[str, Solver] = {
    "closed": Solver(lambda stats, shifts, w_out, ridge, rank, seed: solve_closed(stats, shifts, ridge, consume=True)),
    "adamw": Solver(lambda stats, shifts, w_out, ridge, rank, seed: solve_adamw(stats, shifts, w_out, seed=seed), needs_rows=True),
    "lora": Solver(lambda stats, shifts, w_out, ridge, rank, seed: solve_lora(stats, shifts, rank, seed=seed)),
}
