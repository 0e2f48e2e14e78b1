"""evaluate holds a strip of each image at a time, and scores it as the whole image was scored."""

import tracemalloc

import numpy as np
import pytest
import xarray as xr

from ensir_flow import metrics, schema
from ensir_flow.blend import AVERAGE, ENSEMBLE, ZZPM, average, blend, squared_distance_sums, zzpm
from ensir_flow.pipelines import evaluate
from ensir_flow.pipelines.chunks import pixel_array
from helpers import make_corpus

BIN_WIDTH = 64


@pytest.fixture
def store(tmp_path, invoke):
    """Odd image sizes, in chunks of 97 pixels: strips, chunks and images all end in different places."""
    make_corpus(tmp_path / "corpus", sizes=((61, 37), (45, 53), (14, 70)))
    assert invoke("ingest", tmp_path / "corpus", tmp_path / "s.zarr", "--chunk-pixels", 97, "--no-progress").exit_code == 0
    return tmp_path / "s.zarr"


def _arrays(store):
    return [pixel_array(str(store), name) for name in (schema.PREDICTION, schema.GROUND_TRUTH)]


def _whole_image_scores(predictions, truth, shape, names, luts, crop_border, y_channel):
    """The scores of one image held whole (the ground truth standing for an ensemble): every
    candidate made from all of the image's predictions, then `metrics.scores` on whole images."""
    candidates = {name: p.reshape(shape) for name, p in zip(names, predictions)}
    candidates[AVERAGE] = average(predictions).reshape(shape)
    candidates[ZZPM] = zzpm(predictions).reshape(shape)
    candidates[ENSEMBLE] = truth.reshape(shape)
    for method, (weights, bin_width) in luts.items():
        candidates[method] = blend(predictions, weights, bin_width).reshape(shape)
    psnrs, ssims = metrics.scores(list(candidates.values()), truth.reshape(shape), crop_border, y_channel)
    return {"psnr": dict(zip(candidates, psnrs)), "ssim": dict(zip(candidates, ssims))}


@pytest.mark.parametrize("options", [{"crop_border": 0, "y_channel": False}, {"crop_border": 2, "y_channel": True}])
def test_strips_score_each_image_as_a_whole(store, options):
    ds = xr.open_zarr(store)
    names = list(ds.attrs["models"])
    rng = np.random.default_rng(0)
    weights = rng.random(((256 // BIN_WIDTH) ** len(names), 3, len(names)), dtype=np.float32)
    luts = {"lut": (weights / weights.sum(axis=2, keepdims=True), BIN_WIDTH)}
    predictions, truth = ds[schema.PREDICTION].values, ds[schema.GROUND_TRUTH].values
    arrays = _arrays(store)
    for h, w, offset in zip(ds["height"].values, ds["width"].values, ds["pixel_offset"].values):
        shape, pixels = (int(h), int(w), 3), slice(int(offset), int(offset + h * w))
        expected = _whole_image_scores(predictions[:, pixels], truth[pixels], shape, names, luts, **options)
        for strip_pixels in (130, 777, 10**6):  # a few rows a strip, ZZPM in many pieces; one strip
            got = evaluate.image_scores(
                *arrays, arrays[1], int(offset), shape, names, options["crop_border"], options["y_channel"], luts, strip_pixels
            )
            assert list(got["psnr"]) == list(expected["psnr"])
            np.testing.assert_array_equal(list(got["ssim"].values()), list(expected["ssim"].values()))
            if options["y_channel"]:  # luma's float squared errors, summed per strip
                np.testing.assert_allclose(list(got["psnr"].values()), list(expected["psnr"].values()), rtol=1e-13)
            else:
                assert got["psnr"] == expected["psnr"]
            assert got["psnr"][ENSEMBLE] == float("inf")


def test_zzpm_distances_gathered_in_pieces_are_those_of_the_whole_image(store):
    """The sums ZZPM's weights come from, read piece by piece: the bits of the whole image's."""
    ds = xr.open_zarr(store)
    predictions = ds[schema.PREDICTION].values
    for h, w, offset in zip(ds["height"].values, ds["width"].values, ds["pixel_offset"].values):
        whole = squared_distance_sums(predictions[:, int(offset) : int(offset + h * w)])
        for piece_values in (128, 300, 1000, 10**6):
            pieces = evaluate._squared_distance_sums(_arrays(store)[0], int(offset), (int(h), int(w), 3), piece_values)
            assert pieces.tobytes() == whole.tobytes(), piece_values


def test_a_task_reads_a_strip_at_a_time(store, monkeypatch):
    """No read of a task is larger than a strip and its SSIM halo, though every pixel is read."""
    reads = []
    read_pixels = evaluate.read_pixels

    def recorded(array, start, stop):
        reads.append((start, stop))
        return read_pixels(array, start, stop)

    monkeypatch.setattr(evaluate, "read_pixels", recorded)
    ds = xr.open_zarr(store)
    h, w, offset = (int(ds[name].values[0]) for name in ("height", "width", "pixel_offset"))
    rows = 3
    evaluate.image_scores(*_arrays(store), None, offset, (h, w, 3), list(ds.attrs["models"]), 0, False, None, rows * w)
    assert max(stop - start for start, stop in reads) <= (rows + metrics.SSIM_WINDOW - 1) * w
    covered = np.zeros(h * w, bool)
    for start, stop in reads:
        covered[start - offset : stop - offset] = True
    assert covered.all()


def _traced_peak(function) -> int:
    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_is_bounded_by_the_strip(tmp_path, invoke):
    """An image of 0.4 Mpx scored in strips of 20 rows allocates a tenth at most of what it takes
    scored in one strip (numpy's allocations, as tracemalloc sees them)."""
    make_corpus(tmp_path / "corpus", sizes=((400, 1000),))
    assert invoke("ingest", tmp_path / "corpus", tmp_path / "s.zarr", "--chunk-pixels", 8192, "--no-progress").exit_code == 0
    arrays = _arrays(tmp_path / "s.zarr")
    names = ["model0", "model1", "model2"]

    def scores(height, strip_pixels):
        return evaluate.image_scores(*arrays, None, 0, (height, 1000, 3), names, 0, True, None, strip_pixels)

    scores(40, 20000)  # the kernels loaded, zarr's caches filled
    whole, strips = _traced_peak(lambda: scores(400, 10**6)), _traced_peak(lambda: scores(400, 20000))
    assert strips < whole / 10, f"{strips / 2**20:.1f} MiB at the peak in strips, {whole / 2**20:.1f} MiB in one"
    assert scores(400, 20000)["ssim"] == scores(400, 10**6)["ssim"]
