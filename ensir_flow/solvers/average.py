"""average: uniform 1/K weights, the plain average of the models (the paper's baseline)."""

from ..fit_status import FitStatus
from ..stats import EM_MOMENTS, CellStatistics
from .base import CellWeights, Solver, all_uniform, uniform_cells


def fit(statistics: CellStatistics, channels: CellStatistics | None, device: str) -> CellWeights:
    """Nothing to fit: 1/K everywhere."""
    return uniform_cells(statistics)


SOLVER = Solver(
    name="average",
    summary="uniform weights (the paper's baseline)",
    moments=EM_MOMENTS,
    fit=fit,
    statuses=(FitStatus.UNIFORM,),
    empty_policy_description="every cell holds uniform 1/K weights: nothing is fitted per cell",
    baseline=True,
    weights_rule=all_uniform,
    weights_rule_description="every weight 1/K",
)
