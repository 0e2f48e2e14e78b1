"""Bad input: a one-line message naming the file and the problem, non-zero exit, nothing written."""

import shutil

import imageio.v3 as iio
import numpy as np
import pytest

from helpers import make_corpus


def _refused(invoke, tmp_path, *args, match: str):
    result = invoke(*args, "--no-progress")
    assert result.exit_code != 0
    message = result.stderr.strip()
    assert "\n" not in message, message
    assert match in message, message
    leftovers = [p.name for p in tmp_path.rglob("*") if ".partial-" in p.name or p.suffix == ".zarr"]
    assert leftovers == [], leftovers
    return message


@pytest.fixture
def root(tmp_path):
    path = tmp_path / "corpus"
    make_corpus(path)
    return path


def test_model_folder_missing_an_image(tmp_path, invoke, root):
    (root / "model1" / "img2.png").unlink()
    _refused(invoke, tmp_path, "ingest", root, tmp_path / "s.zarr", match="model1: missing 1 image(s) present in gt/: img2")


@pytest.mark.parametrize("name", ["average", "zzpm", "ensemble", "em", "lsq@32"])
def test_model_folder_named_as_an_evaluated_combination(tmp_path, invoke, root, name):
    """evaluate scores the models beside average, zzpm and ensemble (and, with --cv, each solver as
    em or em@32) by name: a model of one of these names would lose its row to the combination (or
    take its place) with exit 0."""
    (root / "model1").rename(root / name)
    _refused(
        invoke,
        tmp_path,
        "ingest",
        root,
        tmp_path / "s.zarr",
        match=f"a model named '{name}', the name of a combination evaluate scores",
    )


def test_truncated_image(tmp_path, invoke, root):
    path = root / "model0" / "img1.png"
    path.write_bytes(path.read_bytes()[:200])
    message = _refused(invoke, tmp_path, "ingest", root, tmp_path / "s.zarr", match=str(path))
    assert "cannot decode" in message or "not a readable image" in message


def test_zero_byte_and_non_image_files(tmp_path, invoke, root):
    empty = root / "model0" / "img1.png"
    empty.write_bytes(b"")
    _refused(invoke, tmp_path, "ingest", root, tmp_path / "s.zarr", match=f"{empty}: not a readable image")
    make_corpus(tmp_path / "c2")
    fake = tmp_path / "c2" / "gt" / "img0.png"
    fake.write_text("this is not a png")
    _refused(invoke, tmp_path, "ingest", tmp_path / "c2", tmp_path / "s.zarr", match=f"{fake}: not a readable image")


def test_shapes_differ_between_gt_and_model(tmp_path, invoke, root):
    iio.imwrite(root / "model2" / "img0.png", np.zeros((10, 10, 3), np.uint8))
    _refused(invoke, tmp_path, "ingest", root, tmp_path / "s.zarr", match="model2/img0.png: 10x10x3 differs from")


def test_grayscale_mixed_with_colour(tmp_path, invoke, root):
    for folder in ("gt", "model0", "model1", "model2"):
        iio.imwrite(root / folder / "img1.png", np.zeros((17, 29), np.uint8))
    _refused(invoke, tmp_path, "ingest", root, tmp_path / "s.zarr", match="mixes grayscale (e.g. 'img1') and colour")


def test_rgba_with_transparency_refused_and_opaque_converted(tmp_path, invoke, root):
    rgb = iio.imread(root / "model0" / "img0.png")
    opaque = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
    (root / "model0" / "img0.png").unlink()
    iio.imwrite(root / "model0" / "img0.png", opaque)
    result = invoke("ingest", root, tmp_path / "ok.zarr", "--no-progress")
    assert result.exit_code == 0, result.output
    shutil.rmtree(tmp_path / "ok.zarr")
    opaque[0, 0, 3] = 10
    iio.imwrite(root / "model0" / "img0.png", opaque)
    _refused(invoke, tmp_path, "ingest", root, tmp_path / "s.zarr", match="RGBA image with transparency")


@pytest.mark.parametrize("dtype,name", [(np.uint16, "uint16"), (np.float32, "float32")])
def test_sixteen_bit_and_float_refused(tmp_path, invoke, root, dtype, name):
    (root / "gt" / "img0.png").unlink()
    iio.imwrite(root / "gt" / "img0.tif", np.full((24, 32, 3), 300, dtype))  # paired by stem with the PNGs
    _refused(invoke, tmp_path, "ingest", root, tmp_path / "s.zarr", match=f"img0.tif: {name} pixels are not supported")


def test_mixed_extensions_pair_by_stem(tmp_path, invoke, root):
    pixels = iio.imread(root / "gt" / "img0.png")
    (root / "gt" / "img0.png").unlink()
    iio.imwrite(root / "gt" / "img0.bmp", pixels)
    assert invoke("ingest", root, tmp_path / "s.zarr", "--no-progress").exit_code == 0


def test_empty_and_missing_folders(tmp_path, invoke, root):
    for path in (root / "model1").iterdir():
        path.unlink()
    _refused(invoke, tmp_path, "ingest", root, tmp_path / "s.zarr", match="model1: no images")
    _refused(invoke, tmp_path, "ingest", root, tmp_path / "s.zarr", "--models", "model0,nope", match="nope: folder not found")


def test_not_a_store(tmp_path, invoke):
    (tmp_path / "x.zarr").mkdir()
    result = invoke("fit", tmp_path / "x.zarr", tmp_path / "lut.zarr", "--no-progress")
    assert result.exit_code != 0 and "x.zarr" in result.stderr and "\n" not in result.stderr.strip()


def test_store_from_a_newer_schema_is_refused(tmp_path, invoke, root):
    import zarr

    assert invoke("ingest", root, tmp_path / "s.zarr", "--no-progress").exit_code == 0
    group = zarr.open_group(tmp_path / "s.zarr", mode="r+")
    group.attrs["schema_version"] = 99
    zarr.consolidate_metadata(tmp_path / "s.zarr")
    result = invoke("fit", tmp_path / "s.zarr", tmp_path / "lut.zarr", "--no-progress")
    assert result.exit_code != 0 and "written by a newer ensir-flow (schema 99" in result.stderr
    assert not (tmp_path / "lut.zarr").exists()
