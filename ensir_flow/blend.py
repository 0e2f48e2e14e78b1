"""Applying a LUT: each pixel-channel's output is the LUT-weighted sum of the K predictions.

out = floor(sum_k w_k[b, c] * x_k + 0.5), clipped to 0..255, with the sum taken in float32 in
model order, as the paper's code does, so that outputs match it to the last bit wherever the
weights do.
"""

import hashlib
import threading
import weakref

import numba
import numpy as np

from .binning import bin_count, group_places, place_tables, place_values
from .devices import resolve_device
from .kernel_cache import CACHE
from .kernels import blend_hashed_into, blend_indexed_into, blend_into, digit_multiplier, fill_cuckoo_slots

#: Names of the combinations in evaluation results, next to the models' own names.
AVERAGE, ZZPM, ENSEMBLE = "average", "zzpm", "ensemble"

#: Most bins nb^K of a LUT whose bins `IndexedWeights` looks up in a dense table of rows (at most
#: 64 MB: K = 8 at w = 32, K = 6 at w = 16); `lut.Lut.lookup_table` takes a `HashedWeights` above it.
INDEXED_BINS_LIMIT = 1 << 24


class SparseWeights:
    """A sparse LUT as blend tasks take it: `weights` (m + 1, C, K) float32, the m stored bins'
    then, last, the `fallback` every other cell takes, and a way to find a bin's row (the
    subclasses); one graph key, sent once to each worker."""

    weights: np.ndarray
    bin_width: int

    @property
    def fallback(self) -> np.ndarray:
        """The weights (C, K) of every cell not stored."""
        return self.weights[-1]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(stored bins, C, K), as a dense table's shape reads."""
        return (len(self.weights) - 1, *self.weights.shape[1:])

    def __sizeof__(self) -> int:
        """Bytes held, arrays included (what dask's `sizeof` and a worker's memory accounting read)."""
        return object.__sizeof__(self) + sum(value.nbytes for value in vars(self).values() if isinstance(value, np.ndarray))

    @staticmethod
    def _check_rows(rows: np.ndarray, n_bins: int) -> None:
        if rows.shape[0] != n_bins + 1 or rows.dtype != np.float32:
            raise ValueError(f"weights of shape {rows.shape} ({rows.dtype}) are not {n_bins} bins' float32 rows and the fallback")


class HashedWeights(SparseWeights):
    """`SparseWeights` whose bins are found in a cuckoo table of their key words
    (`binning.words_of_digits`): `slot_keys` (S, W) (-1: free) and `slot_rows` (S + 1,), S a power
    of two at least 2.5 times the m bins (`slot_shift` = 64 - log2 S), so every key sits in one of
    its two slots and a lookup compares both, never a chain (free slots and the extra last slot give
    the fallback's row). Built once per LUT by `of`."""

    def __init__(self, slot_keys: np.ndarray, slot_rows: np.ndarray, slot_shift: int, weights: np.ndarray, bin_width: int):
        self.slot_keys, self.slot_rows, self.slot_shift = slot_keys, slot_rows, int(slot_shift)
        self.weights, self.bin_width = weights, int(bin_width)

    @classmethod
    def of(cls, keys: np.ndarray, rows: np.ndarray, n_models: int, bin_width: int) -> "HashedWeights":
        """Hash the stored bins' unique key words (m, W) of a LUT of `n_models` at `bin_width`, whose
        weights are `rows` (m + 1, C, K) float32, the fallback last (`weights_with_fallback`)."""
        keys = np.ascontiguousarray(keys, dtype=np.int64)
        n_bins = len(keys)
        cls._check_rows(rows, n_bins)
        n_slots = 8
        while n_slots < 2.5 * n_bins:
            n_slots *= 2
        while True:
            slot_keys, slot_rows = (
                np.full((n_slots, keys.shape[1]), -1, dtype=np.int64),
                np.full(n_slots + 1, n_bins, dtype=np.int64),
            )
            shift = 64 - (n_slots.bit_length() - 1)
            if fill_cuckoo_slots(keys, slot_keys, slot_rows, np.uint64(shift)):
                break
            if n_slots > 64 * max(n_bins, 1):
                raise ValueError(f"no cuckoo table of up to {n_slots} slots holds these {n_bins} bins: they need unique keys")
            n_slots *= 2
        return cls(slot_keys, slot_rows, shift, rows, bin_width)


#: Row tables of `IndexedWeights` in use, by the stored bins they index: LUTs of the same bins
#: (evaluate's solvers on one fold) share one (held weakly: freed with the last LUT using it).
_ROW_TABLES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_ROW_TABLES_LOCK = threading.Lock()


