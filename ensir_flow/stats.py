"""Additive sufficient statistics of a reference set, per LUT cell (bin, channel).

Ground truth y is an 8-bit integer, so a cell's y values are fully described by their 256-level
histogram, and everything the solvers need is a sum over pixels: n, sum x_k, the cross products
sum x_i x_j (i <= j) and sum x_k y, plus the histogram. EnsIR's EM uses n, sum x_k, sum x_k^2 and
sum (K x_k - sum_j x_j)^2 (derived exactly from the cross products) and the histogram; least
squares uses the cross products and sum x_k y. Statistics of a chunk are computed once;
statistics of many chunks are merged by adding. All of it is int64, so the result is identical
whatever the chunking and the order of merging.

The table is sparse: only cells (and histogram levels) that hold pixels are stored, so it stays
small when K and the bin count are large (K = 5 at bin width 16 has 3 million cells per
channel triple, almost all empty).
"""

from dataclasses import dataclass

import numba
import numpy as np

from .binning import LEVELS, bin_count, place_tables, place_values
from .devices import resolve_device
from .kernels import accumulate_dense, accumulate_moments, cell_indices

#: Largest dense scratch table (cells x 256 levels) a chunk may use; above it, sort instead.
DENSE_HISTOGRAM_LIMIT = 1 << 22


def moment_columns(n_models: int) -> int:
    """Columns of the moments table: n, sum x_k, sum x_i x_j (i <= j, row-major), sum x_k y."""
    return 1 + n_models + n_models * (n_models + 1) // 2 + n_models


