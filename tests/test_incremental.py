"""Scheduled reprocessing: apply updates an output whose store has grown by `ingest --append`."""

import shutil

import imageio.v3 as iio
import numpy as np
import pytest
import xarray as xr

from helpers import contents, make_corpus

SIZES = ((24, 32), (17, 29), (40, 21), (30, 30), (12, 50))


def _nights(root, tmp_path, parts):
    """Folders with the stems of each night (all folders of the full corpus)."""
    models = make_corpus(root, sizes=SIZES)
    folders = []
    for night, stems in enumerate(parts):
        folder = tmp_path / f"night{night}"
        for sub in ("gt", *models):
            (folder / sub).mkdir(parents=True)
            for stem in stems:
                shutil.copy(root / sub / f"{stem}.png", folder / sub)
        folders.append(folder)
    return folders


def _files(folder):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


def _chunk_bytes(store):
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted((store / "ensemble").rglob("*")) if p.is_file()}


@pytest.mark.parametrize("solver", ["em", "zzpm"])
def test_apply_after_append_updates_only_the_new_images(tmp_path, invoke, solver):
    first, second = _nights(tmp_path / "full", tmp_path, [("img0", "img1", "img2"), ("img3", "img4")])
    store, lut, out, png = tmp_path / "s.zarr", tmp_path / "lut.zarr", tmp_path / "out.zarr", tmp_path / "png"
    assert invoke("ingest", first, store, "--chunk-pixels", 700, "--no-progress").exit_code == 0
    assert invoke("fit", store, lut, "--solver", solver, "--no-progress").exit_code == 0
    assert invoke("apply", store, lut, out, "--export-dir", png, "--no-progress").exit_code == 0
    before = _files(png)
    assert invoke("ingest", second, store, "--append", "--no-progress").exit_code == 0

    result = invoke("apply", store, lut, out, "--export-dir", png, "--no-progress")
    assert result.exit_code == 0, result.output
    n_chunks = -(-xr.open_zarr(store).sizes["pixel"] // 700)
    first_redone = (24 * 32 + 17 * 29 + 40 * 21) // 700
    assert f"updated {out}: 2 new image(s), {n_chunks - first_redone} of {n_chunks} chunks computed" in result.stdout

    fresh, fresh_png = tmp_path / "fresh.zarr", tmp_path / "fresh-png"
    assert invoke("apply", store, lut, fresh, "--export-dir", fresh_png, "--no-progress").exit_code == 0
    xr.testing.assert_identical(contents(out), contents(fresh))
    assert _chunk_bytes(out) == _chunk_bytes(fresh)
    after = _files(png)
    assert {name: before[name] for name in before} == {name: after[name] for name in before}  # untouched: same inode, time
    assert sorted(after) == sorted(p.name for p in fresh_png.iterdir()) == [f"img{i}.png" for i in range(5)]
    for name in ("img3.png", "img4.png"):  # the same pixels (the PNGs name their store: out.zarr or fresh.zarr)
        np.testing.assert_array_equal(iio.imread(png / name), iio.imread(fresh_png / name))

    again = invoke("apply", store, lut, out, "--export-dir", png, "--no-progress")
    assert again.exit_code == 0 and "already complete: nothing to do" in again.stdout


def test_apply_refuses_an_update_with_another_lut_or_a_store_changed_otherwise(tmp_path, invoke):
    first, second = _nights(tmp_path / "full", tmp_path, [("img0", "img1"), ("img2",)])
    store, out = tmp_path / "s.zarr", tmp_path / "out.zarr"
    assert invoke("ingest", first, store, "--no-progress").exit_code == 0
    assert invoke("fit", store, tmp_path / "a.zarr", "--no-progress").exit_code == 0
    assert invoke("fit", store, tmp_path / "b.zarr", "--bin-width", 64, "--no-progress").exit_code == 0
    assert invoke("apply", store, tmp_path / "a.zarr", out, "--no-progress").exit_code == 0
    assert invoke("ingest", second, store, "--append", "--no-progress").exit_code == 0
    other_lut = invoke("apply", store, tmp_path / "b.zarr", out, "--no-progress")
    assert other_lut.exit_code == 1 and "already exists (pass --overwrite" in other_lut.stderr
    rebuilt = tmp_path / "rebuilt.zarr"  # same images in another store: not the store the output came from
    assert invoke("ingest", tmp_path / "full", rebuilt, "--no-progress").exit_code == 0
    elsewhere = invoke("apply", rebuilt, tmp_path / "a.zarr", out, "--no-progress")
    assert elsewhere.exit_code == 1 and "already exists (pass --overwrite" in elsewhere.stderr
    assert np.array_equal(xr.open_zarr(out)["image"].values, ["img0", "img1"])


def test_three_nights_of_append_apply_export_equal_one_run_over_everything(tmp_path, invoke):
    """The cron line run on three nights, each with new frames (the first creates the store), then
    a night with nothing new: the output and the export folder equal one run over everything."""
    nights = _nights(tmp_path / "full", tmp_path, [("img0", "img1"), ("img2",), ("img3", "img4")])
    reference = tmp_path / "reference.zarr"
    assert invoke("ingest", nights[0], reference, "--no-progress").exit_code == 0
    lut = tmp_path / "lut.zarr"
    assert invoke("fit", reference, lut, "--no-progress").exit_code == 0
    store, out, png = tmp_path / "s.zarr", tmp_path / "out.zarr", tmp_path / "png"
    for night in [*nights, nights[-1]]:
        appended = invoke("ingest", night, store, "--append", "--no-progress")
        assert appended.exit_code == 0, appended.output
        applied = invoke("apply", store, lut, out, "--export-dir", png, "--no-progress")
        assert applied.exit_code == 0, applied.output
    assert "nothing to do" in appended.stdout and "already complete: nothing to do" in applied.stdout

    assert invoke("ingest", tmp_path / "full", tmp_path / "once.zarr", "--no-progress").exit_code == 0
    assert (
        invoke(
            "apply",
            tmp_path / "once.zarr",
            lut,
            tmp_path / "once-out.zarr",
            "--export-dir",
            tmp_path / "once-png",
            "--no-progress",
        ).exit_code
        == 0
    )
    grown, once = xr.open_zarr(out).load(), xr.open_zarr(tmp_path / "once-out.zarr").load()
    for name in ("ensemble", "height", "width", "pixel_offset", "pixel_count", "image"):
        np.testing.assert_array_equal(grown[name].values, once[name].values, err_msg=name)
    assert _chunk_bytes(out) == _chunk_bytes(tmp_path / "once-out.zarr")
    assert sorted(p.name for p in png.iterdir()) == sorted(p.name for p in (tmp_path / "once-png").iterdir())
    for path in png.iterdir():
        np.testing.assert_array_equal(iio.imread(path), iio.imread(tmp_path / "once-png" / path.name))
