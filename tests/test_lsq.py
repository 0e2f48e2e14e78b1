import itertools

import numpy as np
import pytest

from ensir_flow import lsq, stats
from ensir_flow.lut import fit_lut
from helpers import cell_ids


def _cells(seed, n_models=3, n_pixels=3000, bin_width=64):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 256, (n_pixels, 3))
    predictions = np.stack([np.clip(truth + rng.normal(2 * k - 2, 3 + 4 * k, truth.shape), 0, 255) for k in range(n_models)])
    return predictions.round().astype(np.uint8), truth.astype(np.uint8)


def _brute_force(a, b, steps=200):
    """Grid search over the 3-simplex: an oracle for simplex_least_squares with K = 3."""
    best, best_value = None, np.inf
    for i, j in itertools.product(range(steps + 1), repeat=2):
        if i + j <= steps:
            w = np.array([i, j, steps - i - j]) / steps
            value = w @ a @ w - 2 * b @ w
            if value < best_value:
                best, best_value = w, value
    return best, best_value


def test_simplex_solution_beats_a_fine_grid():
    rng = np.random.default_rng(0)
    for _ in range(4):
        x = rng.normal(100, 30, (50, 3))
        y = x @ rng.dirichlet([1, 1, 1]) + rng.normal(0, 40, 50) + np.array([0, 30, -30]) @ rng.normal(size=3)
        a, b = x.T @ x, x.T @ y
        w = lsq.simplex_least_squares(a[None], b[None])[0]
        assert w.min() >= 0 and w.sum() == pytest.approx(1)
        _, grid_value = _brute_force(a, b)
        assert w @ a @ w - 2 * b @ w <= grid_value + 1e-9 * abs(grid_value)


def test_interior_optimum_equals_constrained_least_squares():
    rng = np.random.default_rng(1)
    x = rng.normal(100, 30, (400, 2))
    y = 0.3 * x[:, 0] + 0.7 * x[:, 1] + rng.normal(0, 1, 400)
    w = lsq.simplex_least_squares((x.T @ x)[None], (x.T @ y)[None])[0]
    np.testing.assert_allclose(w, [0.3, 0.7], atol=0.01)
    # a model that is pure noise gets no weight (the simplex boundary)
    x3 = np.column_stack([x, rng.normal(100, 60, 400)])
    w3 = lsq.simplex_least_squares((x3.T @ x3)[None], (x3.T @ y)[None])[0]
    assert w3[2] < 0.01


def test_squared_error_from_statistics_equals_pixel_pass():
    predictions, truth = _cells(2)
    table = stats.chunk_statistics(predictions, truth, 64)
    weights = np.random.default_rng(3).dirichlet([1, 1, 1], len(table.cells))
    per_pixel = weights[np.searchsorted(table.cells, cell_ids(predictions, 64))]
    direct = ((truth.reshape(-1) - (per_pixel * predictions.reshape(3, -1).T).sum(axis=1)) ** 2).sum()
    assert lsq.squared_error(table, weights) == pytest.approx(direct, rel=1e-9)


def test_shrinkage_moves_cells_to_the_channel_solution():
    predictions, truth = _cells(4)
    table = stats.chunk_statistics(predictions, truth, 64)
    own, channel_ids, channel_weights = lsq.fit_lsq(table, 0.0)
    pulled, _, _ = lsq.fit_lsq(table, 1e12)
    np.testing.assert_allclose(pulled, channel_weights[table.cells % 3], atol=1e-4)
    assert np.abs(own - pulled).max() > 0.05
    lut = fit_lut(table, ["a", "b", "c"], solver="lsq", shrinkage=10.0)
    np.testing.assert_allclose(lut.weights.sum(axis=2), 1, atol=1e-6)
    empty = lut.count == 0
    np.testing.assert_allclose(lut.weights[empty], np.broadcast_to(channel_weights, lut.weights.shape)[empty], atol=1e-6)


def test_choose_shrinkage_minimises_held_out_error():
    folds = [stats.chunk_statistics(*_cells(seed, n_pixels=1500), 64) for seed in range(3)]
    chosen, errors = lsq.choose_shrinkage(folds, grid=(0.0, 100.0, 1e9))
    assert errors[chosen] == min(errors.values()) and set(errors) == {0.0, 100.0, 1e9}


def test_average_solver_is_uniform():
    lut = fit_lut(stats.chunk_statistics(*_cells(5), 64), ["a", "b", "c"], solver="average")
    assert (lut.weights == np.float32(1 / 3)).all()
