"""Least-squares weights on the simplex, per cell, from sufficient statistics (beyond the paper).

Per cell, the weights w (w >= 0, sum w = 1) minimise the squared error sum_pixels (y - w.x)^2 =
w'Aw - 2 b'w + sum y^2, with A = sum x x' and b = sum x y, both additive statistics gathered in
the same single pass as EM's. This maximises the cell's PSNR directly.

Sparse cells shrink towards the channel-wide solution w_c: the cell's A and b are augmented as if
`shrinkage` extra pixels, drawn from the channel's own (per-pixel) second moments, preferred w_c:
A + s * Abar_c and b + s * Abar_c w_c. A cell with n >> s keeps its own solution; an empty cell
gets w_c exactly. The strength s is chosen by held-out error (`choose_shrinkage`), never
in-sample: each candidate is fitted on all folds but one and scored on the held-out fold, and the
squared error of a held-out fold is itself computed exactly from that fold's statistics.
"""

import itertools

import numba
import numpy as np

from .kernel_cache import CACHE
from .stats import CellStatistics, find_rows, merge

SHRINKAGE_GRID = (0.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6)
#: The strongest shrinkage accepted, in pseudo-pixels per cell: far beyond the grid and any
#: reference set's pixels per cell (every cell then has the channel-wide weights). Strengths near
#: float64's range overflow the statistics they scale, and LAPACK's SVD of the resulting inf or
#: NaN systems need not return at all.
MAX_SHRINKAGE = 1e15
#: Up to this K every support is enumerated (2^K - 1 KKT systems, batched: fast for small K, and
#: the method every LUT of K <= 5 was fitted with); above it, the active-set method.
ENUMERATION_MAX_MODELS = 5


