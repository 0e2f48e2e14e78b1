"""Additive sufficient statistics of a reference set, per LUT cell (bin, channel).

Ground truth y is an 8-bit integer, so a cell's y values are fully described by their 256-level
histogram, and everything the solvers need is a sum over pixels: n, sum x_k, the cross products
sum x_i x_j (i <= j) and sum x_k y, plus the histogram. EnsIR's EM uses n, sum x_k, sum x_k^2 and
sum (K x_k - sum_j x_j)^2 (derived exactly from the cross products) and the histogram; least
squares uses the cross products and sum x_k y. What EM needs alone (`EM_MOMENTS`: n, sum x_k,
sum x_k^2, sum x_k s and sum s^2, s = sum_j x_j the pixel's sum over models) is 3K + 2 columns
where all of them (`ALL_MOMENTS`) are (K + 1)(K + 4) / 2: 26 against 53 at K = 8, 50 against
169 at K = 16, so `fit --solver em` gathers only those. Statistics of a chunk are computed once;
statistics of many chunks are merged by adding. All of it is int64, so the result is identical
whatever the chunking and the order of merging.

The table is sparse: only cells (and histogram levels) that hold pixels are stored, so it stays
small when K and the bin count are large (K = 5 at bin width 16 has 3 million cells per
channel triple, almost all empty).

Cell keys are int64 words (`binning.model_groups`): where the flat bin fits one word with room
for the channel and the level (K = 3 at any width), `cells` is the 1-D array of b * C + c and
`hist_keys` of cell * 256 + y, as always. Beyond (K = 16 at bin width 16 or 8), both are 2-D,
one column per group of models: column g holds b_g * C + c for the group's own flat bin b_g (the
channel is repeated in every word), and the last column of `hist_keys` is that word * 256 + y.
Rows are sorted lexicographically; every operation below handles both forms.
"""

import dataclasses
import math
from dataclasses import dataclass

import numba
import numpy as np

from .binning import LEVELS, bin_count, group_places, model_groups, place_tables, place_values
from .devices import resolve_device
from .kernel_cache import CACHE
from .kernels import (
    accumulate_dense,
    accumulate_dense_em,
    accumulate_groups,
    digit_multiplier,
    first_seen_cells,
    first_seen_groups,
)

#: Largest dense scratch table (cells x 256 levels) a chunk may use; above it, sort instead.
DENSE_HISTOGRAM_LIMIT = 1 << 22
#: Above every `first_bin_of_keys`: the end of the last range of cells (one that starts at 0 takes all).
FIRST_BINS_END = np.iinfo(np.int64).max


#: The moments every solver can use: [n, sum x_k, sum x_i x_j (i <= j, row-major), sum x_k y].
ALL_MOMENTS = "all"
#: The moments EM (and the solvers that fit nothing) use: [n, sum x_k, sum x_k^2, sum x_k s, sum s^2],
#: s = sum_j x_j. Each is a sum over the cell's pixels, so they merge by adding like the others.
EM_MOMENTS = "em"
MOMENT_KINDS = (ALL_MOMENTS, EM_MOMENTS)


def moment_columns(n_models: int, kind: str = ALL_MOMENTS) -> int:
    """Columns of a moments table of `kind` (`ALL_MOMENTS` or `EM_MOMENTS`) for K = `n_models`."""
    if kind == EM_MOMENTS:
        return 3 * n_models + 2
    return 1 + n_models + n_models * (n_models + 1) // 2 + n_models


