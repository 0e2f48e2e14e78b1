"""PNG writing: lossless at every compression level, readable by other decoders, marked."""

import io

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

from ensir_flow.images import DEFAULT_PNG_COMPRESSION, encode_png, png_text, write_png


def _image(shape, seed=0):
    """Smooth gradients plus noise: compressible like a photo, with every byte value present."""
    rng = np.random.default_rng(seed)
    height, width = shape[:2]
    ramp = np.add.outer(np.arange(height) * 3, np.arange(width) * 2)
    pixels = (ramp[:, :, None] + rng.integers(0, 30, (height, width, shape[2] if len(shape) == 3 else 1))) % 256
    return pixels.astype(np.uint8)


@pytest.mark.parametrize("shape", [(37, 53, 3), (20, 31, 1), (1, 1, 3), (1, 300, 1), (200, 1, 3)])
def test_every_level_decodes_to_the_same_pixels(shape):
    pixels = _image(shape)
    sizes = {}
    for level in range(10):
        data = encode_png(pixels, {"Software": "ensir-flow test export"}, level)
        sizes[level] = len(data)
        for decoded in (np.asarray(Image.open(io.BytesIO(data))), iio.imread(data, extension=".png")):
            assert decoded.reshape(pixels.shape).tolist() == pixels.tolist()
        assert Image.open(io.BytesIO(data)).mode == ("L" if shape[2] == 1 else "RGB")
    if pixels.size > 1000:
        assert sizes[0] > sizes[1] >= sizes[9]  # the level does compress more (a level is not ignored)


def test_text_chunks_come_before_the_pixels_and_other_readers_see_them():
    text = {"Software": "ensir-flow 0.1.0 export", "Source": "/data/out.zarr", "Variable": "ensemble"}
    data = encode_png(_image((64, 64, 3)), text)
    assert png_text(data[:4096]) == text
    assert data.index(b"tEXt") < data.index(b"IDAT")
    assert {key: Image.open(io.BytesIO(data)).info[key] for key in text} == text


def test_text_that_latin_1_lacks_goes_in_an_itxt_chunk():
    """A store path in Chinese made export fail with UnicodeEncodeError (tEXt is Latin-1 only),
    after apply had written its output: such a value is written as UTF-8 iTXt, which Pillow reads."""
    text = {"Software": "ensir-flow 0.1.0 export", "Source": "/data/数据/out.zarr", "Variable": "ensemble"}
    data = encode_png(_image((5, 7, 3)), text)
    assert png_text(data) == text and data.count(b"tEXt") == 2 and data.index(b"iTXt") < data.index(b"IDAT")
    image = Image.open(io.BytesIO(data))
    assert np.asarray(image).tolist() == _image((5, 7, 3)).tolist() and image.text == text


def test_write_png_writes_the_encoded_bytes(tmp_path):
    pixels = _image((40, 50, 3))
    write_png(tmp_path / "a.png", pixels)
    assert (tmp_path / "a.png").read_bytes() == encode_png(pixels, None, DEFAULT_PNG_COMPRESSION)
    assert iio.imread(tmp_path / "a.png").tolist() == pixels.tolist()


def test_bad_levels_and_pixels_are_refused():
    pixels = _image((8, 8, 3))
    for level in (-1, 10, 1.5):
        with pytest.raises(ValueError, match="0..9"):
            encode_png(pixels, None, level)
    with pytest.raises(ValueError, match="channels"):
        encode_png(np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="uint16"):
        encode_png(np.zeros((4, 4, 3), np.uint16))


def test_apply_exports_the_same_pixels_at_every_level_with_the_mark(tmp_path, invoke, corpus):
    from ensir_flow.pipelines.stores import open_store

    root, _ = corpus
    assert invoke("ingest", root, tmp_path / "s.zarr", "--no-progress").exit_code == 0
    assert invoke("fit", tmp_path / "s.zarr", tmp_path / "lut.zarr", "--no-progress").exit_code == 0
    folders = {}
    for level in ("0", "9", None):
        folders[level] = tmp_path / f"png{level}"
        options = () if level is None else ("--png-compression", level)
        result = invoke(
            "apply",
            tmp_path / "s.zarr",
            tmp_path / "lut.zarr",
            tmp_path / f"o{level}.zarr",
            "--export-dir",
            folders[level],
            *options,
            "--no-progress",
        )
        assert result.exit_code == 0, result.output
    ensemble = open_store(tmp_path / "o0.zarr")
    for stem, offset, count in zip(ensemble["image"].values, ensemble["pixel_offset"].values, ensemble["pixel_count"].values):
        expected = ensemble["ensemble"].values[offset : offset + count].tolist()
        files = [folder / f"{stem}.png" for folder in folders.values()]
        for file in files:
            assert iio.imread(file).reshape(count, -1).tolist() == expected
            assert png_text(file.read_bytes()[:4096])["Software"].startswith("ensir-flow ")
        assert files[0].stat().st_size > files[1].stat().st_size  # level 0 stores, level 9 compresses
    refused = invoke(
        "apply",
        tmp_path / "s.zarr",
        tmp_path / "lut.zarr",
        tmp_path / "bad.zarr",
        "--export-dir",
        tmp_path / "bad",
        "--png-compression",
        "10",
        "--no-progress",
    )
    assert refused.exit_code == 2 and not (tmp_path / "bad.zarr").exists() and not (tmp_path / "bad").exists()
    ignored = invoke(
        "apply", tmp_path / "s.zarr", tmp_path / "lut.zarr", tmp_path / "bad.zarr", "--png-compression", "9", "--no-progress"
    )  # without --export-dir it would do nothing: refused, not ignored
    assert ignored.exit_code == 2 and "only with --export-dir" in ignored.output and not (tmp_path / "bad.zarr").exists()