class IndexedWeights(SparseWeights):
    """`SparseWeights` of a LUT of at most `INDEXED_BINS_LIMIT` bins nb^K (K = 8 at w = 32 has 16.7
    million), whose bins are found in a dense table of each bin's row, uint16 where the rows allow:
    one read, where the cuckoo table of `HashedWeights` hashes and compares (1.4x its speed at K =
    8). The table (33 MB at K = 8, w = 32) is built where it is first used and never pickled: a
    blend task's worker receives the stored bins' flat indices and weights (one graph key) and
    builds it once; LUTs of the same stored bins share it."""

    def __init__(self, flat_bins: np.ndarray, rows: np.ndarray, n_models: int, bin_width: int):
        """`flat_bins` (m,) the stored bins' flat indices, increasing, `rows` (m + 1, C, K) float32
        their weights then the fallback (`weights_with_fallback`)."""
        self.flat_bins, self.weights = np.ascontiguousarray(flat_bins, dtype=np.int64), rows
        self.n_models, self.bin_width = int(n_models), int(bin_width)
        self._check_rows(rows, len(self.flat_bins))
        n_bins = bin_count(self.n_models, self.bin_width)
        if n_bins > INDEXED_BINS_LIMIT:
            raise ValueError(
                f"{n_models} models at bin width {bin_width} have {n_bins} bins: more than an indexed table "
                f"holds ({INDEXED_BINS_LIMIT}); use HashedWeights"
            )
        if len(self.flat_bins) and (
            np.any(np.diff(self.flat_bins) <= 0) or self.flat_bins[0] < 0 or self.flat_bins[-1] >= n_bins
        ):
            raise ValueError(f"the stored bins of an indexed table must be increasing flat indices below {n_bins}")
        self._row_of_bin, self._building = None, threading.Lock()

    def __getstate__(self) -> dict:
        return {"flat_bins": self.flat_bins, "weights": self.weights, "n_models": self.n_models, "bin_width": self.bin_width}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["flat_bins"], state["weights"], state["n_models"], state["bin_width"])

    @property
    def row_of_bin(self) -> np.ndarray:
        """Row of `weights` (nb^K,) of every bin: built on first use (once, whatever the threads),
        or taken from a LUT of the same stored bins."""
        with self._building:
            if self._row_of_bin is None:
                dtype = np.uint16 if len(self.weights) <= np.iinfo(np.uint16).max else np.int32
                key = (hashlib.blake2b(self.flat_bins.data, digest_size=16).digest(), self.n_models, self.bin_width, dtype)
                with _ROW_TABLES_LOCK:
                    row_of_bin = _ROW_TABLES.get(key)
                if row_of_bin is None:
                    row_of_bin = np.full(bin_count(self.n_models, self.bin_width), len(self.flat_bins), dtype)
                    row_of_bin[self.flat_bins] = np.arange(len(self.flat_bins))
                    with _ROW_TABLES_LOCK:
                        row_of_bin = _ROW_TABLES.setdefault(key, row_of_bin)
                self._row_of_bin = row_of_bin
        return self._row_of_bin


#: The arrays `rows_with_spare_row` made, by id (held weakly): only into these does
#: `weights_with_fallback` write a fallback row, never into an array a caller made.
_WITH_SPARE_ROW: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def rows_with_spare_row(n_bins: int, n_channels: int, n_models: int) -> np.ndarray:
    """An unfilled float32 array (n_bins + 1, C, K) for a LUT's weights in its leading rows (as
    `pipelines.lut_io.read_lut` reads them), whose last row `weights_with_fallback` fills with the
    fallback instead of copying the weights."""
    rows = np.empty((n_bins + 1, n_channels, n_models), np.float32)
    _WITH_SPARE_ROW[id(rows)] = rows
    return rows


