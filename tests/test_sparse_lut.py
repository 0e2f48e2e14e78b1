"""Many-model ensembles (issue 13): the sparse LUT (format 2), keys of several words, indexed and hashed lookups.

K up to 16 at bin widths 8 to 128: nb^K bins per channel (2^64 at K = 16, w = 16) are never built;
only the bins holding reference pixels are stored, with a per-channel fallback for every other
cell. Results for K = 3 must not move: the dense table a format-2 LUT expands to, its digest and
its output bytes are those of the layout written before (format 1), tested here by writing that
layout by hand.
"""

import json
import pickle

import imageio.v3 as iio
import numpy as np
import pytest
import xarray as xr
from dask.sizeof import sizeof

from ensir_flow import stats
from ensir_flow.binning import (
    bin_count,
    digits_of_words,
    flat_bins_of_digits,
    key_words,
    model_groups,
    ranges_per_model,
    words_of_digits,
)
from ensir_flow.blend import INDEXED_BINS_LIMIT, HashedWeights, IndexedWeights, blend, weights_with_fallback
from ensir_flow.errors import InputError
from ensir_flow.fit_status import FitStatus
from ensir_flow.kernels import DIGIT_SHIFT, HASHED_BLOCK, digit_multiplier, fill_cuckoo_slots
from ensir_flow.lsq import active_set_simplex_least_squares, enumerated_simplex_least_squares
from ensir_flow.lut import FORMAT_VERSION, SOLVERS, Lut, fit_lut
from ensir_flow.pipelines.lut_io import read_lut, write_lut


