"""select: per cell, the one model of least squared error against the ground truth gets all the weight.

A model's squared error in a cell is sum (y - x_k)^2 = sum y^2 - 2 sum x_k y + sum x_k^2: the sum
y^2 is every model's alike, and sum x_k^2 (the diagonal of the cross products) and sum x_k y are
among the moments least squares gathers (`stats.ALL_MOMENTS`), so the choice is exact, in
integers. Where models tie, the first of them in the LUT's order is chosen. Cells without
reference pixels take, as em's do, the choice of their whole channel (uniform 1/K where a channel
has no reference pixels).
"""

import numpy as np

from ..fit_status import FitStatus
from ..stats import ALL_MOMENTS, CellStatistics
from .base import RULE_TOLERANCE, CellWeights, Solver, uniform_fallback


def squared_errors_less_truth(statistics: CellStatistics) -> np.ndarray:
    """sum x_k^2 - 2 sum x_k y per cell and model (m, K), int64: each model's squared error in the
    cell less the sum of y^2, which is the same for every model of a cell."""
    k = statistics.n_models
    rows, cols = np.triu_indices(k)
    diagonal = 1 + k + np.flatnonzero(rows == cols)  # sum x_k^2 among the row-major upper triangle
    return statistics.moments[:, diagonal] - 2 * statistics.sums_xy


def one_hot_of_least_error(statistics: CellStatistics) -> np.ndarray:
    """Weights (m, K) float64: 1 for the model of least squared error in each cell (the first of
    those that tie), 0 for the others."""
    chosen = np.argmin(squared_errors_less_truth(statistics), axis=1)
    weights = np.zeros((len(chosen), statistics.n_models))
    weights[np.arange(len(chosen)), chosen] = 1.0
    return weights


def one_model_or_uniform(weights: np.ndarray) -> bool:
    """Whether every K-vector of `weights` (..., K) gives one model all the weight, or is uniform
    1/K (a channel without reference pixels)."""
    one_hot = np.all((np.abs(weights) <= RULE_TOLERANCE) | (np.abs(weights - 1) <= RULE_TOLERANCE), axis=-1)
    uniform = np.all(np.abs(weights - 1.0 / weights.shape[-1]) <= RULE_TOLERANCE, axis=-1)
    return bool(np.all(one_hot | uniform))


def fit(statistics: CellStatistics, channels: CellStatistics | None, device: str) -> CellWeights:
    """The best model of every cell, and as each channel's fallback the best model of all its pixels."""
    fallback = uniform_fallback(statistics)
    channels = statistics.per_channel() if channels is None else channels
    fallback[channels.cells] = one_hot_of_least_error(channels)
    weights = one_hot_of_least_error(statistics)
    return CellWeights(weights, np.full(len(weights), FitStatus.SELECTED, np.int8), fallback, FitStatus.EMPTY_FALLBACK)


SOLVER = Solver(
    name="select",
    summary="per cell, the one model of least squared error",
    moments=ALL_MOMENTS,
    fit=fit,
    statuses=(FitStatus.EMPTY_FALLBACK, FitStatus.SELECTED),
    empty_policy_description="cells without reference pixels take the model of least squared error over all reference "
    "pixels of their channel; uniform 1/K where a channel has no reference pixels",
    weights_rule=one_model_or_uniform,
    weights_rule_description="each cell's weights all on one model, or uniform 1/K",
)
