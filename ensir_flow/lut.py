"""The lookup table: ensemble weights per (bin, channel), its fitting and its interchange forms.

A LUT store holds (see `layout`; `to_dataset` makes it an `xarray.Dataset`), for the bins that
hold a cell with its own weights only, `weights` (bin, channel, model) float32, `count` (bin,
channel) int64 reference pixels, `fit_status` (bin, channel) int8, the bins' digits `bin_digits`
(bin, model) (and flat index `bin` where it fits 64 bits); `fallback_weights` (channel, model) for
every other cell; and attributes `format_version`, `models`, `bin_width`, `solver`, `empty_policy`. The table
ceil(256/w)^K is never built for many models (K = 16 at w = 16 has 2^64 bins). Nothing here reads or writes files
except `read_paper_lut`, which imports a LUT published with the paper's code through torch's
safe (weights-only) loader.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import xarray as xr

from .binning import (
    all_digits,
    bin_count,
    digits_of_words,
    flat_bins_of_digits,
    flat_bins_of_edges,
    flat_index_fits,
    ranges_per_model,
    words_of_digits,
)
from .blend import INDEXED_BINS_LIMIT, HashedWeights, IndexedWeights, weights_with_fallback
from .errors import InputError, first_line
from .fit_status import FLAG_MEANINGS, FitStatus
from .schema import CHANNEL_NAMES, is_integer
from .solvers import DEFAULT_SOLVER, EMPTY_POLICY, FITTABLE, IMPORTED, REGISTRY, fittable
from .stats import ALL_MOMENTS, EM_MOMENTS, CellStatistics, group_starts, key_order

#: The solvers `fit` makes (`solvers.REGISTRY` holds each one's object).
SOLVERS = FITTABLE
#: The solver and empty-cell policy of a LUT imported from the paper's code (`read_paper_lut`).
IMPORTED_SOLVER, IMPORTED_EMPTY_POLICY = IMPORTED.name, IMPORTED.empty_policy
#: MiB of statistics one pass of `fit` gathers at most (estimated), by default; beyond, it reads the
#: reference set once per range of cells (`pipelines.fit`). Its peak is then about twice this plus
#: the chunks being read: 1.16-1.24 GiB for K = 16 at bin width 16 on 10 Mpx.
DEFAULT_PASS_MEMORY_MIB = 160
#: The values a LUT's enumerated attributes may take (`Lut.from_dataset` refuses others): every
#: solver of the registry and its empty-cell policy. Apply blends by `solver` (a per-image solver
#: computes each image's weights), and a value it does not know would be applied as something it is not.
LUT_SOLVERS = tuple(REGISTRY)
EMPTY_POLICIES = tuple(dict.fromkeys(solver.empty_policy for solver in REGISTRY.values()))
#: How far a cell's weights may sum from 1 in a valid LUT (`check_weights`). Every LUT ensir-flow
#: makes or imports is far inside it: EM's weights are (s_k + 1e-6) / n with n >= 100, so they sum
#: to 1 + K * 1e-8 at most; least squares and uniform weights are normalised; float32 storage
#: rounds a sum by about K * 6e-8; the paper's published GoPro LUT sums to 1 within 1.5e-7. A
#: table whose sums are off by more than 1e-3 (a quarter of an 8-bit level at 255) was not made
#: as a convex combination, and blending with it would bias the ensemble.
SUM_TOLERANCE = 1e-3


def moments_for(solvers) -> str:
    """The kind of moments statistics must hold for every solver of `solvers` to fit from them."""
    return ALL_MOMENTS if any(fittable(solver).moments == ALL_MOMENTS for solver in solvers) else EM_MOMENTS


def check_solver(solver: str) -> str:
    """`solver` if `fit` makes LUTs of it (one of SOLVERS), else an InputError listing them."""
    return fittable(solver).name


#: Layout of LUT stores written now (the `format_version` attribute). 1 (no attribute): every bin
#: of the dense table on dimension `bin`. 2: only the bins holding a cell with its own weights, with
#: their digits (and flat index where it fits 64 bits) as coordinates, plus per-channel fallback
#: weights for every other cell.
FORMAT_VERSION = 2
#: Largest dense (nb^K, C, K) float32 table kept in memory or shipped to blend tasks; above it, the
#: stored bins are looked up in a table of rows (`blend.IndexedWeights`) or a hash table
#: (`blend.HashedWeights`). K = 3 is below it at widths of 4 and up (the paper uses 32); at widths 1
#: and 2 it is indexed, to the same bytes.
DENSE_TABLE_LIMIT_BYTES = 64 << 20
#: Bins `check_weights` checks at a time (its temporaries: a few bytes per cell of a block).
CHECK_BLOCK_BINS = 1 << 16
#: The dimensions of a LUT's weights, as stored.
WEIGHT_DIMS = ("bin", "channel", "model")


class Lut:
    """Ensemble weights for models in a fixed order at one bin width, stored sparsely.

    `bin_digits` (m, K) uint8: the bins stored, by their digits floor(x_k / w), sorted (so by flat
    index); `bin_weights` (m, C, K) float32, `bin_count` (m, C) int64 and `bin_status` (m, C) int8
    their cells' weights, reference pixels and `FitStatus`. Every cell of a bin not stored takes
    `fallback` (C, K) with status `fallback_status`. A table given dense (the positional
    `weights`, `count`, `fit_status` over all nb^K bins, without `bin_digits`) stores every bin.
    `weights`, `count` and `fit_status` read back the dense table (for tables small enough).
    """

    def __init__(
        self,
        models: list[str],
        bin_width: int,
        weights: np.ndarray,
        count: np.ndarray,
        fit_status: np.ndarray,
        solver: str = DEFAULT_SOLVER,
        empty_policy: str = EMPTY_POLICY,
        attrs: dict | None = None,
        *,
        bin_digits: np.ndarray | None = None,
        fallback: np.ndarray | None = None,
        fallback_status: int = FitStatus.EMPTY_FALLBACK,
    ):
        self.models, self.bin_width, self.solver, self.empty_policy = list(models), int(bin_width), solver, empty_policy
        self.attrs = dict(attrs or {})
        weights = np.asarray(weights, dtype=np.float32)
        if bin_digits is None:
            bin_digits = all_digits(len(self.models), self.bin_width)
            if len(bin_digits) != len(weights):
                raise ValueError(
                    f"a dense table of {len(self.models)} models at bin width {bin_width} has {len(bin_digits)} bins, "
                    f"not {len(weights)}"
                )
        self.bin_digits = np.asarray(bin_digits, dtype=np.uint8)
        self.bin_weights, self.bin_count, self.bin_status = weights, np.asarray(count), np.asarray(fit_status)
        n_channels, n_models = weights.shape[1:]
        self.fallback = (
            np.full((n_channels, n_models), 1.0 / n_models, np.float32)
            if fallback is None
            else np.asarray(fallback, dtype=np.float32)
        )
        self.fallback_status = int(fallback_status)
        self._dense: dict[str, np.ndarray] = {}

    @property
    def n_channels(self) -> int:
        return self.bin_weights.shape[1]

    @property
    def n_bins(self) -> int:
        """Bins of the whole table, nb^K (a Python int: it may exceed 64 bits)."""
        return bin_count(len(self.models), self.bin_width)

    @property
    def filled_cells(self) -> int:
        """Cells (bin, channel) with reference pixels."""
        return int((self.bin_count > 0).sum())

    @property
    def is_small(self) -> bool:
        """Whether the dense table fits `DENSE_TABLE_LIMIT_BYTES`."""
        return self.n_bins * self.n_channels * len(self.models) * 4 <= DENSE_TABLE_LIMIT_BYTES

    @property
    def weights(self) -> np.ndarray:
        """Dense weights (nb^K, C, K) float32."""
        return self._dense_of("weights", self.bin_weights, self.fallback)

    @property
    def count(self) -> np.ndarray:
        """Dense reference pixels per cell (nb^K, C)."""
        return self._dense_of("count", self.bin_count, np.zeros(self.n_channels, self.bin_count.dtype))

    @property
    def fit_status(self) -> np.ndarray:
        """Dense `FitStatus` per cell (nb^K, C)."""
        return self._dense_of("fit_status", self.bin_status, np.full(self.n_channels, self.fallback_status, np.int8))

    def _dense_of(self, name: str, stored: np.ndarray, fallback: np.ndarray) -> np.ndarray:
        """The dense table of a stored variable (cached, so it reads back as one array)."""
        if name not in self._dense:
            if not self.is_small:
                raise ValueError(
                    f"a LUT of {len(self.models)} models at bin width {self.bin_width} has {self.n_bins} bins: "
                    f"too many for a dense table; use its stored bins (bin_digits, bin_{name.split('_')[-1]})"
                )
            if len(stored) == self.n_bins:
                self._dense[name] = stored
            else:
                dense = np.empty((self.n_bins, *stored.shape[1:]), dtype=stored.dtype)
                dense[:] = fallback
                dense[flat_bins_of_digits(self.bin_digits, self.bin_width)] = stored
                self._dense[name] = dense
        return self._dense[name]

    def lookup_table(self):
        """What blend tasks take: the dense weights when small (the same table, so the same bytes, as
        LUTs have always been applied with), else the stored bins' weights in a `blend.IndexedWeights`
        up to `INDEXED_BINS_LIMIT` bins, a `blend.HashedWeights` beyond: the same bytes each way."""
        if self.is_small:
            return self.weights
        rows = weights_with_fallback(self.bin_weights, self.fallback)
        if self.n_bins <= INDEXED_BINS_LIMIT:
            return IndexedWeights(flat_bins_of_digits(self.bin_digits, self.bin_width), rows, len(self.models), self.bin_width)
        return HashedWeights.of(words_of_digits(self.bin_digits, self.bin_width), rows, len(self.models), self.bin_width)

    def channel_names(self) -> list[str]:
        """'R', 'G', 'B' for 3 channels, 'Y' for 1, else their numbers."""
        return list(CHANNEL_NAMES.get(self.n_channels, [str(c) for c in range(self.n_channels)]))

    def layout(self) -> tuple[dict, dict, dict]:
        """The LUT in the documented layout (format `FORMAT_VERSION`, CF-1.10 attributes), as plain
        arrays: (data variables, coordinates, attributes), each variable a tuple (dims: a tuple,
        values, attributes) as `xarray.Dataset` takes them. `to_dataset` builds the Dataset from it;
        `pipelines.lut_io.write_lut` writes it with zarr alone (fit's start-up without xarray)."""
        n_models = len(self.models)
        coords = {
            "model": (
                ("model",),
                np.array(self.models, dtype=object),
                {"long_name": "base model, in the order of the bin digits"},
            ),
            "channel": (("channel",), np.array(self.channel_names(), dtype=object), {"long_name": "colour channel"}),
            "bin_digits": (
                ("bin", "model"),
                self.bin_digits,
                {"long_name": "range of each model's prediction in the bin: floor(x_k / bin_width)", "units": "1"},
            ),
        }
        if flat_index_fits(n_models, self.bin_width):
            coords["bin"] = (
                ("bin",),
                flat_bins_of_digits(self.bin_digits, self.bin_width),
                {"long_name": "flat bin index sum_k floor(x_k / bin_width) * nb^(K-1-k), first model most significant"},
            )
        data_vars = {
            "weights": (WEIGHT_DIMS, self.bin_weights, {"long_name": "ensemble weight of each model in the cell", "units": "1"}),
            "count": (
                ("bin", "channel"),
                np.asarray(self.bin_count, np.int64),
                {"long_name": "reference pixels in the cell", "units": "1"},
            ),
            "fit_status": (
                ("bin", "channel"),
                np.asarray(self.bin_status, np.int8),
                {
                    "long_name": "how the cell's weights were obtained",
                    "flag_values": np.arange(len(FitStatus), dtype=np.int8),
                    "flag_meanings": FLAG_MEANINGS,
                },
            ),
            "fallback_weights": (
                ("channel", "model"),
                self.fallback,
                {"long_name": "ensemble weights of every cell of a bin not stored", "units": "1"},
            ),
        }
        attrs = dict(self.attrs)
        description = REGISTRY[self.solver].empty_policy_description if self.solver in REGISTRY else None
        if self.empty_policy == EMPTY_POLICY and description is not None:
            attrs["empty_policy_description"] = description
        attrs.update(
            {
                "Conventions": "CF-1.10",
                "format_version": FORMAT_VERSION,
                "models": list(self.models),
                "bin_width": int(self.bin_width),
                "solver": self.solver,
                "empty_policy": self.empty_policy,
                "fallback_fit_status": self.fallback_status,
                "bin_index": "b = sum_k floor(x_k / bin_width) * nb^(K-1-k), first model most significant",
                "bins_stored": "only bins holding a cell with its own weights; every other cell takes fallback_weights "
                "of its channel (fit_status fallback_fit_status)",
            }
        )
        return data_vars, coords, attrs

    def to_dataset(self) -> xr.Dataset:
        """The LUT as a Dataset in the documented layout (`layout`)."""
        import xarray as xr

        data_vars, coords, attrs = self.layout()
        return xr.Dataset(data_vars, coords=coords, attrs=attrs)

    @classmethod
    def from_dataset(cls, ds: xr.Dataset, source: str = "LUT") -> Lut:
        """Read a LUT Dataset back (either format version), checking that it agrees with its attributes."""
        try:
            models, bin_width = ds.attrs["models"], ds.attrs["bin_width"]
            weights = _weights_of(ds, "weights", WEIGHT_DIMS, source)
        except KeyError as missing:
            raise InputError(f"{source}: not an ensir-flow LUT (missing {missing})") from None
        if isinstance(models, str) or not all(isinstance(m, str) for m in models):
            raise InputError(f"{source}: attribute models is {models!r}, not a list of model names")
        models = list(models)
        if "model" in ds.coords and [str(m) for m in ds["model"].values] != models:
            raise InputError(
                f"{source}: the model coordinate {[str(m) for m in ds['model'].values]} disagrees with "
                f"the models attribute {models}"
            )
        if not is_integer(bin_width):
            raise InputError(f"{source}: attribute bin_width is {bin_width!r}, not an integer")
        bin_width = int(bin_width)
        solver = _enumerated(ds, "solver", LUT_SOLVERS, DEFAULT_SOLVER, source)
        empty_policy = _enumerated(ds, "empty_policy", EMPTY_POLICIES, EMPTY_POLICY, source)
        version = ds.attrs.get("format_version", 1)
        if not is_integer(version) or version not in (1, FORMAT_VERSION):
            raise InputError(f"{source}: LUT format version {version!r} is not one this version reads (1, {FORMAT_VERSION})")
        try:
            n_bins = bin_count(len(models), bin_width)
        except ValueError as error:
            raise InputError(f"{source}: {error}") from None
        if weights.ndim != 3 or weights.shape[2] != len(models) or (version == 1 and weights.shape[0] != n_bins):
            raise InputError(
                f"{source}: weights shape {weights.shape} does not match {len(models)} models at bin width {bin_width}"
            )
        sparse = {}
        if version != 1:
            digits = _values_of(ds, "bin_digits", ("bin", "model"), source) if "bin_digits" in ds.coords else None
            fallback = _weights_of(ds, "fallback_weights", ("channel", "model"), source) if "fallback_weights" in ds else None
            if digits is None or fallback is None:
                raise InputError(
                    f"{source}: a format {version} LUT without {'bin_digits' if digits is None else 'fallback_weights'}"
                )
            check_digits(digits, len(weights), len(models), bin_width, source)
            if fallback.shape != weights.shape[1:]:
                raise InputError(
                    f"{source}: fallback_weights shape {fallback.shape}, expected (channel, model) {weights.shape[1:]}"
                )
            check_weights(fallback[None], bin_width, f"{source} (fallback_weights)")
            fallback_status = ds.attrs.get("fallback_fit_status", FitStatus.EMPTY_FALLBACK)
            if not is_integer(fallback_status) or fallback_status not in set(FitStatus):
                raise InputError(
                    f"{source}: attribute fallback_fit_status is {fallback_status!r}, not a fit status ({FLAG_MEANINGS})"
                )
            sparse = {"bin_digits": digits, "fallback": fallback, "fallback_status": int(fallback_status)}
        _check_bin_coordinate(ds, sparse.get("bin_digits"), len(models), bin_width, source)
        check_weights(weights, bin_width, source, digits=sparse.get("bin_digits"))
        for held in (weights, *([sparse["fallback"]] if sparse else [])):
            REGISTRY[solver].check_weights(held, source)
        count = _values_of(ds, "count", ("bin", "channel"), source) if "count" in ds else np.zeros(weights.shape[:2], np.int64)
        status = (
            _values_of(ds, "fit_status", ("bin", "channel"), source)
            if "fit_status" in ds
            else np.full(weights.shape[:2], FitStatus.INITIAL_WEIGHTS, np.int8)
        )
        for name, array in (("count", count), ("fit_status", status)):
            if array.shape != weights.shape[:2]:
                raise InputError(
                    f"{source}: {name} shape {array.shape} does not match the weights' (bin, channel) {weights.shape[:2]}"
                )
        if count.size and (count.dtype.kind not in "iu" or count.min() < 0):
            raise InputError(
                f"{source}: count holds {'a negative' if count.dtype.kind in 'iu' else 'a non-integer'} "
                f"number of reference pixels"
            )
        if status.size and (status.dtype.kind not in "iu" or not np.isin(status, list(FitStatus)).all()):
            raise InputError(f"{source}: fit_status holds a value that is not a fit status ({FLAG_MEANINGS})")
        known = {
            "models",
            "bin_width",
            "solver",
            "empty_policy",
            "format_version",
            "fallback_fit_status",
            "bins_stored",
            "Conventions",
            "bin_index",
        }
        lut = cls(
            models,
            bin_width,
            weights,
            count,
            status,
            solver,
            empty_policy,
            {k: v for k, v in ds.attrs.items() if k not in known},
            **sparse,
        )
        if "channel" in ds.coords and [str(c) for c in ds["channel"].values] != lut.channel_names():
            raise InputError(
                f"{source}: the channel coordinate {[str(c) for c in ds['channel'].values]} disagrees with "
                f"the LUT's {lut.n_channels} channels {lut.channel_names()}"
            )
        return lut

    def digest(self) -> str:
        """SHA-256 of everything a reader of the LUT uses, recorded in every output made with it:
        its models in their order, bin width, solver, empty-cell policy, channels and the layout it
        is written in (`FORMAT_VERSION`), then its cells' weights, reference pixels and statuses:
        of the dense table where it is small (so a table reads to one digest in either format),
        else of the stored bins, with the fallback weights and status of every other cell. Two
        LUTs of one digest blend, report and export alike."""
        header = ("ensir-flow LUT", FORMAT_VERSION, self.models, self.bin_width, self.solver, self.empty_policy, self.n_channels)
        if self.is_small:
            digest = hashlib.sha256(repr((*header, "dense", self.n_bins)).encode())
            arrays = [(self.weights, "<f4"), (self.count, "<i8"), (self.fit_status, "i1")]
        else:
            digest = hashlib.sha256(repr((*header, "stored bins", len(self.bin_digits), self.fallback_status)).encode())
            arrays = [
                (self.bin_digits, "u1"),
                (self.bin_weights, "<f4"),
                (self.bin_count, "<i8"),
                (self.bin_status, "i1"),
                (self.fallback, "<f4"),
            ]
        for array, dtype in arrays:
            digest.update(np.ascontiguousarray(array, dtype=dtype))  # hashed in place: no copy as bytes
        return digest.hexdigest()

    def model_order(self, models: list[str], n_channels: int, source: str) -> tuple[int, ...] | None:
        """Where each of this LUT's models lies among a store's `models`, to read the store's
        predictions in the LUT's order (models are matched by name): None when the orders are the
        same. Refuses a store of other models (naming the missing and the extra ones) or channels."""
        if sorted(models) != sorted(self.models) or len(set(models)) != len(models):
            missing = [name for name in self.models if name not in models]
            extra = [name for name in models if name not in self.models]
            raise InputError(
                f"{source}: LUT made for models {list(self.models)}, the store has {list(models)}"
                + (f"; missing from the store: {', '.join(missing)}" if missing else "")
                + (f"; not in the LUT: {', '.join(extra)}" if extra else "")
            )
        if n_channels != self.n_channels:
            raise InputError(f"{source}: LUT has {self.n_channels} channels, the store has {n_channels}")
        order = tuple(list(models).index(name) for name in self.models)
        return None if order == tuple(range(len(models))) else order


def check_digits(digits: np.ndarray, n_stored: int, n_models: int, bin_width: int, source: str) -> None:
    """Refuse bin digits that are not (n_stored, K) ranges below nb in strictly increasing bin order."""
    if digits.shape != (n_stored, n_models):
        raise InputError(f"{source}: bin_digits shape {digits.shape}, expected {(n_stored, n_models)}")
    if digits.dtype.kind not in "iu":
        raise InputError(f"{source}: bin_digits of type {digits.dtype}, not integers")
    if len(digits) and int(digits.min()) < 0:
        raise InputError(f"{source}: a negative bin digit ({int(digits.min())})")
    if len(digits) and int(digits.max()) >= ranges_per_model(bin_width):
        raise InputError(
            f"{source}: a bin digit of {int(digits.max())} at bin width {bin_width} (at most {ranges_per_model(bin_width) - 1})"
        )
    words = words_of_digits(digits, bin_width)
    if len(group_starts(words)) != len(words) or (key_order(words) != np.arange(len(words))).any():
        raise InputError(f"{source}: bins are not stored once each in increasing order")


def check_weights(
    weights: np.ndarray, bin_width: int, source: str = "LUT", tolerance: float = SUM_TOLERANCE, digits: np.ndarray | None = None
) -> None:
    """Refuse weights (bin, channel, K) that are not a convex combination in every cell: a weight
    that is not finite or is negative, or weights summing to 1 +- more than `tolerance`. The
    message names `source`, the first bad cell (bin, with its lower edges, and channel) and why.
    `digits` (bin, K) names the bins of a sparse table; without them, row b is flat bin b."""
    weights = np.asarray(weights)
    bad_cells = 0
    for start in range(0, len(weights), CHECK_BLOCK_BINS):  # block by block: no table-sized temporaries
        block = weights[start : start + CHECK_BLOCK_BINS]
        with np.errstate(invalid="ignore"):
            finite = np.isfinite(block).all(axis=2)
            negative = (block < 0).any(axis=2)
            sums = block.sum(axis=2, dtype=np.float64)
            bad = ~finite | negative | ~(np.abs(sums - 1.0) <= tolerance)
        if bad_cells == 0 and bad.any():
            row, c = (int(i) for i in np.argwhere(bad)[0])
            b = start + row
            problem = (
                "a weight that is not finite"
                if not finite[row, c]
                else "a negative weight"
                if negative[row, c]
                else f"weights summing to {sums[row, c]:.6g}, not 1 (tolerance {tolerance:g})"
            )
        bad_cells += int(bad.sum())
    if not bad_cells:
        return
    n_models = weights.shape[2]
    if digits is None:
        where = f"bin {b} (lower edges {_edges_of(b, n_models, bin_width)})"
    else:
        edges = tuple(int(d) * bin_width for d in digits[b])
        flat = (
            f"bin {int(flat_bins_of_digits(digits[b : b + 1], bin_width)[0])}" if flat_index_fits(n_models, bin_width) else "bin"
        )
        where = f"{flat} (lower edges {edges}; stored row {b})"
    raise InputError(
        f"{source}: {where}, channel {c} has {problem} "
        f"({np.array2string(weights[b, c], separator=', ', precision=6)}); "
        f"{bad_cells} bad cell(s) in all; not a usable LUT"
    )


def _enumerated(ds: xr.Dataset, name: str, allowed: tuple[str, ...], default: str, source: str) -> str:
    """Attribute `name` of a LUT (`default` where it has none), refused unless one of `allowed`."""
    value = ds.attrs.get(name, default)
    if not isinstance(value, str) or value not in allowed:
        raise InputError(f"{source}: attribute {name} is {value!r}, not one of {', '.join(allowed)}")
    return value


def _values_of(ds: xr.Dataset, name: str, dims: tuple[str, ...], source: str) -> np.ndarray:
    """Values of variable `name` with its dimensions in the order `dims`; an InputError naming it when
    it has other dimensions (a LUT edited by hand), rather than xarray's ValueError."""
    if set(ds[name].dims) != set(dims):
        raise InputError(f"{source}: {name} has dimensions {ds[name].dims}, expected {dims}")
    return ds[name].transpose(*dims).values


def _weights_of(ds: xr.Dataset, name: str, dims: tuple[str, ...], source: str) -> np.ndarray:
    """`_values_of` a variable of weights, refused unless floating point (booleans, integers or
    strings are no LUT's weights, and `check_weights` could not even compare them)."""
    values = _values_of(ds, name, dims, source)
    if values.dtype.kind != "f":
        raise InputError(f"{source}: {name} are of type {values.dtype}, not floating point; not a usable LUT")
    return values


def _check_bin_coordinate(ds: xr.Dataset, digits: np.ndarray | None, n_models: int, bin_width: int, source: str) -> None:
    """Refuse a `bin` coordinate that disagrees with the bins the rows hold: 0..nb^K-1 in a format-1
    LUT, the flat index of `bin_digits` in a format-2 one (where it fits 64 bits). Apply reads the
    rows by their digits (format 1: by position), so a disagreeing coordinate means an edited LUT
    whose rows are not the bins its coordinate says."""
    if "bin" not in ds.coords:
        return
    stored = ds["bin"].values
    if digits is None:
        expected = np.arange(bin_count(n_models, bin_width))
    elif flat_index_fits(n_models, bin_width):
        expected = flat_bins_of_digits(digits, bin_width)
    else:
        raise InputError(
            f"{source}: a bin coordinate, but the flat index of {n_models} models at bin width {bin_width} "
            f"does not fit 64 bits (bins are named by bin_digits only)"
        )
    if stored.shape != expected.shape or stored.dtype.kind not in "iu" or (stored != expected).any():
        first = int(np.flatnonzero(stored != expected)[0]) if stored.shape == expected.shape and stored.dtype.kind in "iu" else 0
        raise InputError(
            f"{source}: the bin coordinate disagrees with the bins stored (row {first}: bin "
            f"{stored[first] if len(stored) else None}, {'its digits make' if digits is not None else 'expected'} "
            f"{int(expected[first]) if len(expected) else None})"
        )


def _edges_of(flat_bin: int, n_models: int, bin_width: int) -> tuple:
    """Lower edges (one per model) of a flat bin: the key the paper's code uses for it."""
    nb, edges = ranges_per_model(bin_width), []
    for _ in range(n_models):
        flat_bin, digit = divmod(flat_bin, nb)
        edges.append(digit * bin_width)
    return tuple(reversed(edges))


def fit_lut(
    statistics: CellStatistics,
    models: list[str],
    device: str = "cpu",
    solver: str = DEFAULT_SOLVER,
    shrinkage: float = 0.0,
    channels: CellStatistics | None = None,
) -> Lut:
    """Fit a LUT from merged statistics with `solver` (its object in `solvers.REGISTRY` fits the
    cells and the fallback); empty cells follow `EMPTY_POLICY`.

    `device` is where the solver may run (em's EM). `shrinkage`: the value of the solver's tuned
    hyperparameter, if it has one (`Solver.tuning`: lsq's shrinkage towards the channel-wide
    solution), recorded in the LUT's attributes. A per-image solver (zzpm) fits nothing per cell:
    its table stays uniform and `apply` computes each image's weights. Only the bins holding
    reference pixels are stored; every other cell takes its channel's fallback weights.

    `channels`: the statistics of each whole channel, from which the fallback is fitted (the
    default: `statistics.per_channel()`); given when `statistics` hold one range of cells of a
    larger set, so that the LUT of each range is the run of the whole set's LUT that holds its bins.
    """
    n_models, n_channels = statistics.n_models, statistics.n_channels
    if len(models) != n_models:
        raise ValueError(f"{len(models)} model names for statistics of {n_models} models")
    method = fittable(solver)
    tuned = {} if method.tuning is None else {method.tuning.parameter: shrinkage}
    bin_words, row = statistics.bins()
    channel = statistics.channels
    cells = method.fit(statistics, channels, device, **tuned)
    weights = np.repeat(cells.fallback[None].astype(np.float32), len(bin_words), axis=0)  # as stored: no float64 copy
    weights[row, channel] = cells.weights
    count = np.zeros((len(bin_words), n_channels), np.int64)
    count[row, channel] = statistics.counts
    status = np.full((len(bin_words), n_channels), cells.fallback_status, np.int8)
    status[row, channel] = cells.status
    lut = Lut(
        list(models),
        statistics.bin_width,
        weights,
        count,
        status,
        solver=solver,
        bin_digits=digits_of_words(bin_words, n_models, statistics.bin_width),
        fallback=cells.fallback.astype(np.float32),
        fallback_status=cells.fallback_status,
    )
    lut.attrs.update({parameter: float(value) for parameter, value in tuned.items()})
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
        raise InputError(f"{path}: not a loadable weights-only EnsIR LUT ({first_line(error)})") from None
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
        raise InputError(
            f"{path}: holds {len(keys)} bins, but {n_models} models at bin width {bin_width} make "
            f"{ranges_per_model(bin_width)}^{n_models} = {n_bins} (the paper's code writes every bin): "
            f"is the bin width right?"
        )
    for key in keys:
        if not all(_is_edge(edge, bin_width) for edge in key):
            raise InputError(
                f"{path}: key {key} is not a tuple of bin lower edges at bin width {bin_width} "
                f"(multiples of {bin_width} in 0..255): is the bin width right?"
            )
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
    return Lut(
        list(models),
        bin_width,
        weights,
        np.zeros((n_bins, n_channels), np.int64),
        np.full((n_bins, n_channels), FitStatus.IMPORTED, np.int8),
        solver=IMPORTED_SOLVER,
        empty_policy=IMPORTED_EMPTY_POLICY,
        attrs={"imported_from": str(path)},
    )


def _is_edge(edge, bin_width: int) -> bool:
    """Whether `edge` (an int, or a number holding one) is a bin's lower edge at `bin_width`."""
    if isinstance(edge, bool):
        return False
    try:
        value = float(edge)
    except (TypeError, ValueError):
        return False
    return value.is_integer() and 0 <= value <= 255 and int(value) % bin_width == 0