def weights_with_fallback(weights: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """The rows `HashedWeights` takes (m + 1, C, K) float32: the stored bins' `weights` (m, C, K),
    then the `fallback` (C, K). Where `weights` are the leading rows of an array of
    `rows_with_spare_row`, the fallback is written into its last row and that array returned;
    otherwise the rows are copied into a new one."""
    owner = weights.base
    if (
        owner is not None
        and _WITH_SPARE_ROW.get(id(owner)) is owner
        and owner.shape == (len(weights) + 1, *weights.shape[1:])
        and weights.dtype == np.float32
        and weights.flags.c_contiguous
        and weights.ctypes.data == owner.ctypes.data
    ):
        owner[-1] = fallback
        return owner
    return np.concatenate([np.asarray(weights, dtype=np.float32), np.asarray(fallback, dtype=np.float32)[None]])


def blend(predictions: np.ndarray, weights, bin_width: int, device: str = "cpu") -> np.ndarray:
    """Ensemble of predictions uint8 (K, P, C) with LUT weights, dense (bins, C, K),
    `IndexedWeights` or `HashedWeights` (`lut.Lut.lookup_table` chooses): uint8 (P, C).

    numba on the CPU; dense tables in torch on other devices ('auto' resolved where it runs), same
    bytes. Sparse tables are always looked up on the CPU.
    """
    predictions = np.ascontiguousarray(predictions, dtype=np.uint8)
    if isinstance(weights, SparseWeights):
        return _blend_sparse(predictions, weights)
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    n_models, n_pixels, n_channels = predictions.shape
    if weights.shape[1:] != (n_channels, n_models):
        raise ValueError(f"weights of shape {weights.shape} do not fit predictions of shape {predictions.shape}")
    device = resolve_device(device)
    if device != "cpu":
        return blend_torch(predictions, weights, bin_width, device)
    out = np.empty((n_pixels, n_channels), dtype=np.uint8)
    blend_into(predictions, weights, place_tables(n_models, bin_width), out)
    return out


def _blend_sparse(predictions: np.ndarray, table: SparseWeights) -> np.ndarray:
    """`blend` with a sparse LUT's `HashedWeights` or `IndexedWeights`, on the CPU."""
    n_models, n_pixels, n_channels = predictions.shape
    if table.weights.shape[1:] != (n_channels, n_models):
        raise ValueError(f"weights of shape {table.weights.shape} do not fit predictions of shape {predictions.shape}")
    out = np.empty((n_pixels, n_channels), dtype=np.uint8)
    places, word_of_model = group_places(n_models, table.bin_width)
    multiplier = digit_multiplier(table.bin_width)
    if isinstance(table, IndexedWeights):
        blend_indexed_into(predictions, multiplier, places.astype(np.int32), table.row_of_bin, table.weights, out)
    else:
        blend_hashed_into(
            predictions,
            multiplier,
            places.astype(np.float64),
            word_of_model,
            table.slot_keys,
            table.slot_rows,
            np.uint64(table.slot_shift),
            table.weights,
            out,
        )
    return out


def blend_torch(predictions: np.ndarray, weights: np.ndarray, bin_width: int, device: str) -> np.ndarray:
    """`blend` in torch on `device`: the same float32 products and sums in model order."""
    import torch

    n_models, _, n_channels = predictions.shape
    x = torch.as_tensor(predictions).to(device)
    table = torch.as_tensor(weights).to(device)
    places = torch.as_tensor(place_values(n_models, bin_width), device=device)
    bins = sum(places[k][x[k].long()] for k in range(n_models))
    selected = table[bins, torch.arange(n_channels, device=device)]  # (P, C, K)
    acc = torch.zeros(bins.shape, dtype=torch.float32, device=device)
    for k in range(n_models):
        acc = acc + selected[:, :, k] * x[k].float()
    return torch.floor(acc + 0.5).clamp(0, 255).to(torch.uint8).cpu().numpy()


#: The baselines' numba kernels below: no GIL (evaluate scores images in parallel), cached on disk.
#: They repeat numpy's float operations one for one, so their bytes are those of the numpy
#: expressions they replaced (tests/test_blend.py compares them on every possible input sum).
_KERNEL_OPTIONS = {"nogil": True, "cache": CACHE}
#: numpy's pairwise summation: blocks of up to 128 values, summed with 8 accumulators.
PAIRWISE_BLOCK = 128


def average(predictions: np.ndarray) -> np.ndarray:
    """Plain average of the K predictions (K, ...) uint8 rounded half up to uint8: the baseline.

    The operations of `np.floor(x.astype(np.float32).mean(axis=0) + np.float32(0.5))`: the sum
    of the K values (exact), divided by K in float64 and rounded to float32, then + 0.5 and the
    floor in float32; one pass, without the float32 copy of the predictions.
    """
    predictions = np.ascontiguousarray(predictions, dtype=np.uint8)
    out = np.empty(predictions.shape[1:], dtype=np.uint8)
    _average_into(predictions.reshape(len(predictions), -1), out.reshape(-1))
    return out


@numba.njit(**_KERNEL_OPTIONS)
def _average_into(predictions, out):
    """out (N,) = `average` of predictions (K, N)."""
    n_models = predictions.shape[0]
    for t in range(predictions.shape[1]):
        total = 0.0
        for k in range(n_models):
            total += np.float64(predictions[k, t])
        out[t] = np.uint8(np.floor(np.float32(total / n_models) + np.float32(0.5)))


def squared_distance_sums(predictions: np.ndarray) -> np.ndarray:
    """sum over pixels and channels of (x_k - per-pixel mean)^2, per model (K,): additive over
    pieces of an image, so ZZPM's image-wide weights can be gathered chunk by chunk.

    The float64 values and the order of numpy's `((x - x.mean(axis=0)) ** 2).sum()` over each
    model's values (its pairwise summation), so the same bits, in one pass without float64 copies.
    """
    predictions = np.ascontiguousarray(predictions, dtype=np.uint8)
    sums = np.zeros(len(predictions))
    values = predictions.reshape(len(predictions), -1)
    if values.shape[1]:
        _pairwise_squared_distances(
            values, 0, values.shape[1], sums, np.empty((len(values), PAIRWISE_BLOCK)), np.empty(PAIRWISE_BLOCK)
        )
    return sums


@numba.njit(**_KERNEL_OPTIONS)
def _pairwise_squared_distances(predictions, start, n, sums, squares, mean):
    """sums[k] = numpy's pairwise sum of (x_k - mean)^2 over values start:start + n of
    predictions (K, N): halves (the first a multiple of 8) summed separately down to blocks of at
    most 128; `squares` (K, 128) and `mean` (128,) are scratch."""
    if n > PAIRWISE_BLOCK:
        half = n // 2
        half -= half % 8
        second = np.empty(len(sums))
        _pairwise_squared_distances(predictions, start, half, sums, squares, mean)
        _pairwise_squared_distances(predictions, start + half, n - half, second, squares, mean)
        for k in range(len(sums)):
            sums[k] += second[k]
        return
    n_models = predictions.shape[0]
    mean[:n] = 0.0
    for k in range(n_models):
        for t in range(n):
            mean[t] += np.float64(predictions[k, start + t])
    for t in range(n):
        mean[t] = mean[t] / n_models
    for k in range(n_models):
        square = squares[k]
        for t in range(n):
            distance = np.float64(predictions[k, start + t]) - mean[t]
            square[t] = distance * distance
        sums[k] = _block_sum(square, n)


@numba.njit(inline="always")
def _block_sum(values, n):
    """numpy's sum of values[:n] (n <= 128): 8 accumulators, combined pairwise, then the rest."""
    if n < 8:
        total = -0.0
        for t in range(n):
            total += values[t]
        return total
    r0, r1, r2, r3, r4, r5, r6, r7 = values[0], values[1], values[2], values[3], values[4], values[5], values[6], values[7]
    t = 8
    while t < n - n % 8:
        r0 += values[t]
        r1 += values[t + 1]
        r2 += values[t + 2]
        r3 += values[t + 3]
        r4 += values[t + 4]
        r5 += values[t + 5]
        r6 += values[t + 6]
        r7 += values[t + 7]
        t += 8
    total = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while t < n:
        total += values[t]
        t += 1
    return total


def zzpm_weights(mean_squared_distance: np.ndarray) -> np.ndarray:
    """ZZPM's image-wide weights softmax_k(1 / (1e-3 + MSE_k)) (the paper's other baseline)."""
    logits = 1.0 / (1e-3 + np.asarray(mean_squared_distance, dtype=np.float64))
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return weights / weights.sum(axis=-1, keepdims=True)


def blend_spans(predictions: np.ndarray, weights: np.ndarray, spans) -> np.ndarray:
    """Weighted sum with one weight vector per span of pixels: weights (n, K), spans [(start, stop, ...)]."""
    out = np.empty(predictions.shape[1:], dtype=np.uint8)
    for (start, stop, *_), w in zip(spans, weights):
        part = np.tensordot(w, predictions[:, start:stop].astype(np.float64), axes=1)
        _round_half_up_into(part.reshape(-1), out[start:stop].reshape(-1))
    return out


@numba.njit(**_KERNEL_OPTIONS)
def _round_half_up_into(values, out):
    """out = floor(values + 0.5) clipped to 0..255, as uint8 (float64 values (N,))."""
    for t in range(len(values)):
        value = np.floor(values[t] + 0.5)
        out[t] = 0 if value < 0 else (255 if value > 255 else np.uint8(value))


def zzpm(predictions: np.ndarray) -> np.ndarray:
    """ZZPM on one whole image (K, ...), rounded half up to uint8."""
    size = predictions[0].size
    weights = zzpm_weights(squared_distance_sums(predictions) / size)
    return blend_spans(predictions, weights[None], [(0, predictions.shape[1])])
