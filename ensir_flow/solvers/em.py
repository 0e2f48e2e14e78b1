"""em: the paper's method, EM for a Gaussian mixture over each cell's ground truth (`ensir_flow.em`)."""

from .. import em
from ..fit_status import FitStatus
from ..stats import EM_MOMENTS, CellStatistics
from .base import CellWeights, Solver, uniform_fallback


def fit(statistics: CellStatistics, channels: CellStatistics | None, device: str) -> CellWeights:
    """EM weights of every cell, and as each channel's fallback the EM weights of all its pixels."""
    fallback = uniform_fallback(statistics)
    channels = statistics.per_channel() if channels is None else channels
    if len(channels.cells):
        fallback[channels.cells] = em.fit_em(channels, device)[0]
    weights, status = em.fit_em(statistics, device)
    return CellWeights(weights, status, fallback, FitStatus.EMPTY_FALLBACK)


SOLVER = Solver(
    name="em",
    summary="the paper's Gaussian-mixture EM",
    moments=EM_MOMENTS,
    fit=fit,
    statuses=(FitStatus.EMPTY_FALLBACK, FitStatus.INITIAL_WEIGHTS, FitStatus.EM, FitStatus.EM_FAILED_INITIAL_WEIGHTS),
    empty_policy_description="cells without reference pixels take the EM weights fitted on all reference pixels of their "
    "channel; uniform 1/K where a channel has no reference pixels",
)
