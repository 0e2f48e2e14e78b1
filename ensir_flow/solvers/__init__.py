"""The solvers, one object each (`base.Solver`) in a registry: everything fit, apply, evaluate, the
API and the CLI need of a solver, asked of its object by name, never by comparing names.

Adding a solver is one module here defining its `SOLVER` and one line in `REGISTRY` below
(docs/architecture.md, "Adding a solver").
"""

from ..errors import InputError
from . import average, em, imported, lsq, select, zzpm
from .base import EMPTY_POLICY, CellWeights, Solver, Tuning

#: Every solver by name, in the order the CLI lists them: those `fit` makes, then the LUT import's.
REGISTRY: dict[str, Solver] = {
    solver.name: solver for solver in (em.SOLVER, lsq.SOLVER, average.SOLVER, zzpm.SOLVER, select.SOLVER, imported.SOLVER)
}
DEFAULT_SOLVER = em.SOLVER.name
#: The names `fit` takes.
FITTABLE = tuple(name for name, solver in REGISTRY.items() if solver.fittable)
#: The solver and empty-cell policy of a LUT imported from the paper's code.
IMPORTED = imported.SOLVER


def fittable(name: str) -> Solver:
    """The solver `fit` makes LUTs of named `name`, else an InputError listing them."""
    solver = REGISTRY.get(name)
    if solver is None or not solver.fittable:
        raise InputError(f"unknown solver {name!r} (choose from {', '.join(FITTABLE)})")
    return solver


__all__ = ["DEFAULT_SOLVER", "EMPTY_POLICY", "FITTABLE", "IMPORTED", "REGISTRY", "CellWeights", "Solver", "Tuning", "fittable"]