@dataclass(frozen=True)
class CellStatistics:
    """Sparse additive statistics of pixels grouped by cell (flat bin * n_channels + channel).

    cells: sorted unique cell ids (m,); moments: int64 (m, `moment_columns(K)`) with columns
    [n, sum x_1..x_K, sum x_i x_j for i <= j (row-major), sum x_1 y..x_K y];
    hist_keys: sorted unique cell * 256 + y; hist_counts: how many pixels have that (cell, y).
    """

    n_models: int
    n_channels: int
    bin_width: int
    cells: np.ndarray
    moments: np.ndarray
    hist_keys: np.ndarray
    hist_counts: np.ndarray

    @property
    def n_cells(self) -> int:
        """Number of possible cells (bins x channels), empty ones included."""
        return bin_count(self.n_models, self.bin_width) * self.n_channels

    @property
    def n_pixels(self) -> int:
        """Number of pixel-channels the statistics describe."""
        return int(self.moments[:, 0].sum())

    @property
    def counts(self) -> np.ndarray:
        """Pixels per cell (m,)."""
        return self.moments[:, 0]

    @property
    def sums(self) -> np.ndarray:
        """sum x_k per cell (m, K)."""
        return self.moments[:, 1: 1 + self.n_models]

    def cross_products(self) -> np.ndarray:
        """Symmetric sum x_i x_j per cell (m, K, K), int64."""
        k = self.n_models
        upper = self.moments[:, 1 + k: 1 + k + k * (k + 1) // 2]
        rows, cols = np.triu_indices(k)
        out = np.empty((len(upper), k, k), dtype=np.int64)
        out[:, rows, cols] = upper
        out[:, cols, rows] = upper
        return out

    @property
    def sums_xy(self) -> np.ndarray:
        """sum x_k y per cell (m, K)."""
        return self.moments[:, -self.n_models:]

    def squared_deviations(self) -> np.ndarray:
        """sum over pixels of (K x_k - sum_j x_j)^2 per cell (m, K): K^2 times the squared
        distance of model k to the per-pixel mean, exact in integers."""
        k = self.n_models
        cross = self.cross_products()
        diagonal = np.diagonal(cross, axis1=1, axis2=2)
        return k * k * diagonal - 2 * k * cross.sum(axis=2) + cross.sum(axis=(1, 2))[:, None]

    def dense_histograms(self, rows: np.ndarray) -> np.ndarray:
        """Histograms (len(rows), 256) of y for the given rows of `cells`."""
        wanted = self.cells[rows]
        hist_cells = self.hist_keys // LEVELS
        lo = np.searchsorted(hist_cells, wanted, side="left")
        hi = np.searchsorted(hist_cells, wanted, side="right")
        out = np.zeros((len(rows), LEVELS), dtype=np.int64)
        lengths = hi - lo
        row_of_entry = np.repeat(np.arange(len(rows)), lengths)
        entries = np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)]) if len(rows) else np.empty(0, np.int64)
        out[row_of_entry, self.hist_keys[entries] % LEVELS] = self.hist_counts[entries]
        return out

    def per_channel(self) -> "CellStatistics":
        """Statistics of each whole channel, as if every bin were one (used for empty cells)."""
        channel_of_cell = self.cells % self.n_channels
        channels, moments = sum_by_key(channel_of_cell, self.moments)
        hist_channel = (self.hist_keys // LEVELS) % self.n_channels
        keys, counts = sum_by_key(hist_channel * LEVELS + self.hist_keys % LEVELS, self.hist_counts)
        return CellStatistics(self.n_models, self.n_channels, LEVELS, channels, moments, keys, counts)


@numba.njit(nogil=True, cache=True)
def _scatter_add(keys, values, out):
    for i in range(len(keys)):
        out[keys[i]] += values[i]


def sum_by_key(keys: np.ndarray, values: np.ndarray, key_space: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique keys and the sum of `values` rows sharing each key (exact in integers).

    Keys below a known `key_space` small enough for a dense table are summed in place; otherwise
    they are sorted. Rows that sum to all zeros are dropped in the dense case (statistics never
    hold such rows: every stored cell and level has a non-zero count).
    """
    if key_space is not None and key_space * (values[0].size if len(values) else 1) <= DENSE_HISTOGRAM_LIMIT:
        dense = np.zeros((key_space, *values.shape[1:]), dtype=values.dtype)
        _scatter_add(keys, values, dense)
        present = np.flatnonzero(dense.reshape(key_space, -1).any(axis=1))
        return present.astype(np.int64), dense[present]
    order = np.argsort(keys)
    keys, values = keys[order], values[order]
    if len(keys) == 0:
        return keys, values
    starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
    return keys[starts], np.add.reduceat(values, starts, axis=0)


def empty_statistics(n_models: int, n_channels: int, bin_width: int) -> CellStatistics:
    """Statistics of no pixels: the identity of `merge`."""
    return CellStatistics(
        n_models, n_channels, bin_width,
        np.empty(0, np.int64), np.empty((0, moment_columns(n_models)), np.int64),
        np.empty(0, np.int64), np.empty(0, np.int64),
    )


def merge(*parts: CellStatistics) -> CellStatistics:
    """Statistics of the union of the pixels of `parts` (they must share K, C and bin width)."""
    first = parts[0]
    for part in parts[1:]:
        if (part.n_models, part.n_channels, part.bin_width) != (first.n_models, first.n_channels, first.bin_width):
            raise ValueError("cannot merge statistics of different models, channels or bin widths")
    if len(parts) == 1:
        return first
    n_cells = first.n_cells
    cells, moments = sum_by_key(np.concatenate([p.cells for p in parts]), np.concatenate([p.moments for p in parts]), n_cells)
    keys, counts = sum_by_key(np.concatenate([p.hist_keys for p in parts]), np.concatenate([p.hist_counts for p in parts]),
                              n_cells * LEVELS)
    return CellStatistics(first.n_models, first.n_channels, first.bin_width, cells, moments, keys, counts)


def fold_statistics(predictions: np.ndarray, ground_truth: np.ndarray, bin_width: int,
                    spans: list[tuple[int, int, int]], n_folds: int, device: str = "cpu") -> list[CellStatistics]:
    """Statistics per fold of one chunk whose pixels are split into (start, stop, fold) spans
    (used to keep cross-validation folds of images apart in the same single pass)."""
    n_models, _, n_channels = predictions.shape
    parts: list[list[CellStatistics]] = [[] for _ in range(n_folds)]
    for start, stop, fold in spans:
        parts[fold].append(chunk_statistics(predictions[:, start:stop], ground_truth[start:stop], bin_width, device))
    return [merge(*p) if p else empty_statistics(n_models, n_channels, bin_width) for p in parts]


def merge_folds(*per_fold: list[CellStatistics]) -> list[CellStatistics]:
    """Fold-wise `merge` of several `fold_statistics` results."""
    return [merge(*fold) for fold in zip(*per_fold)]


def chunk_statistics(predictions: np.ndarray, ground_truth: np.ndarray, bin_width: int, device: str = "cpu") -> CellStatistics:
    """Statistics of one chunk: predictions uint8 (K, P, C), ground truth uint8 (P, C).

    On the CPU (numba) it uses a dense scratch table when the cell count is small enough (the
    common case: one fused pass), else sorts the chunk's cell ids, so memory stays bounded by the
    chunk size either way. Other devices ('auto' resolved per worker, 'cuda') use torch; the
    integer results are identical.
    """
    device = resolve_device(device)
    if device != "cpu":
        return chunk_statistics_torch(predictions, ground_truth, bin_width, device)
    predictions = np.ascontiguousarray(predictions, dtype=np.uint8)
    ground_truth = np.ascontiguousarray(ground_truth, dtype=np.uint8)
    n_models, n_pixels, n_channels = predictions.shape
    if ground_truth.shape != (n_pixels, n_channels):
        raise ValueError(f"ground truth shape {ground_truth.shape} does not match predictions {predictions.shape}")
    places = place_tables(n_models, bin_width)
    n_cells = bin_count(n_models, bin_width) * n_channels
    if n_cells * LEVELS <= DENSE_HISTOGRAM_LIMIT:
        moments = np.zeros((n_cells, moment_columns(n_models)), dtype=np.int64)
        histogram = np.zeros(n_cells * LEVELS, dtype=np.int64)
        accumulate_dense(predictions, ground_truth, places, moments, histogram)
        cells = np.flatnonzero(moments[:, 0])
        hist_keys = np.flatnonzero(histogram)
        return CellStatistics(n_models, n_channels, bin_width, cells, moments[cells],
                              hist_keys, histogram[hist_keys])
    cell_ids = cell_indices(predictions, places)
    cells, slots = np.unique(cell_ids, return_inverse=True)
    moments = np.zeros((len(cells), moment_columns(n_models)), dtype=np.int64)
    accumulate_moments(predictions, ground_truth, slots.astype(np.int64), moments, places)
    hist_keys, hist_counts = np.unique(cell_ids * LEVELS + ground_truth.reshape(-1), return_counts=True)
    return CellStatistics(n_models, n_channels, bin_width, cells, moments, hist_keys, hist_counts.astype(np.int64))


def chunk_statistics_torch(predictions: np.ndarray, ground_truth: np.ndarray, bin_width: int, device: str) -> CellStatistics:
    """`chunk_statistics` in torch on `device` (GPU workers): sort-based, exact int64 sums."""
    import torch

    n_models, n_pixels, n_channels = predictions.shape
    x = torch.as_tensor(np.ascontiguousarray(predictions)).to(device).long().reshape(n_models, -1)
    y = torch.as_tensor(np.ascontiguousarray(ground_truth)).to(device).long().reshape(-1)
    places = torch.as_tensor(place_values(n_models, bin_width), device=device)
    channel = torch.arange(n_channels, device=device).repeat(n_pixels)
    cell_ids = sum(places[k][x[k]] for k in range(n_models)) * n_channels + channel
    cells, slots = torch.unique(cell_ids, return_inverse=True)
    columns = [torch.ones_like(y), *x]
    columns += [x[i] * x[j] for i in range(n_models) for j in range(i, n_models)]
    columns += [x[k] * y for k in range(n_models)]
    moments = torch.zeros((len(columns), len(cells)), dtype=torch.int64, device=device)
    for row, values in zip(moments, columns):
        row.index_add_(0, slots, values)
    hist_keys, hist_counts = torch.unique(cell_ids * LEVELS + y, return_counts=True)
    as_numpy = lambda t: t.cpu().numpy().astype(np.int64)  # noqa: E731
    return CellStatistics(n_models, n_channels, bin_width, as_numpy(cells), as_numpy(moments.T),
                          as_numpy(hist_keys), as_numpy(hist_counts))
