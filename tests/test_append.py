"""ingest --append: new images only, same result as one ingest, nothing changed when it fails."""

import shutil

import numpy as np
import xarray as xr

from helpers import make_corpus


def _split_corpus(tmp_path):
    full = tmp_path / "full"
    models = make_corpus(full, sizes=((24, 32), (17, 29), (40, 21), (30, 30)))
    first, second = tmp_path / "first", tmp_path / "second"
    for folder in ("gt", *models):
        for part, stems in ((first, ("img0", "img1")), (second, ("img1", "img2", "img3"))):
            (part / folder).mkdir(parents=True, exist_ok=True)
            for stem in stems:
                shutil.copy(full / folder / f"{stem}.png", part / folder / f"{stem}.png")
    return full, first, second, models


def test_append_equals_a_single_ingest(tmp_path, invoke):
    full, first, second, models = _split_corpus(tmp_path)
    assert invoke("ingest", full, tmp_path / "whole.zarr", "--chunk-pixels", 500, "--no-progress").exit_code == 0
    assert invoke("ingest", first, tmp_path / "s.zarr", "--chunk-pixels", 500, "--no-progress").exit_code == 0
    result = invoke("ingest", second, tmp_path / "s.zarr", "--append", "--no-progress")
    assert result.exit_code == 0 and "appended 2 new image(s)" in result.stdout, result.output
    whole, appended = xr.open_zarr(tmp_path / "whole.zarr"), xr.open_zarr(tmp_path / "s.zarr")
    for name in ("prediction", "ground_truth", "height", "width", "pixel_offset", "pixel_count", "source_sha256", "source_file"):
        np.testing.assert_array_equal(appended[name].values, whole[name].values, err_msg=name)
    assert list(appended["image"].values) == list(whole["image"].values)
    assert appended["prediction"].encoding["chunks"] == whole["prediction"].encoding["chunks"]
    again = invoke("ingest", second, tmp_path / "s.zarr", "--append", "--no-progress")
    assert again.exit_code == 0 and "nothing to do" in again.stdout, again.output


def test_append_refuses_other_models_and_fails_without_changing_the_store(tmp_path, invoke):
    full, first, second, models = _split_corpus(tmp_path)
    assert invoke("ingest", first, tmp_path / "s.zarr", "--chunk-pixels", 500, "--no-progress").exit_code == 0
    before = xr.open_zarr(tmp_path / "s.zarr").load()
    shutil.copytree(second / "model0", second / "model9")
    refused = invoke("ingest", second, tmp_path / "s.zarr", "--append", "--no-progress")
    assert refused.exit_code != 0 and "not in the store: model9" in refused.stderr
    shutil.rmtree(second / "model9")
    reordered = invoke("ingest", second, tmp_path / "s.zarr", "--append", "--models", "model1,model0,model2", "--no-progress")
    assert reordered.exit_code != 0 and "differ from the store's ['model0', 'model1', 'model2']" in reordered.stderr
    broken = second / "model2" / "img3.png"
    broken.write_bytes(broken.read_bytes()[:100])
    failed = invoke("ingest", second, tmp_path / "s.zarr", "--append", "--no-progress")
    assert failed.exit_code != 0 and "img3.png" in failed.stderr
    after = xr.open_zarr(tmp_path / "s.zarr").load()
    xr.testing.assert_identical(after, before)


def test_append_refuses_an_image_whose_source_changed(tmp_path, invoke):
    full, first, second, models = _split_corpus(tmp_path)
    assert invoke("ingest", first, tmp_path / "s.zarr", "--no-progress").exit_code == 0
    before = xr.open_zarr(tmp_path / "s.zarr").load()
    changed = second / "model1" / "img1.png"  # img1 is in the store already
    shutil.copy(second / "model1" / "img2.png", changed)  # other content, same stem (sizes differ: any bytes do)
    refused = invoke("ingest", second, tmp_path / "s.zarr", "--append", "--no-progress")
    assert refused.exit_code == 1, refused.output
    assert "1 image(s) already in" in refused.stderr and "model1/img1.png" in refused.stderr and "--overwrite" in refused.stderr
    xr.testing.assert_identical(xr.open_zarr(tmp_path / "s.zarr").load(), before)
