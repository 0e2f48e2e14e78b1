"""What a solver is: one `Solver` object holds everything the pipelines, the API and the CLI ask of it.

A solver turns the statistics of the cells of a reference set (`stats.CellStatistics`) into
ensemble weights: one K-vector per cell (bin, channel) that holds reference pixels, and one per
channel for every other cell (the fallback). A per-image solver (ZZPM) fits nothing per cell: its
LUT holds uniform weights and `apply` weighs each image from its own predictions instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..fit_status import FitStatus
from ..stats import CellStatistics

#: The empty-cell policy of every solver that fits: cells without reference pixels take their
#: channel's fallback weights (each solver says which in its `empty_policy_description`).
EMPTY_POLICY = "channel"


@dataclass(frozen=True)
class CellWeights:
    """A solver's fit of some statistics: `weights` (m, K) float64 and `status` (m,) int8 of each
    cell of the statistics, in their order; `fallback` (C, K) float64 and `fallback_status` for
    every cell without reference pixels."""

    weights: np.ndarray
    status: np.ndarray
    fallback: np.ndarray
    fallback_status: FitStatus


@dataclass(frozen=True)
class Tuning:
    """A hyperparameter of a solver chosen by cross-validation over the reference images.

    `parameter` names it: the LUT attribute that records its value (with `<parameter>_choice`
    and `<parameter>_held_out_mse` recording how it was chosen) and the keyword its solver's `fit`
    takes. `fit` gathers the statistics of `folds` folds of images in its single pass and takes
    the value of `grid` with the lowest held-out squared error (`held_out_errors(folds,
    channel_folds)`: each value's error over the folds, each scored by the weights fitted on the
    others; `channel_folds`, each fold's per-channel statistics, given when the folds hold one
    range of cells, so that the errors of the ranges add up to the whole set's). With one image
    there is nothing to hold out: `default` is taken."""

    parameter: str
    grid: tuple[float, ...]
    folds: int
    default: float
    held_out_errors: Callable[..., dict[float, float]]

    def choose(self, errors: dict[float, float]) -> float:
        """The value of the lowest held-out error (the first of the grid where errors tie)."""
        return min(errors, key=errors.get)


@dataclass(frozen=True)
class Solver:
    """One solver: its `name` (the LUT's `solver` attribute, the CLI's choice; part of a LUT's
    digest, so never renamed), a one-line `summary` (the CLI's help) and

    - `moments`: the statistics it fits from (`stats.EM_MOMENTS` or `stats.ALL_MOMENTS`; None
      where it fits nothing from statistics);
    - `fit(statistics, channels, device, **tuned)`: its `CellWeights` for the cells of
      `statistics`, the fallback from `channels` (each whole channel's statistics; None: those of
      `statistics`); `device` is where it may run; `tuned` holds its `tuning` parameter's value.
      None for a LUT that is only ever read (imported); cells must be fitted independently of one
      another (`fit` in passes fits one range of cells at a time, to the same LUT);
    - `tuning`: the hyperparameter cross-validation chooses, if any;
    - `statuses`: the `FitStatus` codes its cells and fallback may take;
    - `empty_policy` and `empty_policy_description`: what cells without reference pixels get (a
      LUT of the policy `EMPTY_POLICY` records the description);
    - `image_weights`: for a per-image solver, the weights (images, K) of images from the mean
      squared distance (images, K) of each model to the per-pixel mean; `apply` blends each image
      with its own. None for a solver that applies per bin (its LUT);
    - `baseline`: whether `evaluate` scores it beside the models on every run (so cross-validation
      never fits it);
    - `weights_rule`: for a solver whose weights follow from its name alone, whether weights
      (..., K) are ones it makes, and `weights_rule_description`, that rule in words; None where
      the weights are fitted from data (`check_weights`)."""

    name: str
    summary: str
    moments: str | None
    fit: Callable[..., CellWeights] | None
    statuses: tuple[FitStatus, ...]
    empty_policy_description: str | None
    empty_policy: str = EMPTY_POLICY
    tuning: Tuning | None = None
    image_weights: Callable[[np.ndarray], np.ndarray] | None = None
    baseline: bool = False
    weights_rule: Callable[[np.ndarray], bool] | None = None
    weights_rule_description: str = ""

    def check_weights(self, weights: np.ndarray, source: str) -> None:
        """Refuse weights (..., K) that this solver does not make (`weights_rule`): a LUT whose
        `solver` attribute was edited would be applied, and recorded, as a solver it is not."""
        if self.weights_rule is not None and not self.weights_rule(np.asarray(weights)):
            raise InputError(
                f"{source}: its weights are not those of a {self.name} LUT ({self.weights_rule_description}); "
                "its solver attribute was changed: fit it again"
            )

    @property
    def per_image(self) -> bool:
        """Whether `apply` weighs each image as a whole (`image_weights`) rather than by its LUT."""
        return self.image_weights is not None

    @property
    def fittable(self) -> bool:
        """Whether `fit` makes LUTs of it."""
        return self.fit is not None


def uniform_cells(statistics: CellStatistics) -> CellWeights:
    """1/K in every cell and as every channel's fallback, each of status `FitStatus.UNIFORM`."""
    n_models = statistics.n_models
    return CellWeights(
        np.full((len(statistics.cells), n_models), 1.0 / n_models),
        np.full(len(statistics.cells), FitStatus.UNIFORM, np.int8),
        np.full((statistics.n_channels, n_models), 1.0 / n_models),
        FitStatus.UNIFORM,
    )


#: How far a stored (float32) weight may lie from the value a rule gives it.
RULE_TOLERANCE = 1e-6


def all_uniform(weights: np.ndarray) -> bool:
    """Whether every K-vector of `weights` (..., K) is 1/K throughout."""
    return bool(np.all(np.abs(weights - 1.0 / weights.shape[-1]) <= RULE_TOLERANCE))


def uniform_fallback(statistics: CellStatistics) -> np.ndarray:
    """1/K for every channel (C, K): the fallback of a channel without reference pixels."""
    return np.full((statistics.n_channels, statistics.n_models), 1.0 / statistics.n_models)
