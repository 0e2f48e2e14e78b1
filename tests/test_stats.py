import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ensir_flow import stats
from helpers import cell_ids


def test_tiny_case_by_hand():
    # K=2, C=1, w=128: two bins per model. Pixels (x1, x2, y): (10, 20, 15), (30, 40, 35), (200, 20, 100)
    predictions = np.array([[[10], [30], [200]], [[20], [40], [20]]], dtype=np.uint8)
    truth = np.array([[15], [35], [100]], dtype=np.uint8)
    s = stats.chunk_statistics(predictions, truth, 128)
    # bins: (0,0) -> 0 twice, (1,0) -> 2 once; cell = bin * C + c
    assert s.cells.tolist() == [0, 2]
    # columns: n, x1, x2, x1x1, x1x2, x2x2, x1y, x2y
    assert s.moments[0].tolist() == [2, 40, 60, 100 + 900, 200 + 1200, 400 + 1600, 150 + 1050, 300 + 1400]
    assert s.moments[1].tolist() == [1, 200, 20, 40000, 4000, 400, 20000, 2000]
    # K x_k - S: (20 - 30)^2 + (60 - 70)^2 = 200 for model 1; (40 - 30)^2 + (80 - 70)^2 = 200 for model 2;
    # (200, 20): S = 220, 2*200 - 220 = 180 and 2*20 - 220 = -180
    assert s.squared_deviations().tolist() == [[200, 200], [180**2, 180**2]]
    np.testing.assert_array_equal(s.cross_products()[0], [[1000, 1400], [1400, 2000]])
    assert s.hist_keys.tolist() == [0 * 256 + 15, 0 * 256 + 35, 2 * 256 + 100]
    assert s.hist_counts.tolist() == [1, 1, 1]
    assert s.dense_histograms(np.array([1]))[0, 100] == 1


def _random_data(seed, n_models, n_pixels, n_channels):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 256, (n_pixels, n_channels), dtype=np.uint8)
    noise = rng.integers(-20, 21, (n_models, n_pixels, n_channels))
    return np.clip(truth[None].astype(int) + noise, 0, 255).astype(np.uint8), truth


def _assert_equal(a: stats.CellStatistics, b: stats.CellStatistics):
    for name in ("cells", "moments", "hist_keys", "hist_counts"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n_models=st.integers(1, 5),
    bin_width=st.sampled_from([16, 32, 64, 100]),
    cuts=st.lists(st.integers(0, 300), max_size=6),
)
def test_merge_of_any_chunking_equals_whole(seed, n_models, bin_width, cuts):
    predictions, truth = _random_data(seed, n_models, 300, 3)
    whole = stats.chunk_statistics(predictions, truth, bin_width)
    edges = [0, *sorted(cuts), 300]
    parts = [stats.chunk_statistics(predictions[:, a:b], truth[a:b], bin_width) for a, b in zip(edges, edges[1:])]
    rng = np.random.default_rng(seed)
    rng.shuffle(parts)
    _assert_equal(stats.merge(*parts), whole)
    _assert_equal(stats.merge(stats.empty_statistics(n_models, 3, bin_width), whole), whole)
    assert whole.n_pixels == 900


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), n_models=st.integers(1, 4), bin_width=st.sampled_from([16, 32, 64]))
def test_sparse_path_equals_dense_path(seed, n_models, bin_width):
    predictions, truth = _random_data(seed, n_models, 500, 3)
    dense = stats.chunk_statistics(predictions, truth, bin_width)
    original = stats.DENSE_HISTOGRAM_LIMIT
    stats.DENSE_HISTOGRAM_LIMIT = 0
    try:
        sparse = stats.chunk_statistics(predictions, truth, bin_width)
    finally:
        stats.DENSE_HISTOGRAM_LIMIT = original
    _assert_equal(sparse, dense)


def test_per_channel_sums_all_bins():
    predictions, truth = _random_data(1, 3, 1000, 3)
    s = stats.chunk_statistics(predictions, truth, 32)
    channel = s.per_channel()
    assert channel.cells.tolist() == [0, 1, 2]
    np.testing.assert_array_equal(channel.counts, [1000, 1000, 1000])
    np.testing.assert_array_equal(channel.sums[1], predictions[:, :, 1].astype(np.int64).sum(axis=1))
    np.testing.assert_array_equal(channel.sums_xy[2], (predictions[:, :, 2].astype(np.int64) * truth[:, 2]).sum(axis=1))
    np.testing.assert_array_equal(channel.dense_histograms(np.array([2]))[0], np.bincount(truth[:, 2], minlength=256))


