"""Solvers for the W_out edit.

Objective (DESIGN.md §1): rows x are W_out inputs (`mlp.hook_post`); shifted rows want their MLP
output moved by t = c·r, every other row wants it unchanged:

    f(ΔW) = Σ_rows ‖x·ΔW − t_row‖² = tr(ΔWᵀ G ΔW) − 2c·sᵀΔW r + n_shifted·c²‖r‖²

with G = Σ x xᵀ over all rows and s = Σ x over shifted rows. Both are sums, so they are streamed and
memory does not grow with the data. The exact minimiser is the rank-one ΔW = u·rᵀ, u = c·(G + λI)⁻¹ s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float

from lunar_lens.errors import LunarError

SOLVERS = ("closed", "adamw", "lora")


@dataclass
class EditStatistics:
    """Sufficient statistics of one layer's edit problem (float64), plus the rows themselves when a
    row-based solver (the released AdamW recipe) needs them."""

    gram: Float[torch.Tensor, "d_mlp d_mlp"]
    shifted_sum: Float[torch.Tensor, "d_mlp"]
    n_shifted: int = 0
    n_rows: int = 0
    rows: list[torch.Tensor] | None = None
    shifted_flags: list[torch.Tensor] | None = None

    @classmethod
    def empty(cls, d_mlp: int, keep_rows: bool = False) -> "EditStatistics":
        return cls(
            torch.zeros(d_mlp, d_mlp, dtype=torch.float64),
            torch.zeros(d_mlp, dtype=torch.float64),
            rows=[] if keep_rows else None,
            shifted_flags=[] if keep_rows else None,
        )

    def add(self, x: Float[torch.Tensor, "n d_mlp"], shifted: Bool[torch.Tensor, "n"]) -> None:
        x64 = x.double()
        self.gram += x64.T @ x64
        self.shifted_sum += x64[shifted].sum(dim=0)
        self.n_rows += len(x)
        self.n_shifted += int(shifted.sum())
        if self.rows is not None:
            self.rows.append(x.float())
            self.shifted_flags.append(shifted)

    def objective(self, delta: Float[torch.Tensor, "d_mlp d_model"], shift: Float[torch.Tensor, "d_model"]) -> float:
        """Mean squared error per element of the MLP output, from the statistics alone."""
        d, r = delta.double(), shift.double()
        value = ((self.gram @ d) * d).sum() - 2 * self.shifted_sum @ d @ r + self.n_shifted * (r @ r)
        return float(value.clamp_min(0.0)) / max(self.n_rows * len(r), 1)


@dataclass
class Solution:
    delta: Float[torch.Tensor, "d_mlp d_model"]
    u: Float[torch.Tensor, "d_mlp k"] | None
    v: Float[torch.Tensor, "d_model k"] | None
    objective_before: float
    objective_after: float


def _check(stats: EditStatistics) -> None:
    if stats.n_shifted == 0:
        raise LunarError("no forget position was selected for redirection: check the forget set and the --positions rule")


def solve_closed(stats: EditStatistics, shift: Float[torch.Tensor, "d_model"], ridge: float = 1e-4) -> Solution:
    """Exact ridge least squares: ΔW = u·shiftᵀ with u = (G + λI)⁻¹ s, λ = ridge·mean(diag G)."""
    _check(stats)
    lam = ridge * float(stats.gram.diagonal().mean().clamp_min(1e-12))
    eye = torch.eye(len(stats.gram), dtype=torch.float64)
    u = torch.linalg.solve(stats.gram + lam * eye, stats.shifted_sum).unsqueeze(1)
    v = shift.double().unsqueeze(1)
    delta = (u @ v.T).float()
    return Solution(delta, u.float(), v.float(), stats.objective(torch.zeros_like(delta), shift), stats.objective(delta, shift))


def solve_adamw(
    stats: EditStatistics,
    shift: Float[torch.Tensor, "d_model"],
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
    target_shift = torch.cat(stats.shifted_flags).float().unsqueeze(1) * shift.float()
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
    return Solution(delta, None, None, stats.objective(torch.zeros_like(delta), shift), stats.objective(delta, shift))


def solve_lora(
    stats: EditStatistics,
    shift: Float[torch.Tensor, "d_model"],
    rank: int = 4,
    steps: int = 500,
    lr: float = 1e-2,
    seed: int = 0,
) -> Solution:
    """A rank-k (LoRA-style) ΔW = A·Bᵀ trained with Adam on the exact objective, evaluated from the
    statistics (no rows kept). B starts at zero, as in LoRA, so ΔW starts at zero."""
    _check(stats)
    d_mlp, d_model = len(stats.gram), len(shift)
    generator = torch.Generator().manual_seed(seed)
    a = torch.nn.Parameter(torch.randn(d_mlp, rank, generator=generator, dtype=torch.float64) / d_mlp**0.5)
    b = torch.nn.Parameter(torch.zeros(d_model, rank, dtype=torch.float64))
    gram = stats.gram / stats.n_rows
    s = stats.shifted_sum / stats.n_rows
    r = shift.double()
    optimizer = torch.optim.Adam([a, b], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        delta = a @ b.T
        loss = ((gram @ delta) * delta).sum() - 2 * s @ delta @ r
        loss.backward()
        optimizer.step()
    u, v = a.detach().float(), b.detach().float()
    delta = u @ v.T
    return Solution(delta, u, v, stats.objective(torch.zeros_like(delta), shift), stats.objective(delta, shift))
