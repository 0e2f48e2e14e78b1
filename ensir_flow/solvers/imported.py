"""imported: a LUT published with the paper's code (`lut.read_paper_lut`); read, never fitted."""

from ..fit_status import FitStatus
from .base import Solver

SOLVER = Solver(
    name="imported",
    summary="a LUT published with the paper's code",
    moments=None,
    fit=None,
    statuses=(FitStatus.IMPORTED,),
    empty_policy="as published",
    empty_policy_description=None,
)
