"""The lookup table: ensemble weights per (bin, channel), its fitting and its interchange forms.

A LUT is an `xarray.Dataset` once written (see `to_dataset`): `weights` (bin, channel, model)
float32, `count` (bin, channel) int64 reference pixels, `fit_status` (bin, channel) int8, and
attributes `models`, `bin_width`, `solver`, `empty_policy`. Nothing here reads or writes files
except `read_paper_lut`, which imports a LUT published with the paper's code through torch's
safe (weights-only) loader.
"""

import hashlib
from dataclasses import dataclass, field

import numpy as np
import xarray as xr

from . import em, lsq
from .binning import bin_count, flat_bins_of_edges, ranges_per_model
from .errors import InputError
from .fit_status import FLAG_MEANINGS, FitStatus
from .stats import CellStatistics

SOLVERS = ("em", "lsq", "average", "zzpm")
DEFAULT_SOLVER = "em"
EMPTY_POLICY = "channel"
#: How far a cell's weights may sum from 1 in a valid LUT (`check_weights`). Every LUT ensir-flow
#: makes or imports is far inside it: EM's weights are (s_k + 1e-6) / n with n >= 100, so they sum
#: to 1 + K * 1e-8 at most; least squares and uniform weights are normalised; float32 storage
#: rounds a sum by about K * 6e-8; the paper's published GoPro LUT sums to 1 within 1.5e-7. A
#: table whose sums are off by more than 1e-3 (a quarter of an 8-bit level at 255) was not made
#: as a convex combination, and blending with it would bias the ensemble.
SUM_TOLERANCE = 1e-3
#: What `EMPTY_POLICY` gives the cells without reference pixels, per solver (a LUT attribute).
EMPTY_POLICY_DESCRIPTIONS = {
    "em": "cells without reference pixels take the EM weights fitted on all reference pixels of their channel; "
          "uniform 1/K where a channel has no reference pixels",
    "lsq": "cells without reference pixels take the least-squares weights of all reference pixels of their channel; "
           "uniform 1/K where a channel has no reference pixels",
    "average": "every cell holds uniform 1/K weights: nothing is fitted per cell",
    "zzpm": "every cell holds uniform 1/K weights: apply computes each image's own weights",
}


def check_solver(solver: str) -> str:
    """`solver` if it is one of SOLVERS, else an InputError listing them."""
    if solver not in SOLVERS:
        raise InputError(f"unknown solver {solver!r} (choose from {', '.join(SOLVERS)})")
    return solver


@dataclass
class Lut:
    """Ensemble weights (bins, channels, K) for models in a fixed order at one bin width."""

    models: list[str]
    bin_width: int
    weights: np.ndarray
    count: np.ndarray
    fit_status: np.ndarray
    solver: str = "em"
    empty_policy: str = EMPTY_POLICY
    attrs: dict = field(default_factory=dict)

    @property
    def n_channels(self) -> int:
        return self.weights.shape[1]

    def to_dataset(self) -> xr.Dataset:
        """The LUT as a Dataset in the documented layout."""
        n_bins = self.weights.shape[0]
        ds = xr.Dataset(
            {
                "weights": (("bin", "channel", "model"), self.weights.astype(np.float32)),
                "count": (("bin", "channel"), self.count.astype(np.int64)),
                "fit_status": (("bin", "channel"), self.fit_status.astype(np.int8), {
                    "flag_values": list(range(len(FitStatus))), "flag_meanings": FLAG_MEANINGS,
                }),
            },
            coords={"bin": np.arange(n_bins), "model": np.array(self.models, dtype=object)},
        )
        ds.attrs.update(self.attrs)
        if self.empty_policy == EMPTY_POLICY and self.solver in EMPTY_POLICY_DESCRIPTIONS:
            ds.attrs["empty_policy_description"] = EMPTY_POLICY_DESCRIPTIONS[self.solver]
        ds.attrs.update({
            "models": list(self.models), "bin_width": int(self.bin_width), "solver": self.solver,
            "empty_policy": self.empty_policy,
            "bin_index": "b = sum_k floor(x_k / bin_width) * nb^(K-1-k), first model most significant",
        })
        return ds

    @classmethod
    def from_dataset(cls, ds: xr.Dataset, source: str = "LUT") -> "Lut":
        """Read a LUT Dataset back, checking that its shape agrees with its attributes."""
        try:
            models = [str(m) for m in ds.attrs["models"]]
            bin_width = int(ds.attrs["bin_width"])
            weights = ds["weights"].transpose("bin", "channel", "model").values
        except KeyError as missing:
            raise InputError(f"{source}: not an ensir-flow LUT (missing {missing})") from None
        try:
            n_bins = bin_count(len(models), bin_width)
        except ValueError as error:
            raise InputError(f"{source}: {error}") from None
        if weights.ndim != 3 or weights.shape[0] != n_bins or weights.shape[2] != len(models):
            raise InputError(f"{source}: weights shape {weights.shape} does not match {len(models)} models at bin width {bin_width}")
        check_weights(weights, bin_width, source)
        count = ds["count"].transpose("bin", "channel").values if "count" in ds else np.zeros(weights.shape[:2], np.int64)
        status = (ds["fit_status"].transpose("bin", "channel").values if "fit_status" in ds
                  else np.full(weights.shape[:2], FitStatus.INITIAL_WEIGHTS, np.int8))
        for name, array in (("count", count), ("fit_status", status)):
            if array.shape != weights.shape[:2]:
                raise InputError(f"{source}: {name} shape {array.shape} does not match the weights' (bin, channel) {weights.shape[:2]}")
        known = {"models", "bin_width", "solver", "empty_policy"}
        return cls(models, bin_width, weights.astype(np.float32), count, status,
                   str(ds.attrs.get("solver", "em")), str(ds.attrs.get("empty_policy", EMPTY_POLICY)),
                   {k: v for k, v in ds.attrs.items() if k not in known})

    def digest(self) -> str:
        """SHA-256 of the weights and their meaning, recorded in every output made with the LUT."""
        digest = hashlib.sha256(np.ascontiguousarray(self.weights, dtype="<f4").tobytes())
        digest.update(repr((self.models, self.bin_width)).encode())
        return digest.hexdigest()

    def check_matches(self, models: list[str], n_channels: int, source: str) -> None:
        """Refuse to apply this LUT to a store whose models or channels differ."""
        if list(models) != list(self.models):
            raise InputError(f"{source}: LUT models {self.models} do not match the store's models {list(models)}")
        if n_channels != self.n_channels:
            raise InputError(f"{source}: LUT has {self.n_channels} channels, the store has {n_channels}")


