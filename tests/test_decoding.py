"""Decoding and listing a corpus: the pixels a viewer shows (EXIF orientation, palettes, CMYK), or a
one-line refusal naming the file (several frames, transparency, 16-bit colour, a name that is not
UTF-8, a FIFO or a device where an image should be)."""

import os
import shutil
import struct
import threading
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageOps
from test_bad_input import _refused

import ensir_flow
from ensir_flow.images import ImageInfo, probe_image, read_image
from helpers import make_corpus


@pytest.fixture
def root(tmp_path):
    path = tmp_path / "corpus"
    make_corpus(path)
    return path


def _viewed(path) -> np.ndarray:
    """What a viewer shows of the image file `path`: Pillow's pixels, EXIF orientation applied."""
    return np.asarray(ImageOps.exif_transpose(Image.open(path)))


def _stored_prediction(invoke, root, tmp_path, model="model0", stem="img0") -> np.ndarray:
    """Ingest `root` (which must succeed) and read back one stored image; the store is removed."""
    result = invoke("ingest", root, tmp_path / "s.zarr", "--no-progress")
    assert result.exit_code == 0, result.output
    pixels = ensir_flow.image(ensir_flow.open_store(tmp_path / "s.zarr"), stem, "prediction", model)
    shutil.rmtree(tmp_path / "s.zarr")
    return pixels


@pytest.mark.parametrize("extension", [".jpg", ".png", ".webp", ".tif"])
def test_exif_orientation_is_applied_to_the_shape_and_the_pixels(tmp_path, extension):
    """Every orientation of every format that carries one: the probed shape and the decoded pixels
    are the upright ones (a rotated JPEG was paired by its stored size with an upright truth)."""
    stored = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = tmp_path / f"o{orientation}{extension}"
        Image.fromarray(stored).save(path, exif=exif, **({"lossless": True} if extension == ".webp" else {}))
        viewed = _viewed(path)
        assert viewed.shape[:2] == ((10, 6) if orientation >= 5 else (6, 10))
        info = probe_image(path)
        assert info == ImageInfo(*viewed.shape), orientation
        np.testing.assert_array_equal(read_image(path, info), viewed, err_msg=f"orientation {orientation}")


def test_a_rotated_jpeg_pairs_with_its_upright_truth(tmp_path, invoke, root):
    upright = np.asarray(Image.open(root / "model0" / "img0.png"))
    (root / "model0" / "img0.png").unlink()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored a quarter turn anticlockwise: viewers turn it clockwise
    Image.fromarray(np.rot90(upright)).save(root / "model0" / "img0.jpg", exif=exif, quality=100, subsampling=0)
    stored = _stored_prediction(invoke, root, tmp_path)
    np.testing.assert_array_equal(stored, _viewed(root / "model0" / "img0.jpg"))
    assert np.abs(stored.astype(int) - upright).mean() < 1  # the picture itself, within JPEG's loss


def _frames(pixels):
    return [Image.fromarray(pixels), Image.fromarray(255 - pixels)]


def _save_animated(frames, path, **options):
    frames[0].save(path, save_all=True, append_images=frames[1:], **options)


@pytest.mark.parametrize(
    "name,save",
    [
        ("img0.webp", lambda frames, path: _save_animated(frames, path, lossless=True)),
        ("img0.gif", lambda frames, path: _save_animated([frame.convert("P") for frame in frames], path)),
        ("img0.png", _save_animated),  # APNG
        ("img0.tif", _save_animated),  # multipage TIFF
    ],
)
def test_a_file_of_several_frames_is_refused(tmp_path, invoke, root, name, save):
    """An animated WebP was read as its first frame; an animated GIF was not listed at all."""
    pixels = np.asarray(Image.open(root / "model0" / "img0.png"))
    (root / "model0" / "img0.png").unlink()
    save(_frames(pixels), root / "model0" / name)
    assert Image.open(root / "model0" / name).n_frames == 2
    _refused(invoke, tmp_path, "ingest", root, tmp_path / "s.zarr", match=f"{root / 'model0' / name}: has 2 frames")


def test_palette_and_trns_transparency_is_alpha(tmp_path, invoke, root):
    """Transparency that is not an alpha channel (a palette's tRNS, GIF's transparent index, an RGB
    PNG's tRNS colour) was dropped unsaid: it is refused like RGBA's, and accepted when no pixel
    uses it, with the palette applied."""
    path = root / "model0" / "img0.png"
    palette = Image.fromarray(np.asarray(Image.open(path))).quantize(16)
    used, unused = int(np.asarray(palette)[0, 0]), 16
    palette.save(path, transparency=unused)
    np.testing.assert_array_equal(_stored_prediction(invoke, root, tmp_path), np.asarray(palette.convert("RGB")))
    for name, save in (
        ("img0.png", lambda: palette.save(path, transparency=used)),
        ("img0.gif", lambda: palette.save(path.with_suffix(".gif"), transparency=used)),
        ("img0.png", lambda: palette.convert("RGB").save(path, transparency=palette.convert("RGB").getpixel((0, 0)))),
    ):
        for stale in root.glob("model0/img0.*"):
            stale.unlink()
        save()
        kind = "RGB" if Image.open(root / "model0" / name).mode == "RGB" else "palette"
        _refused(
            invoke,
            tmp_path,
            "ingest",
            root,
            tmp_path / "x.zarr",
            match=f"{root / 'model0' / name}: {kind} image with transparency; refusing to guess a background",
        )