def test_merge_refuses_different_layouts():
    predictions, truth = _random_data(1, 3, 10, 3)
    with pytest.raises(ValueError, match="cannot merge"):
        stats.merge(stats.chunk_statistics(predictions, truth, 32), stats.chunk_statistics(predictions, truth, 16))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    sizes=st.lists(st.integers(0, 400), min_size=2, max_size=6),
    n_words=st.integers(1, 3),
    spread=st.sampled_from([3, 50, 2**62]),
)
def test_sorted_parts_sum_as_their_concatenation_does(seed, sizes, n_words, spread):
    """Merging sorted runs of unique keys (with keys shared between parts, parts empty, one-word
    keys and rows of words) gives `sum_by_key` of all the parts' keys and values together."""
    rng = np.random.default_rng(seed)
    keys, values = [], []
    for size in sizes:
        part = np.unique(rng.integers(0, spread, (size, n_words), dtype=np.int64), axis=0)
        keys.append(part[:, 0] if n_words == 1 else part)
        values.append(rng.integers(1, 1000, (len(part), 4), dtype=np.int64))
    merged, sums = stats.sum_sorted_parts(keys, values)
    expected, expected_sums = stats.sum_by_key(np.concatenate(keys), np.concatenate(values))
    np.testing.assert_array_equal(merged, expected)
    np.testing.assert_array_equal(sums, expected_sums)


@pytest.mark.parametrize("n_models, bin_width", [(3, 32), (5, 16), (16, 16)])
def test_bins_of_the_cells_are_their_sorted_unique_words(n_models, bin_width):
    """The bins merged from the channels' sorted runs are the sorted unique bin words of the cells
    (one word, and the two words of K = 16 at w = 16), with each cell's row among them."""
    rng = np.random.default_rng(n_models)
    predictions = rng.integers(0, 256, (n_models, 3000, 3), dtype=np.uint8)
    predictions[:, :1000, 1:] = predictions[:, :1000, :1]  # grey pixels: one bin in three channels
    table = stats.chunk_statistics(predictions, rng.integers(0, 256, (3000, 3), dtype=np.uint8), bin_width, moments_kind="em")
    words = table.cells // table.n_channels
    expected, expected_row = stats.sorted_groups(words[:, None] if words.ndim == 1 else words)
    bins, row = table.bins()
    np.testing.assert_array_equal(bins, expected)
    np.testing.assert_array_equal(row, expected_row)
    assert len(bins) < len(table.cells)  # bins shared by channels: the merge joins them


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(0, 3000), n_slots=st.integers(1, 300), skew=st.booleans())
def test_level_counts_by_slot_are_sum_by_key(seed, n, n_slots, skew):
    """The counting sort of (slot, level) gives `sum_by_key` of slot * 256 + level with counts of
    one, for cells of a few levels (sorted) and of many (counted in a table: `skew` puts most
    pixel-channels in slot 0)."""
    rng = np.random.default_rng(seed)
    slots = rng.integers(0, n_slots, n, dtype=np.int64)
    if skew:
        slots[rng.random(n) < 0.7] = 0
    levels = rng.integers(0, 256, n).astype(np.uint8)
    keys, counts = stats._slot_level_counts(slots, levels, n_slots)
    expected_keys, expected_counts = stats.sum_by_key(slots * 256 + levels, np.ones(n, np.int64))
    np.testing.assert_array_equal(keys, expected_keys)
    np.testing.assert_array_equal(counts, expected_counts)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), cuts=st.lists(st.integers(1, 299), min_size=1, max_size=5, unique=True))
def test_fold_spans_partition_the_chunk(seed, cuts):
    predictions, truth = _random_data(seed, 3, 300, 3)
    edges = [0, *sorted(cuts), 300]
    spans = [(a, b, i % 2) for i, (a, b) in enumerate(zip(edges, edges[1:]))]
    folds = stats.fold_statistics(predictions, truth, 32, spans, 2)
    _assert_equal(stats.merge(*folds), stats.chunk_statistics(predictions, truth, 32))
    first_fold = [(a, b) for a, b, g in spans if g == 0]
    expected = stats.merge(*[stats.chunk_statistics(predictions[:, a:b], truth[a:b], 32) for a, b in first_fold])
    _assert_equal(folds[0], expected)


def test_many_models_small_bins_stay_sparse():
    """K = 4 at bin width 16: 65,536 bins per channel; a chunk's statistics hold only what occurs."""
    predictions, truth = _random_data(7, 4, 1 << 16, 3)
    table = stats.chunk_statistics(predictions, truth, 16)
    assert table.n_cells == 16**4 * 3
    size = sum(getattr(table, name).nbytes for name in ("cells", "moments", "hist_keys", "hist_counts"))
    assert size < 30 * (1 << 20)  # a dense 256-level histogram per cell would be 400 MB
    assert table.n_pixels == (1 << 16) * 3


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000), n=st.integers(0, 5000), n_words=st.integers(1, 3), spread=st.sampled_from([1, 7, 3000, 2**62])
)
def test_sorted_groups_is_numpys_unique_with_inverse(seed, n, n_words, spread):
    """The hash grouping (its table doubles many times from 1,024 slots at n = 5000 distinct keys)
    gives np.unique's sorted keys and inverse, for one-word keys and rows of key words."""
    keys = np.random.default_rng(seed).integers(0, spread, (n, n_words), dtype=np.int64)
    if n_words == 1:
        keys = keys[:, 0]
    unique, row = stats.sorted_groups(keys)
    expected, inverse = np.unique(keys, axis=0 if n_words > 1 else None, return_inverse=True)
    np.testing.assert_array_equal(unique, expected)
    np.testing.assert_array_equal(row, inverse.reshape(-1))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), n_models=st.integers(1, 16))
