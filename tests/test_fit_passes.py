"""A fit whose statistics would not fit one pass is made in passes over ranges of cells, and
writes the LUT a single pass writes, bit for bit."""

import errno
import io
import tempfile
import types

import numpy as np
import pytest
from test_sparse_lut import members

from ensir_flow import stats
from ensir_flow.errors import TransientError
from ensir_flow.lut import fit_lut
from ensir_flow.pipelines import fit as fit_pipeline
from ensir_flow.pipelines.executor import threaded_compute
from ensir_flow.pipelines.fit import CellRanges, plan_fit
from ensir_flow.pipelines.lut_io import read_lut
from ensir_flow.stats import FIRST_BINS_END
from helpers import make_corpus

SIZES = ((40, 36), (33, 29), (38, 41), (30, 30))


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Reference stores of K = 5 and 16 models (4 images, in chunks of 1,000 pixels)."""
    from click.testing import CliRunner

    from ensir_flow.cli import main

    root, made = tmp_path_factory.mktemp("passes"), {}
    for n_models in (5, 16):
        make_corpus(root / f"corpus{n_models}", n_models, SIZES, seed=n_models)
        made[n_models] = root / f"k{n_models}.zarr"
        result = CliRunner().invoke(
            main,
            [
                "ingest",
                str(root / f"corpus{n_models}"),
                str(made[n_models]),
                "--chunk-pixels",
                "1000",
                "--scheduler",
                "threads",
                "--no-progress",
            ],
        )
        assert result.exit_code == 0, result.output
    return made


def _fit(store, lut_path, bin_width, solver, shrinkage, pass_bytes=None):
    """Fit, returning the labels of the computations it ran."""
    labels = []

    def compute(*collections, label=""):
        labels.append(label)
        return threaded_compute(*collections, label=label)

    options = {} if pass_bytes is None else {"pass_bytes": pass_bytes}
    plan_fit(str(store), str(lut_path), bin_width, solver, "cpu", False, shrinkage, **options).run(compute)
    return labels


@pytest.mark.parametrize(
    "n_models, bin_width, solver, shrinkage",
    [
        (16, 16, "em", None),
        (16, 16, "average", None),
        (16, 16, "zzpm", None),
        (5, 16, "em", None),
        pytest.param(5, 16, "lsq", None, marks=pytest.mark.slow),  # held-out errors of 7 strengths x 4 folds, range by range
        (5, 16, "lsq", 10.0),
        (16, 8, "em", None),
        (5, 16, "select", None),
    ],
)
def test_a_fit_in_passes_writes_the_lut_of_a_single_pass(stores, tmp_path, n_models, bin_width, solver, shrinkage):
    store = stores[n_models]
    single = _fit(store, tmp_path / "single.zarr", bin_width, solver, shrinkage)
    passes = _fit(store, tmp_path / "passes.zarr", bin_width, solver, shrinkage, pass_bytes=512 << 10)
    assert single == ["statistics", "write LUT"]
    assert sum(label.startswith("statistics, pass") for label in passes) >= 3, passes
    one, many = read_lut(str(tmp_path / "single.zarr")), read_lut(str(tmp_path / "passes.zarr"))
    assert one.digest() == many.digest()
    for name in ("bin_digits", "bin_weights", "bin_count", "bin_status", "fallback"):
        np.testing.assert_array_equal(getattr(one, name), getattr(many, name), err_msg=name)
    assert one.fallback_status == many.fallback_status and one.solver == many.solver
    chosen = {key: value for key, value in one.attrs.items() if key != "shrinkage_held_out_mse"}
    assert chosen == {key: value for key, value in many.attrs.items() if key != "shrinkage_held_out_mse"}
    if "shrinkage_held_out_mse" in one.attrs:  # the folds' errors, summed over the ranges in another order
        assert one.attrs["shrinkage_held_out_mse"].keys() == many.attrs["shrinkage_held_out_mse"].keys()
        np.testing.assert_allclose(
            list(one.attrs["shrinkage_held_out_mse"].values()), list(many.attrs["shrinkage_held_out_mse"].values()), rtol=1e-9
        )
        assert sum(label.startswith("held-out errors, pass") for label in passes) >= 3


def test_small_statistics_are_gathered_in_one_pass(stores, tmp_path):
    """K = 5 at bin width 64 has 3 * 4^5 cells: never more than the default pass holds."""
    assert _fit(stores[5], tmp_path / "lut.zarr", 64, "em", None) == ["statistics", "write LUT"]


def test_statistics_that_might_exceed_a_pass_but_do_not_are_gathered_in_one(stores, tmp_path, invoke):
    """K = 16 at bin width 128 might have 3 * 2^16 cells, more than a pass of 5 MiB holds; a
    sample of the cells shows far fewer, so the first pass gathers the statistics as well."""
    result = invoke("ingest", stores[16].parent / "corpus16", tmp_path / "one-chunk.zarr", "--no-progress")
    assert result.exit_code == 0, result.output
    single = _fit(tmp_path / "one-chunk.zarr", tmp_path / "single.zarr", 128, "em", None)
    guarded = _fit(tmp_path / "one-chunk.zarr", tmp_path / "guarded.zarr", 128, "em", None, pass_bytes=5 << 20)
    assert single == ["statistics", "write LUT"] and guarded == ["statistics and a sample of cells", "write LUT"]
    assert read_lut(str(tmp_path / "single.zarr")).digest() == read_lut(str(tmp_path / "guarded.zarr")).digest()


@pytest.mark.parametrize("n_models, bin_width", [(3, 4), (8, 32), (16, 16)])
def test_statistics_of_ranges_of_cells_add_up_to_the_chunks(n_models, bin_width):
    predictions, truth = members(n_models, 3000, seed=n_models)
    whole = stats.chunk_statistics(predictions, truth, bin_width, moments_kind=stats.EM_MOMENTS)
    first_bins = np.unique(stats.first_bin_of_keys(whole.cells, 3))
    cuts = [0, int(first_bins[len(first_bins) // 3]), int(first_bins[2 * len(first_bins) // 3]), FIRST_BINS_END]
    parts = [
        stats.chunk_statistics(predictions, truth, bin_width, moments_kind=stats.EM_MOMENTS, first_bins=(lo, hi))
        for lo, hi in zip(cuts[:-1], cuts[1:])
    ]
    assert all(len(part.cells) for part in parts)
    merged = stats.merge(*parts)
    for name in ("cells", "moments", "hist_keys", "hist_counts"):
        np.testing.assert_array_equal(getattr(merged, name), getattr(whole, name), err_msg=name)
    # each range's cells are a run of the sorted cells: the ranges' LUT bins concatenate in order
    np.testing.assert_array_equal(np.concatenate([part.cells for part in parts]), whole.cells)


def test_ranges_cover_every_cell_once_and_follow_what_was_gathered():
    sample = np.repeat(np.arange(0, 2000, 2), 3)  # first bins 0, 2, .., 1998, three sampled cells each
    ranges = CellRanges(sample, cell_bytes=10.0, pass_bytes=8 * 10 * 30)  # first guess: 8 x 10 bytes a sampled cell
    seen, start = [], 0
    for lo, hi in ranges:
        assert lo == start and hi > lo
        seen.append((lo, hi))
        n_sampled = int(np.searchsorted(sample, hi) - np.searchsorted(sample, lo))
        # what the range turned out to hold: 20 bytes a sampled cell, a quarter of the first guess
        ranges.gathered((lo, hi), [_statistics_of_bytes(20 * n_sampled)])
        start = hi
    assert seen[-1][1] == FIRST_BINS_END
    sizes = [np.searchsorted(sample, hi) - np.searchsorted(sample, lo) for lo, hi in seen]
    assert sizes[0] == 30 and all(size == 120 for size in sizes[1:-1]), sizes  # 240 bytes, then 2400 bytes a range


def test_a_range_holds_a_first_bin_shared_by_more_cells_than_a_pass_holds():
    """A range is never empty of sampled cells (a pass over nothing would read the store for
    nothing), and holds all the sampled cells of a first bin, however many."""
    sample = np.array([5] * 100 + [7, 9])
    ranges = CellRanges(sample, cell_bytes=1.0, pass_bytes=8 * 10)  # 10 sampled cells a pass
    cut = []
    for first_bins in ranges:
        cut.append(first_bins)
        ranges.gathered(first_bins, [_statistics_of_bytes(0)])
    assert cut[0] == (0, 7) and cut[-1][1] == FIRST_BINS_END
    assert all(np.searchsorted(sample, hi) > np.searchsorted(sample, lo) for lo, hi in cut)


def _statistics_of_bytes(n_bytes: int) -> stats.CellStatistics:
    """Statistics whose arrays hold `n_bytes` (for `CellRanges.gathered`)."""
    empty = stats.empty_statistics(3, 3, 32)
    return stats.CellStatistics(3, 3, 32, empty.cells, empty.moments, np.zeros(n_bytes // 8, np.int64), empty.hist_counts)


def test_the_cli_fits_in_passes_under_a_small_pass_memory(stores, tmp_path, invoke):
    for name, options in (("default.zarr", []), ("passes.zarr", ["--pass-memory", "1"])):
        result = invoke("fit", stores[16], tmp_path / name, "--bin-width", "16", "--no-progress", *options)
        assert result.exit_code == 0, result.output
    assert read_lut(str(tmp_path / "default.zarr")).digest() == read_lut(str(tmp_path / "passes.zarr")).digest()
    refused = invoke("fit", stores[16], tmp_path / "never.zarr", "--pass-memory", "0", "--no-progress")
    assert refused.exit_code == 2 and "--pass-memory" in refused.output and not (tmp_path / "never.zarr").exists()


def test_a_store_replaced_between_passes_is_refused_and_nothing_written(tmp_path, invoke):
    """Passes read the store several times: a store replaced by another ingest in between would
    give a LUT of two sets of images. Refused (exit 75: running fit again may succeed)."""
    for name, seed in (("corpus", 1), ("other", 2)):
        make_corpus(tmp_path / name, 16, SIZES, seed=seed)
    store, lut_path = tmp_path / "k16.zarr", tmp_path / "lut.zarr"
    assert invoke("ingest", tmp_path / "corpus", store, "--chunk-pixels", "1000", "--no-progress").exit_code == 0

    def compute(*collections, label=""):
        result = threaded_compute(*collections, label=label)
        if label == "statistics, pass 1":
            replaced = invoke("ingest", tmp_path / "other", store, "--chunk-pixels", "1000", "--overwrite", "--no-progress")
            assert replaced.exit_code == 0, replaced.output
        return result

    with pytest.raises(TransientError, match="replaced while fit read it"):
        plan_fit(str(store), str(lut_path), 16, "em", "cpu", False, None, pass_bytes=512 << 10).run(compute)
    assert not lut_path.exists() and not list(tmp_path.glob("lut.zarr*"))


def test_a_full_disk_under_the_temporary_files_names_their_folder(monkeypatch):
    """The LUT's bins go to unnamed temporary files: a full disk there is reported as that folder
    being full (errno kept, so the CLI says to free space), not as a failure of the LUT."""

    class Full(io.BytesIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fit_pipeline.tempfile, "TemporaryFile", lambda **options: Full())
    predictions, truth = members(16, 500)
    lut = fit_lut(stats.chunk_statistics(predictions, truth, 16), [f"s{k}" for k in range(16)])
    with pytest.raises(OSError) as raised:
        fit_pipeline.StoredBins().append(lut)
    assert raised.value.errno == errno.ENOSPC and tempfile.gettempdir() in raised.value.filename


class _StoreIndex(dict):
    """What `_what_fit_reads` reads of a store: variables by name, and attributes."""

    def __init__(self, sha256s, **attrs):
        super().__init__(source_sha256=types.SimpleNamespace(values=np.array(sha256s, dtype=object)))
        self.attrs = attrs


def test_what_fit_reads_covers_the_planned_images_and_how_predictions_were_made():
    planned = fit_pipeline._what_fit_reads(_StoreIndex([["a", "b"]], model_files={"m": "1"}, created="x"), 2)
    appended = _StoreIndex([["a", "b", "c"]], model_files={"m": "1"}, created="y", appended="z")
    assert fit_pipeline._what_fit_reads(appended, 2) == planned  # an append leaves the planned images as they were
    for changed in (_StoreIndex([["a", "B"]], model_files={"m": "1"}), _StoreIndex([["a", "b"]], model_files={"m": "2"})):
        assert fit_pipeline._what_fit_reads(changed, 2) != planned