def members(n_members: int, n_pixels: int, seed: int = 0, kind: str = "models", channels: int = 3):
    """(predictions (K, P, C), truth (P, C)) uint8 of a smooth signal: `models` = truth + each
    member's own bias, gain error and noise level (distinct restorers); `samples` = truth plus
    independent noise of one level per member (N samples of one stochastic restorer)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_pixels)[:, None] + 37 * np.arange(channels)[None]
    truth = np.clip(128 + 100 * np.sin(t / 50.0) + rng.normal(0, 6, (n_pixels, channels)), 0, 255)
    if kind == "models":
        bias, gain, sigma = rng.uniform(-4, 4, n_members), rng.uniform(-0.04, 0.04, n_members), rng.uniform(2, 8, n_members)
    else:
        bias, gain, sigma = np.zeros(n_members), np.zeros(n_members), np.full(n_members, 6.0)
    x = truth[None] + bias[:, None, None] + gain[:, None, None] * (truth[None] - 128)
    x = x + rng.normal(0, 1, x.shape) * sigma[:, None, None]
    return np.clip(np.rint(x), 0, 255).astype(np.uint8), np.rint(truth).astype(np.uint8)


def per_pixel_reference(predictions: np.ndarray, lut: Lut) -> np.ndarray:
    """The ensemble computed one pixel-channel at a time in Python from the LUT's stored bins: the
    bin's weights if stored, else the channel's fallback; float32 sum in model order."""
    table = {tuple(d): row for row, d in enumerate(lut.bin_digits.tolist())}
    n_models, n_pixels, n_channels = predictions.shape
    out = np.empty((n_pixels, n_channels), np.uint8)
    for p in range(n_pixels):
        for c in range(n_channels):
            x = predictions[:, p, c]
            row = table.get(tuple((x // lut.bin_width).tolist()))
            w = lut.bin_weights[row, c] if row is not None else lut.fallback[c]
            acc = np.float32(0)
            for k in range(n_models):
                acc = np.float32(acc + np.float32(w[k]) * np.float32(x[k]))
            out[p, c] = np.clip(np.floor(acc + np.float32(0.5)), 0, 255)
    return out


def legacy_dataset(lut: Lut) -> xr.Dataset:
    """The LUT in the layout ensir-flow wrote before format 2 (no format_version): every bin of
    the dense table on `bin`, with `weights`, `count`, `fit_status` and four attributes."""
    n_bins = lut.weights.shape[0]
    return xr.Dataset(
        {
            "weights": (("bin", "channel", "model"), lut.weights),
            "count": (("bin", "channel"), lut.count),
            "fit_status": (("bin", "channel"), lut.fit_status),
        },
        coords={"bin": np.arange(n_bins), "model": np.array(lut.models, dtype=object)},
        attrs={"models": lut.models, "bin_width": lut.bin_width, "solver": lut.solver, "empty_policy": lut.empty_policy},
    )


def test_model_groups_keep_one_word_where_the_flat_index_fits():
    assert model_groups(3, 8) == ((0, 3),) and model_groups(8, 32) == ((0, 8),)
    assert model_groups(16, 16) == ((0, 8), (8, 16)) and model_groups(16, 8) == ((0, 8), (8, 16))
    for n_models in range(2, 17):
        for width in (8, 16, 32, 64, 128):
            nb = ranges_per_model(width)
            for start, stop in model_groups(n_models, width):
                assert nb ** (stop - start) * 4 * 256 < 2**63  # room for the channel and the level
    digits = np.random.default_rng(0).integers(0, 32, (50, 16)).astype(np.uint8)
    assert (digits_of_words(words_of_digits(digits, 8), 16, 8) == digits).all()


def test_wide_statistics_merge_exactly_and_match_a_count_in_python_integers():
    predictions, truth = members(16, 600, seed=1)
    whole = stats.chunk_statistics(predictions, truth, 16)
    assert whole.cells.shape[1] == key_words(16, 16) == 2
    parts = [stats.chunk_statistics(predictions[:, a:b], truth[a:b], 16) for a, b in ((0, 250), (250, 251), (251, 600))]
    merged = stats.merge(*parts[::-1])
    for name in ("cells", "moments", "hist_keys", "hist_counts"):
        np.testing.assert_array_equal(getattr(merged, name), getattr(whole, name), err_msg=name)
    # every cell's pixel count against Python integers: flat bin (up to 2^64) and channel
    expected: dict = {}
    for p in range(600):
        for c in range(3):
            key = (sum(int(predictions[k, p, c]) // 16 * 16 ** (15 - k) for k in range(16)), c)
            expected[key] = expected.get(key, 0) + 1
    digits = digits_of_words(whole.cells // 3, 16, 16)
    got = {
        (sum(int(d) * 16 ** (15 - k) for k, d in enumerate(row)), int(c)): int(n)
        for row, c, n in zip(digits, whole.channels, whole.counts)
    }
    assert got == expected
    assert whole.dense_histograms(np.arange(len(whole.cells))).sum(axis=1).tolist() == whole.counts.tolist()


@pytest.mark.parametrize("n_models, bin_width", [(2, 128), (5, 8), (10, 16), (16, 16), (16, 8)])
@pytest.mark.parametrize("solver", SOLVERS)
def test_every_solver_fits_and_applies_at_many_models(n_models, bin_width, solver):
    predictions, truth = members(n_models, 400, seed=n_models, kind="samples" if n_models % 2 else "models")
    statistics = stats.chunk_statistics(predictions, truth, bin_width)
    lut = fit_lut(statistics, [f"s{k}" for k in range(n_models)], solver=solver, shrinkage=10.0)
    assert len(lut.bin_digits) <= len(statistics.cells) and lut.filled_cells == len(statistics.cells)
    assert int(lut.bin_count.sum()) == 400 * 3
    np.testing.assert_allclose(lut.bin_weights.sum(axis=2), 1, atol=1e-5)
    back = Lut.from_dataset(lut.to_dataset())
    assert back.digest() == lut.digest() and (back.bin_digits == lut.bin_digits).all()
    ensemble = blend(predictions, lut.lookup_table(), bin_width)
    np.testing.assert_array_equal(ensemble[:60], per_pixel_reference(predictions[:, :60], lut))
    if solver in ("average", "zzpm"):
        assert (lut.bin_status == FitStatus.UNIFORM).all() and lut.fallback_status == FitStatus.UNIFORM


def test_hashed_lookup_gives_the_bytes_of_the_dense_table():
    predictions, truth = members(5, 3000, seed=3)
    lut = fit_lut(stats.chunk_statistics(predictions, truth, 32), list("abcde"))
    assert lut.is_small and len(lut.bin_digits) < lut.n_bins
    hashed = HashedWeights.of(words_of_digits(lut.bin_digits, 32), weights_with_fallback(lut.bin_weights, lut.fallback), 5, 32)
    other, _ = members(5, 3000, seed=4)  # bins the LUT never saw take the fallback
    for x in (predictions, other):
        np.testing.assert_array_equal(blend(x, hashed, 32), blend(x, lut.weights, 32))


def lut_storing(digits: np.ndarray, n_channels: int, bin_width: int, seed: int) -> Lut:
    """A LUT storing the bins `digits` (m, K), with random weights per cell and a random fallback."""
    rng = np.random.default_rng(seed)
    n_bins, n_models = digits.shape
    weights = rng.dirichlet(np.ones(n_models), (n_bins, n_channels)).astype(np.float32)
    return Lut(
        [f"m{k}" for k in range(n_models)],
        bin_width,
        weights,
        np.ones((n_bins, n_channels), np.int64),
        np.full((n_bins, n_channels), FitStatus.LEAST_SQUARES, np.int8),
        bin_digits=digits,
        fallback=rng.dirichlet(np.ones(n_models), n_channels).astype(np.float32),
    )


@pytest.mark.parametrize(
    "n_models, bin_width, n_pixels, n_channels, stored",
    [
        (8, 32, 0, 3, "most"),  # no pixels
        (8, 32, 1, 3, "most"),  # one pixel
        (8, 32, HASHED_BLOCK, 1, "most"),  # one whole block of one channel
        (8, 32, HASHED_BLOCK + 1, 1, "most"),  # one pixel-channel past it
        (8, 32, 400, 3, "most"),  # blocks that start on every channel (512 is no multiple of 3)
        (8, 32, 400, 3, "none"),  # no stored bin: every cell takes the fallback
        (3, 37, 300, 4, "most"),  # a bin width that is no power of two, 4 channels
        (2, 128, 50, 3, "all"),  # every bin seen is stored
        (16, 8, 300, 3, "most"),  # keys of two words
        (16, 1, 100, 3, "most"),  # keys of three words
    ],
)
def test_hashed_blend_matches_a_per_pixel_lookup(n_models, bin_width, n_pixels, n_channels, stored):
    predictions, _ = members(n_models, n_pixels, seed=n_pixels, channels=n_channels)
    seen = np.unique((predictions // bin_width).reshape(n_models, -1).T, axis=0).astype(np.uint8)
    keep = {
        "all": np.ones(len(seen), bool),
        "none": np.zeros(len(seen), bool),
        "most": np.random.default_rng(1).random(len(seen)) < 0.7,
    }[stored]  # the others take the fallback
    lut = lut_storing(seen[keep], n_channels, bin_width, seed=n_models)
    rows = weights_with_fallback(lut.bin_weights, lut.fallback)
    table = HashedWeights.of(words_of_digits(lut.bin_digits, bin_width), rows, n_models, bin_width)
    assert table.shape == (int(keep.sum()), n_channels, n_models) and table.slot_keys.shape[1] == key_words(n_models, bin_width)
    expected = per_pixel_reference(predictions, lut)
    np.testing.assert_array_equal(blend(predictions, table, bin_width), expected)
    if lut.n_bins <= INDEXED_BINS_LIMIT:  # the indexed table too, where its flat index is small
        indexed = IndexedWeights(flat_bins_of_digits(lut.bin_digits, bin_width), rows, n_models, bin_width)
        assert indexed.shape == table.shape
        np.testing.assert_array_equal(blend(predictions, indexed, bin_width), expected)


def test_the_lookup_table_is_chosen_by_size_and_an_indexed_one_travels_without_its_index():
    predictions, truth = members(8, 3000, seed=12)
    lut = fit_lut(stats.chunk_statistics(predictions, truth, 32), [f"m{k}" for k in range(8)])
    assert lut.n_bins == INDEXED_BINS_LIMIT and not lut.is_small
    table = lut.lookup_table()
    assert isinstance(table, IndexedWeights)
    expected = blend(predictions, table, 32)
    assert table.row_of_bin.dtype == np.uint16 and len(table.row_of_bin) == lut.n_bins  # built on first use
    travelled = pickle.loads(pickle.dumps(table))
    assert len(pickle.dumps(table)) < 2 * (table.weights.nbytes + table.flat_bins.nbytes)  # not the 33 MB index
    assert travelled._row_of_bin is None
    np.testing.assert_array_equal(blend(predictions, travelled, 32), expected)
    np.testing.assert_array_equal(expected, per_pixel_reference(predictions, lut))
    assert isinstance(fit_lut(stats.chunk_statistics(predictions[:3], truth, 32), list("abc")).lookup_table(), np.ndarray)


def test_indexed_tables_share_their_rows_say_their_size_and_refuse_what_they_cannot_index():
    predictions, truth = members(8, 2000, seed=14)
    statistics = stats.chunk_statistics(predictions, truth, 32)
    em, average = (fit_lut(statistics, [f"m{k}" for k in range(8)], solver=solver).lookup_table() for solver in ("em", "average"))
    assert isinstance(em, IndexedWeights) and (em.flat_bins == average.flat_bins).all()
    assert em.row_of_bin is average.row_of_bin  # the solvers of one fold (evaluate) share one 33 MB table
    assert sizeof(em) >= em.weights.nbytes + em.flat_bins.nbytes + em.row_of_bin.nbytes
    hashed = HashedWeights.of(words_of_digits(np.zeros((2, 8), np.uint8) + [[0], [1]], 32), em.weights[-3:], 8, 32)
    assert sizeof(hashed) >= hashed.slot_keys.nbytes + hashed.slot_rows.nbytes + hashed.weights.nbytes
    rows = em.weights[-3:]
    with pytest.raises(ValueError, match="more than an indexed table holds"):
        IndexedWeights(np.array([1, 2]), rows, 8, 16)  # 2^32 bins
    for bins in ([2, 2], [3, 2], [-1, 2], [1, 8**8]):
        with pytest.raises(ValueError, match="increasing flat indices"):
            IndexedWeights(np.array(bins), rows, 8, 32)


def test_an_indexed_table_of_more_rows_than_uint16_holds():
    n_bins = 70_000
    digits = np.stack(np.unravel_index(np.arange(0, 3 * n_bins, 3), (16,) * 6), axis=1).astype(np.uint8)  # K = 6, w = 16
    lut = lut_storing(digits, 1, 16, seed=13)
    table = IndexedWeights(flat_bins_of_digits(lut.bin_digits, 16), weights_with_fallback(lut.bin_weights, lut.fallback), 6, 16)
    assert table.row_of_bin.dtype == np.int32
    predictions = (digits[-500:].T[:, :, None].astype(np.int64) * 16 + np.arange(500)[None, :, None] % 16).astype(np.uint8)
    predictions[:, ::7] += 16  # most of these bins are stored, some not
    np.testing.assert_array_equal(blend(predictions, table, 16), per_pixel_reference(predictions, lut))


def test_hashed_blend_with_every_pixel_in_one_bin():
    predictions = np.random.default_rng(2).integers(64, 96, (8, 700, 3)).astype(np.uint8)  # w = 32: one bin
    lut = lut_storing(np.full((1, 8), 2, np.uint8), 3, 32, seed=2)
    table = HashedWeights.of(words_of_digits(lut.bin_digits, 32), weights_with_fallback(lut.bin_weights, lut.fallback), 8, 32)
    np.testing.assert_array_equal(blend(predictions, table, 32), per_pixel_reference(predictions, lut))


def test_digits_by_multiply_and_shift_equal_integer_division():
    values = np.arange(256, dtype=np.int64)
    for bin_width in range(1, 257):
        assert ((values * int(digit_multiplier(bin_width))) >> DIGIT_SHIFT).tolist() == (values // bin_width).tolist()


def test_cuckoo_table_says_when_full_and_refuses_duplicate_keys():
    slot_keys, slot_rows = np.full((8, 1), -1, np.int64), np.full(8, 9, np.int64)
    assert not fill_cuckoo_slots(np.arange(9, dtype=np.int64)[:, None], slot_keys, slot_rows, np.uint64(61))  # 9 keys, 8 slots
    weights, fallback = np.full((3, 3, 2), 0.5, np.float32), np.full((3, 2), 0.5, np.float32)
    with pytest.raises(ValueError, match="unique keys"):  # a key three times has two slots only, at any size
        HashedWeights.of(np.array([[5], [5], [5]]), weights_with_fallback(weights, fallback), 2, 32)
    table = HashedWeights.of(np.array([[5], [6], [7]]), weights_with_fallback(weights, fallback), 2, 32)
    assert sorted(table.slot_keys[:, 0][table.slot_keys[:, 0] >= 0].tolist()) == [5, 6, 7] and len(table.slot_rows) >= 2.5 * 3


def test_a_format_1_lut_loads_and_applies_to_the_same_bytes_and_digest():
    predictions, truth = members(3, 4000, seed=5)
    lut = fit_lut(stats.chunk_statistics(predictions, truth, 32), ["a", "b", "c"])
    assert len(lut.bin_digits) < bin_count(3, 32)  # stored sparsely
    ds = lut.to_dataset()
    assert ds.attrs["format_version"] == FORMAT_VERSION == 2 and ds.attrs["Conventions"] == "CF-1.10"
    assert ds["bin"].values.tolist() == flat_bins_of_digits(lut.bin_digits, 32).tolist()
    assert ds["channel"].values.tolist() == ["R", "G", "B"] and ds["model"].values.tolist() == ["a", "b", "c"]
    assert ds["fit_status"].attrs["flag_meanings"].split()[:3] == ["empty_fallback", "initial_weights", "em"]
    assert all("long_name" in ds[name].attrs for name in ("weights", "count", "fit_status", "fallback_weights", "bin_digits"))
    old = Lut.from_dataset(legacy_dataset(lut))
    assert len(old.bin_digits) == bin_count(3, 32)  # a dense table: every bin stored
    assert old.digest() == lut.digest()
    np.testing.assert_array_equal(old.weights, lut.weights)
    np.testing.assert_array_equal(old.count, lut.count)
    np.testing.assert_array_equal(old.fit_status, lut.fit_status)
    np.testing.assert_array_equal(blend(predictions, old.lookup_table(), 32), blend(predictions, lut.lookup_table(), 32))


def test_large_luts_never_build_the_dense_table():
    predictions, truth = members(16, 300, seed=6)
    lut = fit_lut(stats.chunk_statistics(predictions, truth, 16), [f"m{k}" for k in range(16)])
    assert lut.n_bins == 2**64 and not lut.is_small
    assert isinstance(lut.lookup_table(), HashedWeights)
    with pytest.raises(ValueError, match="too many for a dense table"):
        lut.weights  # noqa: B018 - the property raises
    ds = lut.to_dataset()
    assert "bin" not in ds.coords and ds["bin_digits"].dtype == np.uint8  # the flat index does not fit int64


def test_a_read_lut_gives_its_weights_to_the_lookup_table_without_a_copy(tmp_path):
    predictions, truth = members(8, 3000, seed=11)
    fitted = fit_lut(stats.chunk_statistics(predictions, truth, 32), [f"m{k}" for k in range(8)])
    assert not fitted.is_small
    write_lut(fitted, tmp_path / "lut.zarr")
    lut = read_lut(str(tmp_path / "lut.zarr"))
    np.testing.assert_array_equal(lut.bin_weights, fitted.bin_weights)
    table = lut.lookup_table()
    assert np.shares_memory(table.weights, lut.bin_weights)  # the weights read, with the fallback in the spare row
    np.testing.assert_array_equal(table.weights[-1], fitted.fallback)
    np.testing.assert_array_equal(lut.bin_weights, fitted.bin_weights)  # the fallback row is not the LUT's
    assert lut.digest() == fitted.digest()
    np.testing.assert_array_equal(blend(predictions, table, 32), blend(predictions, fitted.lookup_table(), 32))
    np.testing.assert_array_equal(blend(predictions, table, 32), per_pixel_reference(predictions, fitted))
    assert not np.shares_memory(fitted.lookup_table().weights, fitted.bin_weights)  # a LUT made in memory: copied
    mine = np.ones((len(fitted.bin_weights) + 1, *fitted.bin_weights.shape[1:]), np.float32)
    mine[:-1] = fitted.bin_weights
    assert not np.shares_memory(weights_with_fallback(mine[:-1], fitted.fallback), mine) and (mine[-1] == 1).all()  # not mine


def test_weights_stored_in_another_dimension_order_read_to_the_same_lut(tmp_path):
    predictions, truth = members(8, 2000, seed=12)
    fitted = fit_lut(stats.chunk_statistics(predictions, truth, 32), [f"m{k}" for k in range(8)])
    ds = fitted.to_dataset()
    ds["weights"] = ds["weights"].transpose("model", "bin", "channel")
    ds.to_zarr(tmp_path / "lut.zarr", zarr_format=3, consolidated=True)
    lut = read_lut(str(tmp_path / "lut.zarr"))
    assert lut.digest() == fitted.digest()
    np.testing.assert_array_equal(blend(predictions, lut.lookup_table(), 32), blend(predictions, fitted.lookup_table(), 32))


def test_format_2_refuses_bins_out_of_order_or_out_of_range():
    predictions, truth = members(4, 500, seed=7)
    ds = fit_lut(stats.chunk_statistics(predictions, truth, 64), list("abcd")).to_dataset()
    swapped = ds.copy(deep=True)
    swapped["bin_digits"].values[[0, 1]] = swapped["bin_digits"].values[[1, 0]]
    with pytest.raises(InputError, match="lut.zarr: bins are not stored once each in increasing order"):
        Lut.from_dataset(swapped, "lut.zarr")
    big = ds.copy(deep=True)
    big["bin_digits"].values[-1, 0] = 4
    with pytest.raises(InputError, match="a bin digit of 4 at bin width 64"):
        Lut.from_dataset(big, "lut.zarr")
    future = ds.copy()
    future.attrs["format_version"] = 9
    with pytest.raises(InputError, match="format version 9"):
        Lut.from_dataset(future, "lut.zarr")


@pytest.mark.parametrize("n_models", [2, 3, 4, 5])
def test_active_set_equals_enumeration(n_models):
    rng = np.random.default_rng(n_models)
    x = rng.normal(100, 30, (400, 40, n_models))
    y = rng.normal(100, 30, (400, 40))
    x[:150] = x[:150, :, :1] + rng.normal(0, 3, (150, 40, n_models))  # near-collinear models: sparse optima
    y[:150] = x[:150, :, 0] + rng.normal(0, 2, (150, 40))
    a, b = np.einsum("mpi,mpj->mij", x, x), np.einsum("mpi,mp->mi", x, y)
    np.testing.assert_allclose(active_set_simplex_least_squares(a, b), enumerated_simplex_least_squares(a, b), rtol=0, atol=1e-9)


def test_active_set_is_never_worse_than_enumeration_on_cell_statistics():
    """On real cells (sums over many pixels, near-collinear models) the two can differ where the
    optimum is flat: the active set's objective is then never higher (enumeration solves KKT
    systems of entries ~n * 255^2 and ~1 together, less accurately)."""
    predictions, truth = members(5, 20000, seed=8)
    table = stats.chunk_statistics(predictions, truth, 32)
    a, b = table.cross_products().astype(np.float64), table.sums_xy.astype(np.float64)
    objective = lambda w: np.einsum("mi,mij,mj->m", w, a, w) - 2 * (w * b).sum(axis=1)  # noqa: E731
    excess = objective(active_set_simplex_least_squares(a, b)) - objective(enumerated_simplex_least_squares(a, b))
    assert (excess <= 1e-9 * np.abs(objective(enumerated_simplex_least_squares(a, b)))).all()


def _write_members(root, n_members: int, kind: str, sizes=((20, 30), (24, 16), (18, 22))):
    """PNG folders gt/ and s00..: each image a slice of `members`."""
    names = [f"s{k:02d}" for k in range(n_members)]
    for folder in ("gt", *names):
        (root / folder).mkdir(parents=True)
    for i, (h, w) in enumerate(sizes):
        x, y = members(n_members, h * w, seed=10 + i, kind=kind)
        iio.imwrite(root / "gt" / f"img{i}.png", y.reshape(h, w, 3))
        for k, name in enumerate(names):
            iio.imwrite(root / name / f"img{i}.png", x[k].reshape(h, w, 3))
    return names


@pytest.mark.parametrize("n_members, bin_width", [(8, 32), (10, 16), (16, 8)])  # an indexed table, then hashed ones
def test_workflow_with_many_members(tmp_path, invoke, n_members, bin_width):
    names = _write_members(tmp_path / "corpus", n_members, "samples")
    store, lut_path, out = tmp_path / "s.zarr", tmp_path / "lut.zarr", tmp_path / "out.zarr"
    for args in (
        ["ingest", tmp_path / "corpus", store],
        ["fit", store, lut_path, "--bin-width", bin_width],
        ["apply", store, lut_path, out],
        ["lut", "export", lut_path, tmp_path / "lut.json"],
    ):
        result = invoke(*args, "--no-progress")
        assert result.exit_code == 0, result.output
    lut = Lut.from_dataset(xr.open_zarr(lut_path).load())
    assert lut.models == names and not lut.is_small
    predictions = xr.open_zarr(store)["prediction"].values
    np.testing.assert_array_equal(xr.open_zarr(out)["ensemble"].values, per_pixel_reference(predictions, lut))
    exported = json.loads((tmp_path / "lut.json").read_text())
    assert exported["format_version"] == 2 and np.array(exported["bin_digits"]).shape == lut.bin_digits.shape
    info = json.loads(invoke("info", lut_path, "--json").stdout)
    assert info["bins"] == ranges_per_model(bin_width) ** n_members and info["bins_stored"] == len(lut.bin_digits)
    assert sum(info["fit_status"].values()) == info["bins"] * 3
    report = invoke("evaluate", store, "--ensemble", out, "--report", tmp_path / "report", "--no-progress")
    assert report.exit_code == 0, report.output  # the LUT's maps are drawn from its stored bins
    assert (tmp_path / "report" / "index.html").is_file()


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda ds: ds.assign_coords(
                bin_digits=(("bin", "model"), np.where(np.arange(4) == 0, -1, ds["bin_digits"].values.astype(np.int64)))
            ),
            "a negative bin digit",
        ),
        (lambda ds: ds.assign_coords(bin_digits=(("bin", "model"), ds["bin_digits"].values + 0.5)), "bin_digits of type float64"),
        (lambda ds: ds.assign_coords(bin=ds["bin"].values[::-1].copy()), "the bin coordinate disagrees with the bins stored"),
        (lambda ds: ds.assign_coords(bin=ds["bin"].values + 1), "the bin coordinate disagrees with the bins stored"),
        (lambda ds: ds.assign_coords(model=["c", "b", "a", "d"]), r"the model coordinate \['c', 'b', 'a', 'd'\] disagrees"),
        (lambda ds: ds.assign_attrs(models="abcd"), "attribute models is 'abcd', not a list"),
        (lambda ds: ds.assign_attrs(bin_width=64.5), "attribute bin_width is 64.5, not an integer"),
        (lambda ds: ds.assign_attrs(format_version="2"), "LUT format version '2'"),
        (lambda ds: ds.assign_attrs(fallback_fit_status="x"), "attribute fallback_fit_status is 'x'"),
        (lambda ds: ds.rename({"channel": "colour"}), r"weights has dimensions \('bin', 'colour', 'model'\)"),
        (
            lambda ds: ds.assign(fallback_weights=(("c2", "model"), ds["fallback_weights"].values[:1])),
            "fallback_weights has dimensions",
        ),
        (lambda ds: ds.assign(count=ds["count"] - 10**6), "count holds a negative number"),
        (lambda ds: ds.assign(fit_status=ds["fit_status"] + 50), "fit_status holds a value that is not a fit status"),
    ],
)
def test_format_2_refuses_a_lut_edited_into_disagreement(edit, message):
    """A LUT store edited by someone else: every disagreement between its parts (a bin coordinate
    the digits do not make, digits that are not small non-negative integers, a model coordinate
    other than the models attribute, dimensions renamed) is refused with one line naming the store,
    never read one way and applied another (they were accepted, or failed with a traceback)."""
    predictions, truth = members(4, 500, seed=7)
    ds = fit_lut(stats.chunk_statistics(predictions, truth, 64), list("abcd")).to_dataset()
    assert Lut.from_dataset(ds, "lut.zarr").digest()  # the untouched LUT loads
    with pytest.raises(InputError, match=f"^lut.zarr: {message}"):
        Lut.from_dataset(edit(ds.copy(deep=True)), "lut.zarr")


def test_a_format_1_lut_refuses_a_bin_coordinate_out_of_flat_order():
    predictions, truth = members(3, 800, seed=8)
    legacy = legacy_dataset(fit_lut(stats.chunk_statistics(predictions, truth, 64), list("abc")))
    with pytest.raises(
        InputError, match="lut.zarr: the bin coordinate disagrees with the bins stored .row 0: bin 63, expected 0"
    ):
        Lut.from_dataset(legacy.assign_coords(bin=legacy["bin"].values[::-1].copy()), "lut.zarr")