def simplex_least_squares(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin over the simplex of w'Aw - 2b'w, for a batch: a (m, K, K), b (m, K) -> (m, K).

    Both methods are exact: support enumeration for K <= `ENUMERATION_MAX_MODELS`, else an
    active-set method (`active_set_simplex_least_squares`).
    """
    if b.shape[1] > ENUMERATION_MAX_MODELS:
        return active_set_simplex_least_squares(a, b)
    return enumerated_simplex_least_squares(a, b)


def enumerated_simplex_least_squares(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`simplex_least_squares` by enumeration: the optimum is the equality-constrained optimum on
    its support, so every support (2^K - 1 of them) is solved through its KKT system and the best
    feasible one kept."""
    m, k = b.shape
    best = np.full((m, k), 1.0 / k)
    best_objective = np.full(m, np.inf)
    for size in range(1, k + 1):
        for support in map(list, itertools.combinations(range(k), size)):
            kkt = np.zeros((m, size + 1, size + 1))
            kkt[:, :size, :size] = a[:, support][:, :, support]
            kkt[:, :size, size] = kkt[:, size, :size] = 1.0
            rhs = np.zeros((m, size + 1))
            rhs[:, :size] = b[:, support]
            rhs[:, size] = 1.0
            solution = np.einsum("mij,mj->mi", np.linalg.pinv(kkt), rhs)  # pinv: degenerate cells too
            weights = np.zeros((m, k))
            weights[:, support] = solution[:, :size]
            objective = np.einsum("mi,mij,mj->m", weights, a, weights) - 2 * (weights * b).sum(axis=1)
            better = (solution[:, :size] >= -1e-12).all(axis=1) & (objective < best_objective)
            best[better] = np.clip(weights[better], 0, None)
            best_objective[better] = objective[better]
    return best / best.sum(axis=1, keepdims=True)


def active_set_simplex_least_squares(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`simplex_least_squares` by a primal active-set method (Lawson-Hanson on the simplex), one
    cell at a time in numba: cost polynomial in K (about K iterations of a KKT solve), so K = 16
    is cheap where enumeration would solve 65,535 systems per cell."""
    a = np.ascontiguousarray(a, dtype=np.float64)
    b = np.ascontiguousarray(b, dtype=np.float64)
    out = np.empty(b.shape)
    _active_set_batch(a, b, out)
    return out / out.sum(axis=1, keepdims=True)


@numba.njit(cache=CACHE)
def _support_optimum(a, b, support):
    """Minimiser of w'Aw - 2b'w with sum w = 1 and w = 0 off `support` (its KKT system; pinv for
    singular cells, as enumeration does)."""
    index = np.flatnonzero(support)
    size = len(index)
    kkt = np.zeros((size + 1, size + 1))
    rhs = np.zeros(size + 1)
    for i in range(size):
        for j in range(size):
            kkt[i, j] = a[index[i], index[j]]
        kkt[i, size] = kkt[size, i] = 1.0
        rhs[i] = b[index[i]]
    rhs[size] = 1.0
    solution = np.linalg.pinv(kkt) @ rhs
    w = np.zeros(len(b))
    for i in range(size):
        w[index[i]] = solution[i]
    return w


@numba.njit(cache=CACHE)
def _active_set_batch(a, b, out):
    """Each row of out (m, K): the simplex least-squares weights of cell (a[i], b[i])."""
    m, k = b.shape
    for cell in range(m):
        scale = max(np.abs(np.diag(a[cell])).max(), np.abs(b[cell]).max(), 1e-300)
        A, rhs = a[cell] / scale, b[cell] / scale  # same optimum; a KKT system of entries ~1 solves accurately
        tolerance = 1e-12
        vertex = np.argmin(np.diag(A) - 2 * rhs)  # the best single model: optimal on its own support
        w = np.zeros(k)
        w[vertex] = 1.0
        support = np.zeros(k, np.bool_)
        support[vertex] = True
        for _ in range(10 * k):
            gradient = A @ w - rhs  # half the objective's gradient
            level = gradient[support].mean()  # equal on the support at its optimum (the multiplier)
            entering, most = -1, -tolerance
            for q in range(k):
                if not support[q] and gradient[q] - level < most:
                    entering, most = q, gradient[q] - level
            if entering < 0:
                break  # KKT holds: no model off the support would lower the objective
            support[entering] = True
            for _ in range(10 * k):
                z = _support_optimum(A, rhs, support)
                if (z[support] > 0).all():
                    w = z
                    break
                step = 1.0  # move towards z until a weight reaches 0, and drop it from the support
                for q in range(k):
                    if support[q] and z[q] <= 0:
                        step = min(step, w[q] / (w[q] - z[q])) if w[q] > z[q] else 0.0
                w = w + step * (z - w)
                for q in range(k):
                    if support[q] and w[q] <= 1e-15:
                        support[q] = False
                        w[q] = 0.0
            if not support[entering]:
                break  # degenerate (singular A): the model that should enter cannot; w is optimal to rounding
        for q in range(k):  # element by element: a whole row assigned makes numba compile its error message
            out[cell, q] = np.maximum(w[q], 0.0)


def is_shrinkage(strength) -> bool:
    """Whether `strength` is a shrinkage `fit_lsq` accepts: a number (not a bool) from 0 to
    `MAX_SHRINKAGE`; NaN and infinities are not."""
    return (
        isinstance(strength, (int, float, np.integer, np.floating))
        and not isinstance(strength, bool)
        and 0 <= strength <= MAX_SHRINKAGE
    )


def fit_lsq(
    statistics: CellStatistics, shrinkage: float, channels: CellStatistics | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights (m, K) of every non-empty cell, plus per-channel weights (C, K) for empty cells.

    `channels`: the statistics of each whole channel (`CellStatistics.per_channel`), the default
    those of `statistics`; given when `statistics` hold one range of cells of a larger set (a fit
    in passes), whose channel-wide solution is that of all its pixels.
    Returns (cell_weights, channel_ids, channel_weights). A `shrinkage` that `is_shrinkage` refuses
    is a ValueError (it would not make a solution, see `MAX_SHRINKAGE`).
    """
    if not is_shrinkage(shrinkage):
        raise ValueError(f"shrinkage {shrinkage!r} is not a number from 0 to {MAX_SHRINKAGE:g}")
    channels = statistics.per_channel() if channels is None else channels
    channel_ids = channels.cells
    channel_weights = simplex_least_squares(channels.cross_products().astype(np.float64), channels.sums_xy.astype(np.float64))
    row_of_channel = np.full(statistics.n_channels, -1)
    row_of_channel[channel_ids] = np.arange(len(channel_ids))
    rows = row_of_channel[statistics.channels]
    mean_second_moments = channels.cross_products() / channels.counts[:, None, None]
    prior_a = shrinkage * mean_second_moments[rows]
    a = statistics.cross_products() + prior_a
    b = statistics.sums_xy + np.einsum("mij,mj->mi", prior_a, channel_weights[rows])
    return simplex_least_squares(a, b), channel_ids, channel_weights


def squared_error(statistics: CellStatistics, weights_of_cell: np.ndarray) -> float:
    """Sum over the pixels of `statistics` of (y - w.x)^2, with w given per cell (m, K), exactly
    from the sufficient statistics (no pixel pass)."""
    a = statistics.cross_products().astype(np.float64)
    sum_y2 = np.bincount(
        statistics.hist_rows(),
        weights=statistics.hist_counts * statistics.levels.astype(np.float64) ** 2,
        minlength=len(statistics.cells),
    )
    w = weights_of_cell
    return float((np.einsum("mi,mij,mj->m", w, a, w) - 2 * (w * statistics.sums_xy).sum(axis=1) + sum_y2).sum())


def lookup(
    cells_with_weights: np.ndarray, weights: np.ndarray, wanted: np.ndarray, fallback: np.ndarray, n_channels: int
) -> np.ndarray:
    """Weights of the `wanted` cells: from (cells_with_weights, weights), else the channel's fallback (C, K)."""
    out = fallback[(wanted if wanted.ndim == 1 else wanted[:, 0]) % n_channels].copy()
    row = find_rows(cells_with_weights, wanted)
    out[row >= 0] = weights[row[row >= 0]]
    return out


def choose_shrinkage(folds: list[CellStatistics], grid=SHRINKAGE_GRID) -> tuple[float, dict[float, float]]:
    """The grid value with the lowest held-out squared error over `folds`, and every value's error."""
    errors = held_out_errors(folds, grid)
    return min(errors, key=errors.get), errors


def held_out_errors(
    folds: list[CellStatistics], grid=SHRINKAGE_GRID, channel_folds: list[CellStatistics] | None = None
) -> dict[float, float]:
    """Each grid value's squared error over `folds`, each fold scored by the weights fitted on the
    others. `channel_folds`: each fold's `per_channel` statistics, given when `folds` hold one range
    of cells of a larger set (a fit in passes): each training's channel-wide solution is then that
    of all its pixels, and the errors of the ranges add up to those of the whole set."""
    errors = {}
    for strength in grid:
        total = 0.0
        for held_out in range(len(folds)):
            training = merge(*[f for i, f in enumerate(folds) if i != held_out])
            channels = None if channel_folds is None else merge(*[f for i, f in enumerate(channel_folds) if i != held_out])
            weights, channel_ids, channel_weights = fit_lsq(training, strength, channels)
            fallback = np.full((training.n_channels, training.n_models), 1.0 / training.n_models)
            fallback[channel_ids] = channel_weights
            test = folds[held_out]
            total += squared_error(test, lookup(training.cells, weights, test.cells, fallback, training.n_channels))
        errors[strength] = total
    return errors