def check_weights(weights: np.ndarray, bin_width: int, source: str = "LUT", tolerance: float = SUM_TOLERANCE) -> None:
    """Refuse weights (bin, channel, K) that are not a convex combination in every cell: a weight
    that is not finite or is negative, or weights summing to 1 +- more than `tolerance`. The
    message names `source`, the first bad cell (bin, with its lower edges, and channel) and why."""
    weights = np.asarray(weights)
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(weights).all(axis=2)
        negative = (weights < 0).any(axis=2)
        sums = weights.astype(np.float64).sum(axis=2)
        bad = ~finite | negative | ~(np.abs(sums - 1.0) <= tolerance)
    if not bad.any():
        return
    b, c = (int(i) for i in np.argwhere(bad)[0])
    if not finite[b, c]:
        problem = "a weight that is not finite"
    elif negative[b, c]:
        problem = "a negative weight"
    else:
        problem = f"weights summing to {sums[b, c]:.6g}, not 1 (tolerance {tolerance:g})"
    raise InputError(f"{source}: bin {b} (lower edges {_edges_of(b, weights.shape[2], bin_width)}), channel {c} has {problem} "
                     f"({np.array2string(weights[b, c], separator=', ', precision=6)}); "
                     f"{int(bad.sum())} bad cell(s) in all; not a usable LUT")


def _edges_of(flat_bin: int, n_models: int, bin_width: int) -> tuple:
    """Lower edges (one per model) of a flat bin: the key the paper's code uses for it."""
    nb, edges = ranges_per_model(bin_width), []
    for _ in range(n_models):
        flat_bin, digit = divmod(flat_bin, nb)
        edges.append(digit * bin_width)
    return tuple(reversed(edges))