def test_squared_deviations_and_squares_are_the_per_pixel_sums(seed, n_models):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 256, (400, 2), dtype=np.uint8)
    predictions = rng.integers(0, 256, (n_models, 400, 2), dtype=np.uint8)
    table = stats.chunk_statistics(predictions, truth, 128)
    x = predictions.astype(np.int64).reshape(n_models, -1)
    deviation = (n_models * x - x.sum(axis=0)) ** 2  # (K, pixel-channels)
    rows = stats.sorted_groups(cell_ids(predictions, 128))[1]  # each pixel-channel's cell
    expected = np.zeros((len(table.cells), n_models), np.int64)
    np.add.at(expected, rows, deviation.T)
    np.testing.assert_array_equal(table.squared_deviations(), expected)
    squares = np.zeros((len(table.cells), n_models), np.int64)
    np.add.at(squares, rows, (x * x).T)
    np.testing.assert_array_equal(table.sums_of_squares(), squares)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n_models=st.integers(1, 16), bin_width=st.sampled_from([8, 32, 128]))
def test_em_moments_are_the_per_pixel_sums_on_every_path(seed, n_models, bin_width):
    """EM's moments gathered alone, on each path (dense table, hashed one-word keys, several key
    words: K = 16 at bin width 8 or 32), are the all-moments table's, and sum to the per-pixel sums."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 256, (300, 2), dtype=np.uint8)
    predictions = np.clip(truth + rng.integers(-40, 41, (n_models, 300, 2)), 0, 255).astype(np.uint8)
    alone = stats.chunk_statistics(predictions, truth, bin_width, moments_kind=stats.EM_MOMENTS)
    every = stats.chunk_statistics(predictions, truth, bin_width)
    assert alone.moments_kind == stats.EM_MOMENTS and alone.moments.shape[1] == 3 * n_models + 2
    for name in ("cells", "hist_keys", "hist_counts"):
        np.testing.assert_array_equal(getattr(alone, name), getattr(every, name))
    np.testing.assert_array_equal(alone.moments, every.em_moments())
    np.testing.assert_array_equal(alone.squared_deviations(), every.squared_deviations())
    np.testing.assert_array_equal(alone.sums_of_squares(), every.sums_of_squares())
    x = predictions.astype(np.int64).reshape(n_models, -1)
    s = x.sum(axis=0)
    per_pixel = np.column_stack([np.ones_like(s), x.T, (x * x).T, (x * s).T, s * s])
    np.testing.assert_array_equal(alone.moments.sum(axis=0), per_pixel.sum(axis=0))


def test_em_moments_merge_alone_and_hold_no_cross_products():
    predictions, truth = _random_data(3, 3, 500, 3)
    alone = stats.chunk_statistics(predictions, truth, 32, moments_kind=stats.EM_MOMENTS)
    halves = [
        stats.chunk_statistics(predictions[:, part], truth[part], 32, moments_kind=stats.EM_MOMENTS)
        for part in (slice(0, 200), slice(200, None))
    ]
    merged = stats.merge(*halves)
    np.testing.assert_array_equal(merged.moments, alone.moments)
    assert merged.per_channel().moments_kind == stats.EM_MOMENTS
    with pytest.raises(ValueError, match="cannot merge"):
        stats.merge(alone, stats.chunk_statistics(predictions, truth, 32))
    with pytest.raises(ValueError, match="only the moments EM uses"):
        alone.cross_products()
    with pytest.raises(ValueError, match="only the moments EM uses"):
        alone.sums_xy  # noqa: B018 - the property raises


def test_the_sample_of_cells_takes_strided_pixels_and_counts_what_the_statistics_hold():
    rng = np.random.default_rng(7)
    truth = rng.integers(0, 256, (4000, 3), dtype=np.uint8)
    predictions = np.clip(truth + rng.integers(-30, 31, (8, 4000, 3)), 0, 255).astype(np.uint8)
    first_bins, entries = stats.cell_sample(predictions[:, ::8], truth[::8], 32)  # a strided view, as a sample is taken
    every_eighth = stats.chunk_statistics(np.ascontiguousarray(predictions[:, ::8]), np.ascontiguousarray(truth[::8]), 32)
    np.testing.assert_array_equal(first_bins, stats.first_bin_of_keys(every_eighth.cells, 3))
    assert entries == len(every_eighth.hist_counts)
