import pytest
import torch

from lunar_lens.core.errors import LunarError
from lunar_lens.edit.solvers import EditStatistics, solve_adamw, solve_closed, solve_lora


def random_problem(n_rows=96, d_mlp=24, d_model=12, seed=0, keep_rows=False, n_shifts=1):
    """Rows, each row's shift id (-1: keep), the shift table, and the streamed statistics."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, d_mlp, generator=g)
    ids = torch.randint(0, n_shifts, (n_rows,), generator=g)
    ids[torch.rand(n_rows, generator=g) > 0.3] = -1
    shifts = torch.randn(n_shifts, d_model, generator=g)
    stats = EditStatistics.empty(d_mlp, n_shifts, keep_rows=keep_rows)
    for chunk_x, chunk_ids in zip(x.split(17), ids.split(17)):  # streamed in uneven chunks
        stats.add(chunk_x, chunk_ids)
    return x, ids, shifts, stats


def targets(ids, shifts):
    return torch.cat([shifts, torch.zeros(1, shifts.shape[1])]).double()[ids]


def direct_objective(x, ids, shifts, delta):
    return torch.mean((x.double() @ delta.double() - targets(ids, shifts)) ** 2).item()


def test_statistics_are_streamed_sums():
    x, ids, _, stats = random_problem(n_shifts=3)
    assert torch.allclose(stats.gram, x.double().T @ x.double())
    for j in range(3):
        assert torch.allclose(stats.shifted_sums[j], x.double()[ids == j].sum(0))
        assert stats.shifted_counts[j] == int((ids == j).sum())
    assert (stats.n_rows, stats.n_shifted) == (len(x), int((ids >= 0).sum()))


@pytest.mark.parametrize("n_shifts", [1, 4])
def test_objective_from_statistics_equals_direct_mse(n_shifts):
    x, ids, shifts, stats = random_problem(n_shifts=n_shifts)
    delta = torch.randn(x.shape[1], shifts.shape[1]) * 0.1
    assert stats.objective(delta, shifts) == pytest.approx(direct_objective(x, ids, shifts, delta), rel=1e-6)


def test_closed_form_matches_lstsq_and_is_rank_one():
    x, ids, shifts, stats = random_problem()
    reference = torch.linalg.lstsq(x.double(), targets(ids, shifts)).solution
    solution = solve_closed(stats, shifts, ridge=1e-10)
    assert torch.allclose(solution.delta.double(), reference, atol=1e-5)
    singular = torch.linalg.svdvals(solution.delta.double())
    assert singular[1] / singular[0] < 1e-6
    assert torch.allclose(solution.u @ solution.v.T, solution.delta, atol=1e-6)
    assert solution.objective_after < solution.objective_before
    assert solution.objective_after == pytest.approx(direct_objective(x, ids, shifts, solution.delta), rel=1e-5)


def test_several_shift_vectors_give_the_lstsq_edit_of_matching_rank():
    x, ids, shifts, stats = random_problem(n_shifts=3)
    reference = torch.linalg.lstsq(x.double(), targets(ids, shifts)).solution
    solution = solve_closed(stats, shifts, ridge=1e-10)
    assert torch.allclose(solution.delta.double(), reference, atol=1e-5)
    assert solution.u.shape == (x.shape[1], 3)
    assert int(torch.linalg.matrix_rank(solution.delta.double(), rtol=1e-6)) == 3


def test_rank_deficient_rows_keep_the_minimum_norm_edit():
    x, ids, shifts, stats = random_problem(n_rows=10, d_mlp=24)  # fewer rows than d_mlp
    solution = solve_closed(stats, shifts, ridge=1e-9)
    reference = torch.linalg.pinv(x.double()) @ targets(ids, shifts)
    assert torch.allclose(solution.delta.double(), reference, atol=1e-4)


@pytest.mark.parametrize("n_shifts", [1, 3])
def test_closed_form_beats_the_released_adamw_recipe(n_shifts):
    x, ids, shifts, stats = random_problem(keep_rows=True, n_shifts=n_shifts)
    w0 = torch.randn(x.shape[1], shifts.shape[1])
    closed = solve_closed(stats, shifts)
    adamw = solve_adamw(stats, shifts, w0)
    assert closed.objective_after <= adamw.objective_after
    assert adamw.objective_after < adamw.objective_before  # the recipe does make progress
    assert adamw.objective_after == pytest.approx(direct_objective(x, ids, shifts, adamw.delta), rel=1e-4)


def test_lora_approaches_the_exact_optimum():
    x, ids, shifts, stats = random_problem()
    closed = solve_closed(stats, shifts)
    lora = solve_lora(stats, shifts, rank=2, steps=300, lr=5e-2)
    assert lora.u.shape == (x.shape[1], 2) and lora.v.shape == (shifts.shape[1], 2)
    gap_before = closed.objective_before - closed.objective_after
    assert lora.objective_after - closed.objective_after < 0.02 * gap_before


def test_no_shifted_row_is_a_clear_error():
    stats = EditStatistics.empty(4)
    stats.add(torch.randn(5, 4), torch.full((5,), -1))
    with pytest.raises(LunarError, match="no forget position"):
        solve_closed(stats, torch.ones(1, 3))
    stats.add(torch.randn(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(LunarError, match="keep_rows"):
        solve_adamw(stats, torch.ones(1, 3), torch.zeros(4, 3))


@pytest.mark.parametrize("n_shifts", [1, 3])
def test_a_consuming_solve_equals_the_copying_one_and_uses_the_gram_matrix_up(n_shifts):
    x, ids, shifts, kept = random_problem(n_shifts=n_shifts)
    *_, consumed = random_problem(n_shifts=n_shifts)
    copying = solve_closed(kept, shifts, ridge=1e-6)
    in_place = solve_closed(consumed, shifts, ridge=1e-6, consume=True)
    assert consumed.gram is None and kept.gram is not None
    assert torch.allclose(in_place.u, copying.u, rtol=1e-5, atol=1e-7)
    assert in_place.objective_before == pytest.approx(copying.objective_before, rel=1e-12)
    assert in_place.objective_after == pytest.approx(copying.objective_after, rel=1e-4, abs=1e-12)
    assert in_place.objective_after == pytest.approx(direct_objective(x, ids, shifts, in_place.delta), rel=1e-4, abs=1e-12)


def test_a_consuming_solve_of_a_singular_gram_matrix_without_ridge_says_so():
    *_, shifts, stats = random_problem(n_rows=8, d_mlp=24)  # 8 rows: a Gram matrix of rank 8 < 24
    with pytest.raises(LunarError, match="not positive definite.*larger"):
        solve_closed(stats, shifts, ridge=0.0, consume=True)