def fit_lut(statistics: CellStatistics, models: list[str], device: str = "cpu", solver: str = DEFAULT_SOLVER,
            shrinkage: float = 0.0) -> Lut:
    """Fit a LUT from merged statistics with `solver`; empty cells follow `EMPTY_POLICY`.

    em: the paper's EM (weights per cell; `device` is where it runs). lsq: least squares on the
    simplex with `shrinkage` towards the channel-wide solution. average: uniform 1/K everywhere.
    zzpm: the paper's per-image baseline; it has nothing to fit, so the table stays uniform and
    `apply` computes each image's weights from its own predictions.
    """
    n_models, n_channels = statistics.n_models, statistics.n_channels
    if len(models) != n_models:
        raise ValueError(f"{len(models)} model names for statistics of {n_models} models")
    check_solver(solver)
    n_bins = bin_count(n_models, statistics.bin_width)
    weights = np.full((n_bins * n_channels, n_models), 1.0 / n_models)
    count = np.zeros(n_bins * n_channels, dtype=np.int64)
    status = np.full(n_bins * n_channels, FitStatus.EMPTY_FALLBACK, dtype=np.int8)
    count[statistics.cells] = statistics.counts
    if solver in ("average", "zzpm"):
        status[:] = FitStatus.UNIFORM
    elif solver == "lsq":
        cell_weights, channel_ids, channel_weights = lsq.fit_lsq(statistics, shrinkage)
        weights.reshape(n_bins, n_channels, n_models)[:, channel_ids] = channel_weights
        weights[statistics.cells] = cell_weights
        status[statistics.cells] = FitStatus.LEAST_SQUARES
    else:
        channel_stats = statistics.per_channel()
        if len(channel_stats.cells):
            channel_weights, _ = em.fit_em(channel_stats, device)
            weights.reshape(n_bins, n_channels, n_models)[:, channel_stats.cells] = channel_weights
        weights[statistics.cells], status[statistics.cells] = em.fit_em(statistics, device)
    lut = Lut(list(models), statistics.bin_width, weights.reshape(n_bins, n_channels, n_models).astype(np.float32),
              count.reshape(n_bins, n_channels), status.reshape(n_bins, n_channels), solver=solver)
    if solver == "lsq":
        lut.attrs["shrinkage"] = float(shrinkage)
    return lut


def read_paper_lut(path, models: list[str], bin_width: int) -> Lut:
    """Import a LUT saved by the paper's code: {(lower edges per model): [weights per channel]}.

    Only torch's weights-only unpickler is used: a file that would need arbitrary objects (and so
    could run code) is refused. The paper's code writes every bin, so the table must hold exactly
    ceil(256 / w)^K entries for `bin_width` w and the K `models`, each keyed by K lower edges that are
    multiples of w in 0..255, with finite, non-negative weights summing to 1 per channel
    (`check_weights`): a table read at another bin width than its own is refused.
    """
    import torch

    try:
        table = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, ... for unsafe or broken files
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"{path}: not a loadable weights-only EnsIR LUT ({first_line})") from None
    if not isinstance(table, dict) or not table:
        raise InputError(f"{path}: expected a non-empty dict of bin edges to weights")
    n_models = len(models)
    keys = list(table)
    if any(not isinstance(k, tuple) or len(k) != n_models for k in keys):
        raise InputError(f"{path}: keys are not tuples of {n_models} bin edges (one per model {models})")
    try:
        n_bins = bin_count(n_models, bin_width)
    except ValueError as error:
        raise InputError(f"{path}: {error}") from None
    if len(keys) != n_bins:
        raise InputError(f"{path}: holds {len(keys)} bins, but {n_models} models at bin width {bin_width} make "
                         f"{ranges_per_model(bin_width)}^{n_models} = {n_bins} (the paper's code writes every bin): "
                         f"is the bin width right?")
    for key in keys:
        if not all(_is_edge(edge, bin_width) for edge in key):
            raise InputError(f"{path}: key {key} is not a tuple of bin lower edges at bin width {bin_width} "
                             f"(multiples of {bin_width} in 0..255): is the bin width right?")
    flat = flat_bins_of_edges(np.array([[int(edge) for edge in key] for key in keys], dtype=np.int64), bin_width)
    if len(set(flat.tolist())) != len(flat):
        raise InputError(f"{path}: bin edges do not fit bin width {bin_width} (two keys name one bin)")
    n_channels = len(table[keys[0]])
    weights = np.full((n_bins, n_channels, n_models), 1.0 / n_models, dtype=np.float32)
    for index, key in zip(flat, keys):
        try:
            per_channel = np.stack([np.asarray(w, dtype=np.float32).reshape(-1) for w in table[key]])
        except (TypeError, ValueError) as error:
            raise InputError(f"{path}: entry {key} does not hold weights per channel ({error})") from None
        if per_channel.shape != (n_channels, n_models):
            raise InputError(f"{path}: entry {key} holds weights of shape {per_channel.shape}, expected {(n_channels, n_models)}")
        weights[index] = per_channel
    check_weights(weights, bin_width, str(path))
    return Lut(list(models), bin_width, weights, np.zeros((n_bins, n_channels), np.int64),
               np.full((n_bins, n_channels), FitStatus.IMPORTED, np.int8), solver="imported",
               empty_policy="as published", attrs={"imported_from": str(path)})


def _is_edge(edge, bin_width: int) -> bool:
    """Whether `edge` (an int, or a number holding one) is a bin's lower edge at `bin_width`."""
    if isinstance(edge, bool):
        return False
    try:
        value = float(edge)
    except (TypeError, ValueError):
        return False
    return value.is_integer() and 0 <= value <= 255 and int(value) % bin_width == 0
