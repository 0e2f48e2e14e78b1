"""lsq: least squares on the simplex per cell, shrunk towards the channel's solution (`ensir_flow.lsq`)."""

import numpy as np

from .. import lsq
from ..fit_status import FitStatus
from ..stats import ALL_MOMENTS, CellStatistics
from .base import CellWeights, Solver, Tuning, uniform_fallback

#: Folds of reference images the shrinkage is chosen over.
SHRINKAGE_FOLDS = 5
#: The shrinkage of a reference set of a single image, where there is nothing to hold out.
DEFAULT_SHRINKAGE = 1e3


def fit(statistics: CellStatistics, channels: CellStatistics | None, device: str, shrinkage: float) -> CellWeights:
    """Least-squares weights of every cell with `shrinkage` pseudo-pixels preferring the channel's
    solution, which is the fallback."""
    weights, channel_ids, channel_weights = lsq.fit_lsq(statistics, shrinkage, channels)
    fallback = uniform_fallback(statistics)
    fallback[channel_ids] = channel_weights
    return CellWeights(weights, np.full(len(weights), FitStatus.LEAST_SQUARES, np.int8), fallback, FitStatus.EMPTY_FALLBACK)


def held_out_errors(folds: list[CellStatistics], channel_folds: list[CellStatistics] | None = None) -> dict[float, float]:
    """`lsq.held_out_errors` over `lsq.SHRINKAGE_GRID`."""
    return lsq.held_out_errors(folds, lsq.SHRINKAGE_GRID, channel_folds)


SOLVER = Solver(
    name="lsq",
    summary="least squares on the simplex (PSNR-optimal per cell)",
    moments=ALL_MOMENTS,
    fit=fit,
    statuses=(FitStatus.EMPTY_FALLBACK, FitStatus.LEAST_SQUARES),
    empty_policy_description="cells without reference pixels take the least-squares weights of all reference pixels of "
    "their channel; uniform 1/K where a channel has no reference pixels",
    tuning=Tuning("shrinkage", lsq.SHRINKAGE_GRID, SHRINKAGE_FOLDS, DEFAULT_SHRINKAGE, held_out_errors),
)