@dataclass(frozen=True)
class CellStatistics:
    """Sparse additive statistics of pixels grouped by cell (flat bin * n_channels + channel).

    cells: sorted unique cell keys (m,), or (m, W) words when the flat bin needs W > 1 words
    (module docstring); moments: int64 (m, `moment_columns(K, kind)`) with the columns of
    `moments_kind` (`ALL_MOMENTS` or `EM_MOMENTS`); hist_keys: sorted unique cell * 256 + y (the
    last word of a 2-D cell key so extended); hist_counts: how many pixels have that (cell, y).
    """

    n_models: int
    n_channels: int
    bin_width: int
    cells: np.ndarray
    moments: np.ndarray
    hist_keys: np.ndarray
    hist_counts: np.ndarray
    moments_kind: str = ALL_MOMENTS

    @property
    def n_cells(self) -> int:
        """Number of possible cells (bins x channels), empty ones included."""
        return bin_count(self.n_models, self.bin_width) * self.n_channels

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays."""
        return self.cells.nbytes + self.moments.nbytes + self.hist_keys.nbytes + self.hist_counts.nbytes

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
        return self.moments[:, 1 : 1 + self.n_models]

    def _require_all_moments(self, what: str) -> None:
        if self.moments_kind != ALL_MOMENTS:
            raise ValueError(f"{what}: these statistics hold only the moments EM uses (gather {ALL_MOMENTS!r} moments)")

    def cross_products(self) -> np.ndarray:
        """Symmetric sum x_i x_j per cell (m, K, K), int64."""
        self._require_all_moments("cross products")
        k = self.n_models
        upper = self.moments[:, 1 + k : 1 + k + k * (k + 1) // 2]
        rows, cols = np.triu_indices(k)
        out = np.empty((len(upper), k, k), dtype=np.int64)
        out[:, rows, cols] = upper
        out[:, cols, rows] = upper
        return out

    @property
    def sums_xy(self) -> np.ndarray:
        """sum x_k y per cell (m, K)."""
        self._require_all_moments("sums x_k y")
        return self.moments[:, -self.n_models :]

    def em_moments(self, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """The `EM_MOMENTS` columns of the cells `rows` (3K + 2 columns): the moments themselves
        when of that kind, else derived exactly, row by row, from the stored upper triangle of the
        cross products (the (m, K, K) matrices would be 2 GB for a million cells at K = 16)."""
        if self.moments_kind == EM_MOMENTS:
            return self.moments[rows]
        moments = self.moments[rows]
        out = np.empty((len(moments), moment_columns(self.n_models, EM_MOMENTS)), dtype=np.int64)
        _em_moments_into(moments, self.n_models, out)
        return out

    def sums_of_squares(self, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """sum x_k^2 per cell of `rows` (cells, K)."""
        k = self.n_models
        return self.em_moments(rows)[:, 1 + k : 1 + 2 * k]

    def squared_deviations(self, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """sum over pixels of (K x_k - s)^2 per cell of `rows` (cells, K), s = sum_j x_j: K^2 times
        the squared distance of model k to the per-pixel mean, exact in integers:
        K^2 sum x_k^2 - 2K sum x_k s + sum s^2."""
        k = self.n_models
        moments = self.em_moments(rows)
        return k * k * moments[:, 1 + k : 1 + 2 * k] - 2 * k * moments[:, 1 + 2 * k : 1 + 3 * k] + moments[:, -1:]

    @property
    def channels(self) -> np.ndarray:
        """Channel of each cell (m,)."""
        return (self.cells if self.cells.ndim == 1 else self.cells[:, 0]) % self.n_channels

    def bins(self) -> tuple[np.ndarray, np.ndarray]:
        """The bins holding cells, as sorted unique rows of key words (n_bins, W) (the flat bin
        b_g of each group of models: each cell word // C), and the row of those each cell is in.
        A channel's cells are sorted by bin, so the bins are a linear merge of the C channels'."""
        words = self.cells // self.n_channels
        words = words[:, None] if words.ndim == 1 else words
        of_channel = [np.flatnonzero(self.channels == c) for c in range(self.n_channels)]
        bins, rows = merge_sorted_keys([words[cells] for cells in of_channel])
        row = np.empty(len(words), np.int64)
        for cells, cell_rows in zip(of_channel, rows):
            row[cells] = cell_rows
        return bins, row

    @property
    def levels(self) -> np.ndarray:
        """Ground-truth level y of each histogram entry."""
        return (self.hist_keys if self.hist_keys.ndim == 1 else self.hist_keys[:, -1]) % LEVELS

    def hist_starts(self) -> np.ndarray:
        """Index of the first histogram entry of each cell, plus the total (m + 1,): entries are
        sorted by cell and every stored cell has at least one."""
        cell_part = (
            self.hist_keys // LEVELS
            if self.hist_keys.ndim == 1
            else np.column_stack([self.hist_keys[:, :-1], self.hist_keys[:, -1] // LEVELS])
        )
        starts = np.append(group_starts(cell_part), len(cell_part))
        if len(starts) != len(self.cells) + 1:
            raise ValueError(f"{len(starts) - 1} cells in the histogram, {len(self.cells)} in the moments")
        return starts

    def hist_rows(self) -> np.ndarray:
        """Row of `cells` of each histogram entry."""
        return np.repeat(np.arange(len(self.cells)), np.diff(self.hist_starts()))

    def dense_histograms(self, rows: np.ndarray) -> np.ndarray:
        """Histograms (len(rows), 256) of y for the given rows of `cells`."""
        starts = self.hist_starts()
        lo, hi = starts[rows], starts[np.asarray(rows) + 1]
        out = np.zeros((len(rows), LEVELS), dtype=np.int64)
        row_of_entry = np.repeat(np.arange(len(rows)), hi - lo)
        entries = np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)]) if len(rows) else np.empty(0, np.int64)
        out[row_of_entry, self.levels[entries]] = self.hist_counts[entries]
        return out

    def per_channel(self) -> "CellStatistics":
        """Statistics of each whole channel, as if every bin were one (used for empty cells)."""
        channels, moments = _sum_by_small_key(self.channels, self.moments, self.n_channels)
        hist_channel = self.channels[self.hist_rows()]
        keys, counts = _sum_by_small_key(hist_channel * LEVELS + self.levels, self.hist_counts, self.n_channels * LEVELS)
        return CellStatistics(self.n_models, self.n_channels, LEVELS, channels, moments, keys, counts, self.moments_kind)


def _sum_by_small_key(keys: np.ndarray, values: np.ndarray, n_keys: int) -> tuple[np.ndarray, np.ndarray]:
    """`sum_by_key` of keys (n,) in 0 .. n_keys - 1, few (a channel, or a channel and a level): added
    into a dense table, of which the keys present are kept. No hashing kernel to load or compile."""
    sums = np.zeros((n_keys, *values.shape[1:]), dtype=values.dtype)
    _scatter_add(keys, values, sums)
    present = np.flatnonzero(np.bincount(keys, minlength=n_keys))
    return present, sums[present]


def _scatter_add(keys: np.ndarray, values: np.ndarray, out: np.ndarray) -> None:
    """out[keys[i]] += values[i] for every i (repeated keys add up), values and out 1-D or rows."""
    columns = math.prod(out.shape[1:])
    _scatter_add_rows(keys, np.ascontiguousarray(values).reshape(len(values), columns), out.reshape(len(out), columns))


@numba.njit(nogil=True, cache=CACHE)
def _scatter_add_rows(keys, values, out):
    """`_scatter_add` of values (n, V) into out (m, V): one kernel for both the 1-D counts and the
    moments' rows, whose columns are added one by one (adding a row as an array makes numba
    compile the formatting of its shape-mismatch error, seconds per process)."""
    for i in range(len(keys)):
        for j in range(values.shape[1]):
            out[keys[i], j] += values[i, j]


@numba.njit(nogil=True, cache=CACHE)
def _em_moments_into(moments, n_models, out):
    """The `EM_MOMENTS` columns (m, 3K + 2) of `ALL_MOMENTS` rows: n and sum x_k as they are,
    sum x_k^2 from the diagonal, sum x_k s = sum_j sum x_k x_j and sum s^2 = sum_k sum x_k s."""
    k = n_models
    for r in range(len(moments)):
        out[r, : 1 + 3 * k] = 0
        for column in range(1 + k):
            out[r, column] = moments[r, column]
        column = 1 + k
        for i in range(k):
            for j in range(i, k):
                value = moments[r, column]
                out[r, 1 + 2 * k + i] += value
                if i == j:
                    out[r, 1 + k + i] = value
                else:
                    out[r, 1 + 2 * k + j] += value
                column += 1
        out[r, 1 + 3 * k] = out[r, 1 + 2 * k : 1 + 3 * k].sum()


@numba.njit(inline="always")
def _compare_rows(a, i, b, j):
    """-1, 0 or 1 as row i of key words a is before, equal to or after row j of b (lexicographic)."""
    for w in range(a.shape[1]):
        if a[i, w] != b[j, w]:
            return -1 if a[i, w] < b[j, w] else 1
    return 0


@numba.njit(nogil=True, cache=CACHE)
def _merge_sorted_rows(a, b, merged, row_of_a, row_of_b):
    """The sorted union of two sorted runs of unique key words a (na, W) and b (nb, W) into the
    first rows of merged (na + nb, W), and the row of that union each row of a and of b is into
    row_of_a and row_of_b: one linear pass, no hashing or sorting. Returns the union's length."""
    i = j = m = 0
    while i < len(a) or j < len(b):
        order = -1 if j == len(b) else 1 if i == len(a) else _compare_rows(a, i, b, j)
        if order <= 0:
            for w in range(a.shape[1]):
                merged[m, w] = a[i, w]
            row_of_a[i] = m
            i += 1
        if order >= 0:
            for w in range(b.shape[1]):
                merged[m, w] = b[j, w]
            row_of_b[j] = m
            j += 1
        m += 1
    return m


