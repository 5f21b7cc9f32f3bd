import pytest
import torch

from lunar_lens.errors import LunarError
from lunar_lens.solvers import EditStatistics, solve_adamw, solve_closed, solve_lora


def random_problem(n_rows=96, d_mlp=24, d_model=12, seed=0, keep_rows=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, d_mlp, generator=g)
    shifted = torch.rand(n_rows, generator=g) < 0.3
    shift = torch.randn(d_model, generator=g)
    stats = EditStatistics.empty(d_mlp, keep_rows=keep_rows)
    for chunk_x, chunk_s in zip(x.split(17), shifted.split(17)):  # streamed in uneven chunks
        stats.add(chunk_x, chunk_s)
    return x, shifted, shift, stats


def direct_objective(x, shifted, shift, delta):
    target = shifted.float().unsqueeze(1) * shift
    return torch.mean((x.double() @ delta.double() - target.double()) ** 2).item()


def test_statistics_are_streamed_sums():
    x, shifted, _, stats = random_problem()
    assert torch.allclose(stats.gram, x.double().T @ x.double())
    assert torch.allclose(stats.shifted_sum, x.double()[shifted].sum(0))
    assert (stats.n_rows, stats.n_shifted) == (len(x), int(shifted.sum()))


def test_objective_from_statistics_equals_direct_mse():
    x, shifted, shift, stats = random_problem()
    delta = torch.randn(x.shape[1], len(shift)) * 0.1
    assert stats.objective(delta, shift) == pytest.approx(direct_objective(x, shifted, shift, delta), rel=1e-6)


def test_closed_form_matches_lstsq_and_is_rank_one():
    x, shifted, shift, stats = random_problem()
    target = shifted.double().unsqueeze(1) * shift.double()
    reference = torch.linalg.lstsq(x.double(), target).solution
    solution = solve_closed(stats, shift, ridge=1e-10)
    assert torch.allclose(solution.delta.double(), reference, atol=1e-5)
    singular = torch.linalg.svdvals(solution.delta.double())
    assert singular[1] / singular[0] < 1e-6
    assert torch.allclose(solution.u @ solution.v.T, solution.delta, atol=1e-6)
    assert solution.objective_after < solution.objective_before
    assert solution.objective_after == pytest.approx(direct_objective(x, shifted, shift, solution.delta), rel=1e-5)


def test_rank_deficient_rows_keep_the_minimum_norm_edit():
    x, shifted, shift, stats = random_problem(n_rows=10, d_mlp=24)  # fewer rows than d_mlp
    solution = solve_closed(stats, shift, ridge=1e-9)
    reference = torch.linalg.pinv(x.double()) @ (shifted.double().unsqueeze(1) * shift.double())
    assert torch.allclose(solution.delta.double(), reference, atol=1e-4)


def test_closed_form_beats_the_released_adamw_recipe():
    x, shifted, shift, stats = random_problem(keep_rows=True)
    w0 = torch.randn(x.shape[1], len(shift))
    closed = solve_closed(stats, shift)
    adamw = solve_adamw(stats, shift, w0)
    assert closed.objective_after <= adamw.objective_after
    assert adamw.objective_after < adamw.objective_before  # the recipe does make progress
    assert adamw.objective_after == pytest.approx(direct_objective(x, shifted, shift, adamw.delta), rel=1e-4)


def test_lora_approaches_the_exact_optimum():
    x, shifted, shift, stats = random_problem()
    closed = solve_closed(stats, shift)
    lora = solve_lora(stats, shift, rank=2, steps=300, lr=5e-2)
    assert lora.u.shape == (x.shape[1], 2) and lora.v.shape == (len(shift), 2)
    gap_before = closed.objective_before - closed.objective_after
    assert lora.objective_after - closed.objective_after < 0.02 * gap_before


def test_no_shifted_row_is_a_clear_error():
    stats = EditStatistics.empty(4)
    stats.add(torch.randn(5, 4), torch.zeros(5, dtype=torch.bool))
    with pytest.raises(LunarError, match="no forget position"):
        solve_closed(stats, torch.ones(3))
    stats.add(torch.randn(2, 4), torch.ones(2, dtype=torch.bool))
    with pytest.raises(LunarError, match="keep_rows"):
        solve_adamw(stats, torch.ones(3), torch.zeros(4, 3))