def test_a_single_frame_gif_is_read_with_its_palette(tmp_path, invoke, root):
    path = root / "model0" / "img0.png"
    palette = Image.fromarray(np.asarray(Image.open(path))).quantize(64)
    path.unlink()
    palette.save(path.with_suffix(".gif"))
    np.testing.assert_array_equal(_stored_prediction(invoke, root, tmp_path), np.asarray(palette.convert("RGB")))


def _cmyk_ramps(height=24, width=32) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([xx * 7, yy * 9, (xx + yy) * 4, 60 + 4 * yy], axis=-1).clip(0, 255).astype(np.uint8)


def _rgb_of_cmyk(cmyk: np.ndarray) -> np.ndarray:
    """The usual conversion without a colour profile, in numpy: R = (255 - C)(255 - K) / 255, ..."""
    ink = cmyk.astype(np.float64)
    return np.rint((255 - ink[..., :3]) * (255 - ink[..., 3:]) / 255).astype(np.uint8)


def test_cmyk_is_converted_to_rgb(tmp_path):
    """A CMYK JPEG (Adobe's inverted CMYK, as Pillow writes it) was refused as 'RGBA with
    transparency' or stored as if its inks were RGB. Checked against the conversion in numpy of the
    inks written, for a TIFF written by tifffile (a decoder Pillow does not share) and a JPEG."""
    cmyk = _cmyk_ramps()
    expected = _rgb_of_cmyk(cmyk)
    tifffile.imwrite(tmp_path / "inks.tif", cmyk, photometric="separated")
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "inks.jpg", quality=100)
    assert Image.open(tmp_path / "inks.jpg").info.get("adobe")
    for name in ("inks.tif", "inks.jpg"):
        info = probe_image(tmp_path / name)
        assert info == ImageInfo(24, 32, 3)
        decoded = read_image(tmp_path / name, info).astype(int)
        assert np.abs(decoded - expected).max() <= (0 if name.endswith(".tif") else 2), name


def _png_16_bit_rgb(height, width) -> bytes:
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(body, zlib.crc32(kind)))

    rows = (b"\0" + struct.pack(">3H", 1000, 30000, 65535) * width) * height
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def test_a_sixteen_bit_colour_png_is_refused(tmp_path, invoke, root):
    """Pillow reads a 16-bit RGB PNG as 8-bit: it was stored reduced, not refused."""
    path = root / "model0" / "img0.png"
    path.write_bytes(_png_16_bit_rgb(24, 32))
    _refused(invoke, tmp_path, "ingest", root, tmp_path / "s.zarr", match=f"{path}: uint16 pixels are not supported")


def test_a_name_that_is_not_utf8_is_refused_by_name(tmp_path, invoke, root):
    """In one folder it was reported as a missing image; in all, ingest failed with a traceback."""
    for folder in ("gt", "model0", "model1", "model2"):
        os.rename(root / folder / "img0.png", os.fsencode(root / folder) + b"/img\xff.png")
    message = _refused(
        invoke, tmp_path, "ingest", root, tmp_path / "s.zarr", match=f"{root / 'model0'}: the name b'img\\xff.png' is not UTF-8"
    )
    assert message.isprintable()
    os.rename(root / "model2", os.fsencode(root) + b"/model\xff")
    _refused(invoke, tmp_path, "ingest", root, tmp_path / "s.zarr", match=f"{root}: the name b'model\\xff' is not UTF-8")


def test_a_fifo_a_device_or_a_broken_link_is_named_and_never_opened(tmp_path, invoke, root):
    """They were reported as missing images. A FIFO opened for reading blocks until a writer comes:
    a writer that would come is watched for (and would end a read that blocked)."""
    fifo = root / "model0" / "img0.png"
    fifo.unlink()
    os.mkfifo(fifo)
    stop, opened = threading.Event(), []

    def writer():
        while not stop.wait(0.05):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # succeeds only while a reader has it open
                opened.append(True)
            except OSError:
                pass

    watcher = threading.Thread(target=writer)
    watcher.start()
    try:
        _refused(invoke, tmp_path, "ingest", root, tmp_path / "s.zarr", match=f"{fifo}: not a regular file (a FIFO)")
    finally:
        stop.set()
        watcher.join()
    assert not opened
    fifo.unlink()
    fifo.symlink_to(os.devnull)
    _refused(invoke, tmp_path, "ingest", root, tmp_path / "s.zarr", match=f"{fifo}: not a regular file (a character device)")
    fifo.unlink()
    fifo.symlink_to(tmp_path / "nothing.png")
    _refused(invoke, tmp_path, "ingest", root, tmp_path / "s.zarr", match=f"{fifo}: a link to nothing")


def test_a_fifo_where_a_folder_goes_is_named_and_never_opened(tmp_path, invoke, root):
    """A FIFO beside the model folders was dropped silently, and one named as a model or as gt/
    was reported as a folder not found."""
    os.mkfifo(root / "model3")
    _refused(invoke, tmp_path, "ingest", root, tmp_path / "s.zarr", match=f"{root / 'model3'}: is a FIFO, not a folder")
    _refused(
        invoke,
        tmp_path,
        "ingest",
        root,
        tmp_path / "s.zarr",
        "--models",
        "model0,model3",
        match=f"{root / 'model3'}: is a FIFO, not a folder",
    )
    os.unlink(root / "model3")
    shutil.rmtree(root / "gt")
    os.mkfifo(root / "gt")
    _refused(invoke, tmp_path, "ingest", root, tmp_path / "s.zarr", match=f"{root / 'gt'}: is a FIFO, not a folder")
    os.unlink(root / "gt")
    (root / "gt").write_text("not images")
    _refused(invoke, tmp_path, "ingest", root, tmp_path / "s.zarr", match=f"{root / 'gt'}: is a file, not a folder")
