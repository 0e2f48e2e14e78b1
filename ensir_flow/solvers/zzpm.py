"""zzpm: the paper's per-image baseline, weights softmax_k(1 / (1e-3 + MSE of model k to the per-pixel mean)).

It fits nothing: its LUT records the method (uniform weights), and `apply` gathers each image's
squared distances in one extra pass over the chunks and blends the image with its own weights.
"""

from ..blend import zzpm_weights
from ..fit_status import FitStatus
from ..stats import EM_MOMENTS, CellStatistics
from .base import CellWeights, Solver, all_uniform, uniform_cells


def fit(statistics: CellStatistics, channels: CellStatistics | None, device: str) -> CellWeights:
    """Nothing to fit per cell: 1/K everywhere (apply computes each image's weights)."""
    return uniform_cells(statistics)


SOLVER = Solver(
    name="zzpm",
    summary="per-image weights computed at apply (the paper's other baseline)",
    moments=EM_MOMENTS,
    fit=fit,
    statuses=(FitStatus.UNIFORM,),
    empty_policy_description="every cell holds uniform 1/K weights: apply computes each image's own weights",
    image_weights=zzpm_weights,
    baseline=True,
    weights_rule=all_uniform,
    weights_rule_description="every weight 1/K",
)