def sorted_groups(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sorted unique keys of keys (n,) or key words (n, W), and the row of that result each
    key is (n,): what `np.unique(..., return_inverse=True)` gives, by hashing, so only the unique
    keys are sorted (far fewer than the keys, in a chunk of pixels)."""
    group, unique = first_seen_groups(_key_rows(keys))
    cells, rank = _sorted_by_key(unique.reshape(-1) if keys.ndim == 1 else unique)
    return cells, rank[group]


def _sorted_by_key(unique: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique keys (n,) or key words (n, W) sorted, and the row of that result each one is."""
    order = key_order(unique)
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return unique[order], rank


def _key_rows(keys: np.ndarray) -> np.ndarray:
    """Keys (n,) or key words (n, W) as contiguous int64 rows (n, 1) or (n, W), as the kernels take them."""
    return np.ascontiguousarray(keys.reshape(len(keys), keys.shape[1] if keys.ndim == 2 else 1), dtype=np.int64)


def key_order(keys: np.ndarray) -> np.ndarray:
    """Permutation sorting keys (n,) or key words (n, W) lexicographically (stable)."""
    return np.argsort(keys, kind="stable") if keys.ndim == 1 else np.lexsort(keys.T[::-1])


def group_starts(sorted_keys: np.ndarray) -> np.ndarray:
    """Index of the first of each run of equal keys (rows, for 2-D keys) in sorted keys."""
    if len(sorted_keys) == 0:
        return np.empty(0, np.int64)
    differs = sorted_keys[1:] != sorted_keys[:-1]
    return np.flatnonzero(np.concatenate(([True], differs if differs.ndim == 1 else differs.any(axis=1))))


def run_ids(sorted_keys: np.ndarray) -> np.ndarray:
    """Index of the run of equal keys each row of sorted keys belongs to (0, 0, 1, 2, 2, ...)."""
    first = np.zeros(len(sorted_keys), bool)
    first[group_starts(sorted_keys)] = True
    return np.cumsum(first) - 1


def find_rows(sorted_keys: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Row of each `wanted` key in unique `sorted_keys` (1-D or 2-D like them), -1 where absent."""
    if len(sorted_keys) == 0:
        return np.full(len(wanted), -1)
    if sorted_keys.ndim == 1:
        position = np.searchsorted(sorted_keys, wanted).clip(0, len(sorted_keys) - 1)
        return np.where(sorted_keys[position] == wanted, position, -1)
    both = np.concatenate([sorted_keys, wanted])
    order = key_order(both)
    run = run_ids(both[order])
    run_of = np.empty(len(both), np.int64)
    run_of[order] = run
    row_of_run = np.full(run[-1] + 1, -1)
    row_of_run[run_of[: len(sorted_keys)]] = np.arange(len(sorted_keys))
    return row_of_run[run_of[len(sorted_keys) :]]


def sum_by_key(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique keys (1-D, or rows of 2-D key words) and the sum of `values` rows sharing each
    key (exact in integers), the keys grouped by hashing (`sorted_groups`). Keys already in sorted
    runs (statistics being merged) take `sum_sorted_parts`."""
    unique, row = sorted_groups(keys)
    sums = np.zeros((len(unique), *values.shape[1:]), dtype=values.dtype)
    _scatter_add(row, values, sums)
    return unique, sums


def merge_sorted_keys(keys: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """The sorted union of runs of keys (n_i,) or key words (n_i, W), each sorted and unique, and
    the row of that union each key of each run is: linear merges, no hashing or sorting."""
    merged = _key_rows(keys[0])
    rows = [np.arange(len(merged))]
    for part in keys[1:]:
        part = _key_rows(part)  # the kernel fills arrays made here: allocating them itself, it compiled twice as long
        union = np.empty((len(merged) + len(part), merged.shape[1]), np.int64)
        row_of_merged, row_of_part = np.empty(len(merged), np.int64), np.empty(len(part), np.int64)
        merged = union[: _merge_sorted_rows(merged, part, union, row_of_merged, row_of_part)]
        rows = [row_of_merged[r] for r in rows] + [row_of_part]
    return merged.reshape(len(merged), *keys[0].shape[1:]), rows


def sum_sorted_parts(keys: list[np.ndarray], values: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """`sum_by_key` of parts taken together (keys[i] labels the rows of values[i]) whose keys are
    each sorted and unique, as statistics' cells and histogram keys are: the keys are merged as
    sorted runs (`merge_sorted_keys`) and each part's values added into the rows of its keys (never
    concatenated). Merging the statistics of five 2-Mpx chunks at K = 16 (8 M cells, 16 M
    histogram entries) took 17 s by hashing."""
    merged, rows = merge_sorted_keys(keys)
    sums = np.zeros((len(merged), *values[0].shape[1:]), dtype=values[0].dtype)
    for part_rows, part_values in zip(rows, values):
        _scatter_add(part_rows, part_values, sums)
    return merged, sums


def empty_statistics(n_models: int, n_channels: int, bin_width: int, moments_kind: str = ALL_MOMENTS) -> CellStatistics:
    """Statistics of no pixels: the identity of `merge`."""
    n_words = len(model_groups(n_models, bin_width))
    no_keys = np.empty(0, np.int64) if n_words == 1 else np.empty((0, n_words), np.int64)
    return CellStatistics(
        n_models,
        n_channels,
        bin_width,
        no_keys,
        np.empty((0, moment_columns(n_models, moments_kind)), np.int64),
        no_keys.copy(),
        np.empty(0, np.int64),
        moments_kind,
    )


def merge(*parts: CellStatistics) -> CellStatistics:
    """Statistics of the union of the pixels of `parts` (they must share K, C, bin width and kind of moments)."""
    first = parts[0]
    shape = lambda part: (part.n_models, part.n_channels, part.bin_width, part.moments_kind)  # noqa: E731
    for part in parts[1:]:
        if shape(part) != shape(first):
            raise ValueError("cannot merge statistics of different models, channels, bin widths or kinds of moments")
    if len(parts) == 1:
        return first
    cells, moments = sum_sorted_parts([p.cells for p in parts], [p.moments for p in parts])
    keys, counts = sum_sorted_parts([p.hist_keys for p in parts], [p.hist_counts for p in parts])
    return CellStatistics(first.n_models, first.n_channels, first.bin_width, cells, moments, keys, counts, first.moments_kind)


def fold_statistics(
    predictions: np.ndarray,
    ground_truth: np.ndarray,
    bin_width: int,
    spans: list[tuple[int, int, int]],
    n_folds: int,
    device: str = "cpu",
    moments_kind: str = ALL_MOMENTS,
    first_bins: tuple[int, int] | None = None,
) -> list[CellStatistics]:
    """Statistics per fold of one chunk whose pixels are split into (start, stop, fold) spans
    (used to keep cross-validation folds of images apart in the same single pass); `first_bins`
    as `chunk_statistics`'s."""
    n_models, _, n_channels = predictions.shape
    parts: list[list[CellStatistics]] = [[] for _ in range(n_folds)]
    for start, stop, fold in spans:
        parts[fold].append(
            chunk_statistics(predictions[:, start:stop], ground_truth[start:stop], bin_width, device, moments_kind, first_bins)
        )
    return [merge(*p) if p else empty_statistics(n_models, n_channels, bin_width, moments_kind) for p in parts]


def merge_folds(*per_fold: list[CellStatistics]) -> list[CellStatistics]:
    """Fold-wise `merge` of several `fold_statistics` results."""
    return [merge(*fold) for fold in zip(*per_fold)]


def chunk_statistics(
    predictions: np.ndarray,
    ground_truth: np.ndarray,
    bin_width: int,
    device: str = "cpu",
    moments_kind: str = ALL_MOMENTS,
    first_bins: tuple[int, int] | None = None,
) -> CellStatistics:
    """Statistics of one chunk, with moments of `moments_kind`: predictions uint8 (K, P, C),
    ground truth uint8 (P, C).

    On the CPU (numba) it uses a dense scratch table when the cell count is small enough (the
    common case: one fused pass), else groups the chunk's cell ids by hashing, so memory stays
    bounded by the chunk size either way. Other devices ('auto' resolved per worker, 'cuda') use
    torch; the integer results are identical. Keys of several words (many models) are gathered on
    the CPU. The torch path gathers all moments and derives EM's from them.

    With `first_bins` (lo, hi), only the pixel-channels whose cell's `first_bin_of_keys` b lies
    in lo <= b < hi are counted: the statistics of one range of cells, for a fit made in several passes
    (`pipelines.fit`); they are gathered on the CPU.
    """
    if moments_kind not in MOMENT_KINDS:
        raise ValueError(f"moments kind {moments_kind!r} is not one of {MOMENT_KINDS}")
    device = resolve_device(device)
    wide = len(model_groups(predictions.shape[0], bin_width)) > 1
    if device != "cpu" and not wide and first_bins is None:
        return _of_kind(chunk_statistics_torch(predictions, ground_truth, bin_width, device), moments_kind)
    predictions = np.ascontiguousarray(predictions, dtype=np.uint8)
    ground_truth = np.ascontiguousarray(ground_truth, dtype=np.uint8)
    n_models, n_pixels, n_channels = predictions.shape
    if ground_truth.shape != (n_pixels, n_channels):
        raise ValueError(f"ground truth shape {ground_truth.shape} does not match predictions {predictions.shape}")
    n_cells = bin_count(n_models, bin_width) * n_channels
    if not wide and first_bins is None and n_cells * LEVELS <= DENSE_HISTOGRAM_LIMIT:
        moments = np.zeros((n_cells, moment_columns(n_models, moments_kind)), dtype=np.int64)
        histogram = np.zeros(n_cells * LEVELS, dtype=np.int64)
        accumulate = accumulate_dense_em if moments_kind == EM_MOMENTS else accumulate_dense
        accumulate(predictions, ground_truth, place_tables(n_models, bin_width), moments, histogram)
        cells = np.flatnonzero(moments[:, 0])
        hist_keys = np.flatnonzero(histogram)
        return CellStatistics(
            n_models, n_channels, bin_width, cells, moments[cells], hist_keys, histogram[hist_keys], moments_kind
        )
    return _grouped_chunk_statistics(predictions, ground_truth, bin_width, moments_kind, first_bins or (0, FIRST_BINS_END))


def first_bin_of_keys(keys: np.ndarray, n_channels: int) -> np.ndarray:
    """The bin of the first key word of each cell key (1-D, or rows of words): word // C, the flat
    bin of the first group of models. Keys sorted by row are sorted by it, so a range of it is a
    run of sorted cells, and a run of a LUT's sorted bins."""
    return (keys if keys.ndim == 1 else keys[:, 0]) // n_channels


def cell_sample(predictions: np.ndarray, ground_truth: np.ndarray, bin_width: int) -> tuple[np.ndarray, int]:
    """Of the pixel-channels of predictions (K, P, C) with `ground_truth` (P, C) (a sample of a
    chunk's): the `first_bin_of_keys` of each distinct cell, sorted, and how many histogram
    entries (distinct cell and level) their statistics would hold: how a chunk's cells spread over
    the ranges that `chunk_statistics(first_bins=...)` selects, and how large its statistics are
    (used to cut a large fit into passes of about as many bytes each). No moments are added."""
    predictions, ground_truth = np.ascontiguousarray(predictions, dtype=np.uint8), np.ascontiguousarray(ground_truth)
    cells, group, row_of_group = _cell_groups(predictions, bin_width, (0, FIRST_BINS_END))
    no_moments = np.zeros((len(cells), 0), np.int64)
    slot_levels, _ = _count_cells(predictions, ground_truth, group, row_of_group, no_moments, EM_MOMENTS)
    return first_bin_of_keys(cells, predictions.shape[2]), len(slot_levels)


def _of_kind(statistics: CellStatistics, moments_kind: str) -> CellStatistics:
    """`statistics` (of all moments) with moments of `moments_kind`."""
    if moments_kind == statistics.moments_kind:
        return statistics
    return dataclasses.replace(statistics, moments=statistics.em_moments(), moments_kind=EM_MOMENTS)


def _cell_groups(
    predictions: np.ndarray, bin_width: int, first_bins: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sorted cell keys (1-D, or rows of key words) of the pixel-channels of predictions (K, P,
    C) whose `first_bin_of_keys` lies in `first_bins` (lo, hi), each pixel-channel's group (P * C,),
    -1 for those outside, and the row of the sorted cells each group is (`kernels.first_seen_cells`).
    The predictions must be C-contiguous uint8."""
    places, word_of_model = group_places(predictions.shape[0], bin_width)
    n_words = int(word_of_model[-1]) + 1
    n_pixel_channels = predictions.shape[1] * predictions.shape[2]
    group = np.empty(n_pixel_channels, np.int32 if n_pixel_channels < np.iinfo(np.int32).max else np.int64)
    unique = first_seen_cells(
        predictions, digit_multiplier(bin_width), places.astype(np.float64), word_of_model, n_words, *first_bins, group
    )
    cells, row_of_group = _sorted_by_key(unique[:, 0] if n_words == 1 else unique)
    return cells, group, row_of_group


def _count_cells(
    predictions: np.ndarray,
    ground_truth: np.ndarray,
    group: np.ndarray,
    row_of_group: np.ndarray,
    moments: np.ndarray,
    moments_kind: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Add each pixel-channel's moments to its cell's row of `moments` (rows of the sorted cells:
    `_cell_groups`; none where it has no columns), and count its (cell, level): the sorted unique
    row * 256 + level, and their counts. The levels are counted in the same pass where a dense
    table of them is small, else sorted by `_slot_level_counts`."""
    n_cells = len(moments)
    dense = n_cells * LEVELS <= DENSE_HISTOGRAM_LIMIT
    histogram = np.zeros(n_cells * LEVELS if dense else 0, np.int64)
    accumulate_groups(
        predictions,
        ground_truth,
        group,
        row_of_group,
        moments,
        histogram,
        (np.empty(0, np.int64),) * len(predictions),
        moments_kind == EM_MOMENTS,
    )  # the kernel reads K alone
    if dense:
        slot_levels = np.flatnonzero(histogram)
        return slot_levels, histogram[slot_levels]
    levels = ground_truth.reshape(-1)
    counted = group >= 0
    if not counted.all():
        group, levels = group[counted], levels[counted]
    return _slot_level_counts(row_of_group[group], levels, n_cells)


def _grouped_chunk_statistics(
    predictions: np.ndarray, ground_truth: np.ndarray, bin_width: int, moments_kind: str, first_bins: tuple[int, int]
) -> CellStatistics:
    """`chunk_statistics` of the pixel-channels of the cells in `first_bins` (lo, hi) of their
    `first_bin_of_keys`: grouped by hashing their cell keys (made on the fly), then one pass adding
    each one's moments to its cell's row and counting its level (`_count_cells`)."""
    n_models, _, n_channels = predictions.shape
    cells, group, row_of_group = _cell_groups(predictions, bin_width, first_bins)
    moments = np.zeros((len(cells), moment_columns(n_models, moments_kind)), dtype=np.int64)
    slot_levels, counts = _count_cells(predictions, ground_truth, group, row_of_group, moments, moments_kind)
    return CellStatistics(
        n_models, n_channels, bin_width, cells, moments, _histogram_keys(cells, slot_levels), counts, moments_kind
    )


def _histogram_keys(cells: np.ndarray, slot_levels: np.ndarray) -> np.ndarray:
    """`hist_keys` of entries slot * 256 + level, slot a row of the sorted `cells` (1-D, or 2-D key
    words whose last word takes the level)."""
    cell_part, level = np.divmod(slot_levels, LEVELS)
    if cells.ndim == 1:
        return cells[cell_part] * LEVELS + level
    keys = cells[cell_part]
    keys[:, -1] = keys[:, -1] * LEVELS + level
    return keys


#: Entries of one cell above which `_slot_level_counts` counts its levels in a 256-level table
#: rather than sorting them.
SORTED_LEVELS_LIMIT = 64


@numba.njit(nogil=True, cache=CACHE)
def _slot_level_counts(slots, levels, n_slots):
    """The sorted unique slot * 256 + level of pixel-channels in rows `slots` (0 .. n_slots - 1)
    with ground-truth `levels`, and how many pixel-channels each is: `sum_by_key` of those keys
    with a count of one each, by a counting sort on the slot (the few levels of each cell are then
    sorted in place, or counted in a 256-level table for a large cell), where hashing them took 2.6 s for
    a 2-Mpx chunk at K = 16."""
    start = np.zeros(n_slots + 1, np.int64)
    for s in slots:
        start[s + 1] += 1
    for s in range(n_slots):
        start[s + 1] += start[s]
    at = start[:-1].copy()
    by_slot = np.empty(len(slots), np.int64)
    for i in range(len(slots)):
        by_slot[at[slots[i]]] = levels[i]
        at[slots[i]] += 1
    keys, counts = np.empty(len(slots), np.int64), np.empty(len(slots), np.int64)
    table = np.zeros(LEVELS, np.int64)
    n = 0
    for s in range(n_slots):
        lo, hi = start[s], start[s + 1]
        if hi - lo > SORTED_LEVELS_LIMIT:
            for e in range(lo, hi):
                table[by_slot[e]] += 1
            for level in range(LEVELS):
                if table[level]:
                    keys[n], counts[n] = s * LEVELS + level, table[level]
                    table[level] = 0
                    n += 1
            continue
        for e in range(lo + 1, hi):  # insertion sort of the cell's few levels, in place
            level, f = by_slot[e], e
            while f > lo and by_slot[f - 1] > level:
                by_slot[f] = by_slot[f - 1]
                f -= 1
            by_slot[f] = level
        for e in range(lo, hi):
            if e > lo and by_slot[e] == by_slot[e - 1]:
                counts[n - 1] += 1
            else:
                keys[n], counts[n] = s * LEVELS + by_slot[e], 1
                n += 1
    return keys[:n].copy(), counts[:n].copy()


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
    return CellStatistics(
        n_models, n_channels, bin_width, as_numpy(cells), as_numpy(moments.T), as_numpy(hist_keys), as_numpy(hist_counts)
    )
