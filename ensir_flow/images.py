"""Image files: finding a corpus on disk, pairing files by stem, reading and validating pixels.

A corpus folder holds `gt/` (optional), `lq/` (optional) and one folder per model. Files pair by
stem whatever their extension. Pixels are 8-bit; what ensir-flow converts and what it refuses:
- RGBA whose alpha is fully opaque: alpha dropped; with any transparency: refused.
- grayscale: kept as one channel when the whole corpus is grayscale; a corpus that mixes
  grayscale and colour is refused (replicating gray would invent colour statistics).
- 16-bit, float or other non-8-bit data: refused (EnsIR bins 8-bit values; rescaling would
  silently change the data).
- a file whose stem cannot name an exported PNG (`check_stem`: `..`, control characters, ...):
  refused, since the stem becomes the image's name in the store and `<stem>.png` on export.
- a file name that is not UTF-8, or an entry with an image extension that is not a regular file
  (a FIFO, a device, a folder): refused by name, and a FIFO is never opened (that would block).

The pixels are those a viewer shows, in every folder alike (ground truth, inputs, each model):
- EXIF orientation is applied as `PIL.ImageOps.exif_transpose` applies it (the Orientation tag of
  the EXIF or XMP read with the file's header: an eXIf chunk after a PNG's pixels is not looked
  for), and the probed height and width are the oriented ones, so that a rotated JPEG pairs with
  an upright PNG of the same picture.
- palette images become RGB; transparency that is not an alpha channel (a palette's or PNG's tRNS
  entries, GIF's transparent index) is alpha, under the RGBA rule above. Grayscale with alpha
  follows the same rule.
- CMYK (JPEG, Adobe's inverted CMYK included, or TIFF) is converted to RGB as Pillow converts it,
  R = (255 - C)(255 - K) / 255 rounded, and so on; colour profiles are not applied (to RGB either).
- a file of several frames (animated WebP, GIF or PNG, multipage TIFF) is refused: which frame is
  "the" image is not ours to guess. An MPO JPEG (a camera's picture with its previews) is its
  first image, which is what viewers show of it.
"""

import hashlib
import io
import os
import stat
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import fsspec
import numpy as np

from .errors import InputError, first_line

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")
#: The Pillow formats of those extensions (an MPO, a JPEG with previews appended, opens as JPEG).
#: Other formats are not read even when a file's bytes hold one: Pillow reduces some to 8 bits unsaid.
PILLOW_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF")
TIFF_SIGNATURES = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # classic and BigTIFF, either byte order
#: Channels stored for each Pillow mode ensir-flow reads; alpha (the A of LA, PA, RGBA) is dropped
#: when opaque, and P, PA, CMYK, YCbCr and RGBX are converted to RGB(A) by Pillow.
CHANNELS_OF_MODE = {"L": 1, "LA": 1, "P": 3, "PA": 3, "RGB": 3, "RGBA": 3, "CMYK": 3, "YCbCr": 3, "RGBX": 3}
ORIENTATION_TAG = 0x0112
#: The transpose that shows an image of each EXIF orientation upright, as `PIL.ImageOps.exif_transpose` does it.
UPRIGHT = {
    2: "FLIP_LEFT_RIGHT",
    3: "ROTATE_180",
    4: "FLIP_TOP_BOTTOM",
    5: "TRANSPOSE",
    6: "ROTATE_270",
    7: "TRANSVERSE",
    8: "ROTATE_90",
}
GROUND_TRUTH_DIR = "gt"
INPUT_DIR = "lq"


@dataclass(frozen=True)
class Corpus:
    """The files of a corpus: per stem, one path per model and optionally ground truth."""

    root: Path
    models: list[str]
    stems: list[str]
    predictions: dict[str, list[Path]]  # model -> paths in stem order
    ground_truth: list[Path] | None
    inputs: list[Path] | None = None  # the degraded inputs (lq/), if any


@dataclass(frozen=True)
class ImageInfo:
    """Shape of one image as its header declares it: height, width and channels after conversion."""

    height: int
    width: int
    channels: int


def stem_problem(stem) -> str | None:
    """Why `stem` cannot name an image (its file is `<stem>.png` in an export folder), or None.

    A stem is one plain file name: not empty, not `.` or `..` nor starting with `..`, with no path
    separator (`/` or `\\`), not absolute or drive-qualified (`C:`), and without control
    characters (below 0x20, NUL included, or 0x7f).
    """
    if not isinstance(stem, str):
        return f"is a {type(stem).__name__}, not a string"
    if not stem:
        return "is empty"
    if stem in (".", ".."):
        return "is a relative folder reference"
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in stem):
        return "contains a control character"
    if "/" in stem or "\\" in stem:
        return "contains a path separator"
    if stem.startswith(".."):
        return "starts with '..' (a path traversal)"
    # With no separator left, only a drive ('C:', 'C:name') can make it absolute or qualified.
    if ":" in stem and (PurePosixPath(stem).is_absolute() or PureWindowsPath(stem).is_absolute() or PureWindowsPath(stem).drive):
        return "is an absolute or drive-qualified path"
    return None


def check_stem(stem, where) -> str:
    """`stem` if it can name an image file, else an InputError naming `where` (a file, a store)."""
    problem = stem_problem(stem)
    if problem is not None:
        raise InputError(f"{printable(where)}: image name {stem!r} {problem}; refusing it as a file name")
    return stem


def printable(name) -> str:
    """`name` as text that stays on one line: quoted with escapes when it holds unprintable characters."""
    text = str(name)
    return text if text.isprintable() else repr(text)


def _check_utf8_name(path: Path) -> None:
    """Refuse a file or folder whose name is not UTF-8 (Python holds its undecodable bytes as lone
    surrogates, which no store, JSON or terminal takes), naming its folder and its bytes."""
    try:
        path.name.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(
            f"{printable(path.parent)}: the name {os.fsencode(path.name)!r} is not UTF-8; "
            "rename it (image and model names are stored as text)"
        ) from None


def _kind(mode: int) -> str:
    """What an entry of `mode` (its st_mode) is, in words."""
    kinds = (
        (stat.S_ISREG, "a file"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), "of an unknown kind")


def _regular_file_problem(mode: int) -> str | None:
    """Why an entry of `mode` (its st_mode) is not an image file to read, or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return f"not a regular file ({_kind(mode)}); refusing to read it"


def _refuse_unless_folder(path: Path) -> None:
    """Refuse `path` unless it is (a link to) a folder, naming what it is instead: found with
    `stat`, never opened (a FIFO would block)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputError(f"{printable(path)}: " + ("a link to nothing" if path.is_symlink() else "folder not found")) from None
    except OSError as error:
        raise InputError(f"{printable(path)}: cannot be read ({error.strerror or first_line(error)})") from None
    if not stat.S_ISDIR(mode):
        raise InputError(f"{printable(path)}: is {_kind(mode)}, not a folder")


def _check_regular_file(path: Path) -> None:
    """Refuse `path` unless it is (a link to) a regular file: found with `stat`, never opened."""
    try:
        problem = _regular_file_problem(path.stat().st_mode)
    except OSError as error:
        broken_link = isinstance(error, FileNotFoundError) and path.is_symlink()
        problem = "a link to nothing" if broken_link else f"cannot be read ({error.strerror or first_line(error)})"
    if problem is not None:
        raise InputError(f"{printable(path)}: {problem}")


def images_by_stem(folder: Path) -> dict[str, Path]:
    _refuse_unless_folder(folder)
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir(), key=lambda path: path.name):  # as paths sort, by name alone
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            _check_utf8_name(path)
            _check_regular_file(path)
            check_stem(path.stem, path)
            if path.stem in found:
                raise InputError(f"{path}: stem '{path.stem}' also used by {found[path.stem].name}")
            found[path.stem] = path
    if not found:
        raise InputError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    return found


def check_model_names(models: list[str], source) -> None:
    """Refuse a model named as one of the combinations `evaluate` scores beside the models (average,
    zzpm, ensemble, and with --cv each solver, as `SOLVER` or `SOLVER@WIDTH`): its row would be the
    combination's, or the combination's its, in every table."""
    from .blend import AVERAGE, ENSEMBLE, ZZPM
    from .lut import SOLVERS

    combinations = (AVERAGE, ZZPM, ENSEMBLE, *SOLVERS)
    for model in models:
        if model in combinations or "@" in model:
            raise InputError(
                f"{source}: a model named '{model}', the name of a combination evaluate scores "
                f"({', '.join(dict.fromkeys(combinations))}, or SOLVER@WIDTH with --cv); rename it"
            )


def discover_corpus(root, models: list[str] | None = None, require_ground_truth: bool = False) -> Corpus:
    """Pair the images of `root` by stem; model order is `models`, else the sorted folder names."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: source folder not found")
    reserved = {GROUND_TRUTH_DIR, INPUT_DIR}
    if models is None:
        entries = [p for p in root.iterdir() if p.name not in reserved and not p.name.startswith(".")]
        for entry in entries:  # files (notes, lists) are left alone; anything else stands where a model folder goes
            if not entry.is_dir() and not entry.is_file():
                _refuse_unless_folder(entry)
        folders = [p for p in entries if p.is_dir()]
        for folder in folders:
            _check_utf8_name(folder)
        models = sorted(p.name for p in folders)
    if not models:
        raise InputError(f"{root}: no model folders (expected one folder per model beside gt/ and lq/)")
    if len(set(models)) != len(models):
        raise InputError(f"{root}: model list {models} names a model twice")
    for model in models:
        if model in reserved:
            raise InputError(
                f"{root}: '{model}' is reserved for {'ground truth' if model == GROUND_TRUTH_DIR else 'inputs'}, not a model"
            )
    check_model_names(models, root)
    by_model = {model: images_by_stem(root / model) for model in models}
    gt_dir = root / GROUND_TRUTH_DIR
    ground_truth = images_by_stem(gt_dir) if os.path.lexists(gt_dir) or require_ground_truth else None
    inputs = images_by_stem(root / INPUT_DIR) if os.path.lexists(root / INPUT_DIR) else None
    reference_name, reference = (GROUND_TRUTH_DIR, ground_truth) if ground_truth is not None else (models[0], by_model[models[0]])
    stems = sorted(reference)
    for name, files in [(GROUND_TRUTH_DIR, ground_truth), *by_model.items(), (INPUT_DIR, inputs)]:
        if files is None:
            continue
        missing = sorted(set(stems) - set(files))
        extra = sorted(set(files) - set(stems))
        if missing:
            raise InputError(
                f"{root / name}: missing {len(missing)} image(s) present in {reference_name}/: {', '.join(missing[:5])}"
            )
        if extra:
            raise InputError(f"{root / name}: {len(extra)} image(s) absent from {reference_name}/: {', '.join(extra[:5])}")
    return Corpus(
        root,
        list(models),
        stems,
        {m: [by_model[m][s] for s in stems] for m in models},
        [ground_truth[s] for s in stems] if ground_truth is not None else None,
        [inputs[s] for s in stems] if inputs is not None else None,
    )


def _check_dtype(path, dtype) -> None:
    if dtype != np.uint8:
        raise InputError(
            f"{printable(path)}: {np.dtype(dtype).name} pixels are not supported; "
            "convert to 8-bit first (EnsIR bins 8-bit values)"
        )


def probe_image(path) -> ImageInfo:
    """Shape of one image as a viewer shows it (EXIF orientation applied), from its header: no pixel
    is decoded (a GIF's frames are counted by skipping through them)."""
    with _open_regular(path, "not a readable image") as file:
        image = _open_image(file, path, "not a readable image")
        width, height = image.size
        if _orientation(image, path) in (5, 6, 7, 8):  # a quarter turn, or a transpose
            height, width = width, height
        return ImageInfo(height, width, CHANNELS_OF_MODE[image.mode])


def _open_regular(path, failure: str):
    """`path` opened to read its bytes, refused unless it is a regular file: opened without waiting
    (a FIFO would block for a writer for ever) and checked before a byte is read."""
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as error:
        raise InputError(f"{printable(path)}: {failure} ({first_line(error)})") from None
    problem = _regular_file_problem(os.fstat(descriptor).st_mode)
    if problem is not None:
        os.close(descriptor)
        raise InputError(f"{printable(path)}: {problem}")
    return os.fdopen(descriptor, "rb")


def _open_image(file, path, failure: str):
    """Pillow's image of the open `file` with only its header read, refused unless it holds one
    image of 8-bit samples in a mode ensir-flow reads (`CHANNELS_OF_MODE`)."""
    from PIL import Image, ImageMode

    head = file.read(32)
    file.seek(0)
    if head[:4] in TIFF_SIGNATURES:
        dtype = _tiff_dtype(file, path)  # Pillow reads a 16-bit colour TIFF as 8-bit: ask tifffile
        file.seek(0)
        if dtype is not None:
            _check_dtype(path, dtype)
    elif head.startswith(PNG_SIGNATURE) and head[24:25] == b"\x10":  # IHDR's bit depth; Pillow reads 16-bit colour as 8-bit
        _check_dtype(path, np.uint16)
    try:
        image = Image.open(file, formats=PILLOW_FORMATS)
        frames = 1 if image.format == "MPO" else getattr(image, "n_frames", 1)
    except Exception as error:
        raise InputError(f"{printable(path)}: {failure} ({first_line(error)})") from None
    if frames != 1:
        raise InputError(
            f"{printable(path)}: has {frames} frames (an animation or a multi-page file); refusing to pick "
            "one (save the frame you mean as an image of its own)"
        )
    if image.mode not in CHANNELS_OF_MODE:
        _check_dtype(path, np.dtype(ImageMode.getmode(image.mode).typestr))
        raise InputError(f"{printable(path)}: {image.mode} images are not supported; convert to RGB or grayscale first")
    return image


def _tiff_dtype(file, path):
    """The sample type of the first page of the TIFF `file` (the file `path`) as tifffile reads it,
    or None where tifffile cannot tell (Pillow then says what is wrong with the file)."""
    import tifffile

    try:
        with tifffile.TiffFile(file, name=Path(path).name) as tiff:
            return tiff.pages[0].dtype
    except Exception:
        return None


def _orientation(image, path) -> int:
    """The EXIF orientation still to apply to the opened `image` (2-8, or 1 for none) as
    `PIL.ImageOps.exif_transpose` reads it (EXIF, else XMP), from what the header holds: the base
    class's `getexif`, since PngImageFile's decodes all the pixels to look for an eXIf chunk after
    them, which ensir-flow therefore does not see. Pillow turns a TIFF upright itself (its size is
    the upright one and it transposes the pixels as it loads them): 1."""
    from PIL import Image

    if image.format == "TIFF":
        return 1
    try:
        orientation = Image.Image.getexif(image).get(ORIENTATION_TAG, 1)
        return orientation if orientation in UPRIGHT else 1
    except Exception as error:
        raise InputError(f"{printable(path)}: unreadable EXIF, so its orientation is unknown ({first_line(error)})") from None


def read_image(path, expected: ImageInfo) -> np.ndarray:
    """Decode one image to uint8 (H, W, C), converting or refusing as the module docstring says."""
    return decode_image(_file_bytes(path), path, expected)


def read_image_and_sha256(path, expected: ImageInfo) -> tuple[np.ndarray, str]:
    """`read_image` and `file_sha256` of one file from a single read of its bytes: ingest records
    the digest of exactly the bytes whose pixels it stores, and reads each file once."""
    data = _file_bytes(path)
    return decode_image(data, path, expected), hashlib.sha256(data).hexdigest()


def _file_bytes(path) -> bytes:
    with _open_regular(path, "cannot decode image") as file:
        try:
            return file.read()
        except OSError as error:
            raise InputError(f"{printable(path)}: cannot decode image ({first_line(error)})") from None


#: How refusals name the kind of image whose transparency they refuse, by Pillow mode (else the mode).
_TRANSPARENT_KIND = {"P": "palette", "PA": "palette", "L": "grayscale", "LA": "grayscale"}


def decode_image(data: bytes, path, expected: ImageInfo) -> np.ndarray:
    """Decode the bytes `data` of the image file `path` as `read_image` decodes the file, checked
    against `expected` (its `probe_image`) and named `path` in every refusal."""
    from PIL import Image

    image = _open_image(io.BytesIO(data), path, "cannot decode image")
    mode, orientation = image.mode, _orientation(image, path)
    try:
        upright = _stored_mode(image)
        if orientation in UPRIGHT:
            upright = upright.transpose(Image.Transpose[UPRIGHT[orientation]])
        pixels = np.asarray(upright)
    except Exception as error:
        raise InputError(f"{printable(path)}: cannot decode image ({first_line(error)})") from None
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.shape[2] in (2, 4):  # alpha last
        if (pixels[:, :, -1] != 255).any():
            raise InputError(
                f"{printable(path)}: {_TRANSPARENT_KIND.get(mode, mode)} image with transparency; "
                "refusing to guess a background (flatten it first)"
            )
        pixels = pixels[:, :, :-1]
    info = ImageInfo(*pixels.shape)
    if info != expected:
        raise InputError(
            f"{printable(path)}: decoded as {info.height}x{info.width}x{info.channels}, "
            f"expected {expected.height}x{expected.width}x{expected.channels}"
        )
    return np.require(pixels, requirements=("C", "W"))  # writeable, as torch.from_numpy wants it


def _stored_mode(image):
    """`image` converted to L, LA, RGB or RGBA (alpha last): a palette applied, transparency of a
    palette or a tRNS colour made alpha, CMYK, YCbCr and RGBX converted to RGB."""
    transparent = "transparency" in image.info
    if image.mode in ("P", "PA"):
        with_alpha = image.mode == "PA" or transparent or getattr(image.palette, "mode", "RGB") == "RGBA"
        return image.convert("RGBA" if with_alpha else "RGB")
    if transparent and image.mode in ("L", "RGB"):
        return image.convert(image.mode + "A")
    if image.mode in ("CMYK", "YCbCr", "RGBX"):
        return image.convert("RGB")
    return image


#: zlib level of the PNGs ensir-flow writes unless told otherwise: level 1 encodes several times
#: faster than 6 or 9 for files ~15-25% larger; every level is lossless (the same pixels).
DEFAULT_PNG_COMPRESSION = 1
PNG_COMPRESSION_LEVELS = range(10)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Size of the IDAT chunks the compressed pixels are cut into (any size decodes the same).
PNG_IDAT_BYTES = 1 << 20


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(body, zlib.crc32(kind)))


def _png_text_chunk(key: str, value: str) -> bytes:
    """A tEXt chunk (Latin-1, the PNG text every reader knows) for `value`, or an uncompressed iTXt
    chunk (UTF-8) when `value` has characters Latin-1 lacks (a store path in Chinese, say)."""
    try:
        return _png_chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))
    except UnicodeEncodeError:
        return _png_chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + value.encode("utf-8"))


def encode_png(pixels: np.ndarray, text: dict[str, str] | None = None, compression: int = DEFAULT_PNG_COMPRESSION) -> bytes:
    """uint8 (H, W, C) as a PNG file's bytes (C == 1 grayscale, C == 3 RGB): every row filtered with
    PNG's 'Up' filter (the difference to the row above, one vectorised subtraction), then deflated
    by zlib at level `compression` (0-9). zlib releases the GIL while it compresses, so images
    encode in parallel on threads (Pillow holds it when it encodes into an in-memory or other
    Python file object). `text` becomes tEXt chunks (Latin-1 keywords and values) before the
    pixel data, where `png_text` finds them (iTXt, UTF-8, for a value that is not Latin-1)."""
    if compression not in PNG_COMPRESSION_LEVELS:
        raise ValueError(f"PNG compression level {compression!r} is not one of 0..9")
    height, width, channels = pixels.shape
    if pixels.dtype != np.uint8 or channels not in (1, 3):
        raise ValueError(f"cannot write {pixels.dtype} pixels with {channels} channels as an 8-bit grey or RGB PNG")
    rows = pixels.reshape(height, width * channels)
    filtered = np.empty((height, width * channels + 1), dtype=np.uint8)
    filtered[:, 0] = 2  # the 'Up' filter type
    filtered[:1, 1:] = rows[:1]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # modulo 256, as PNG defines it
    data = zlib.compress(filtered, int(compression))
    header = struct.pack(">IIBBBBB", width, height, 8, 0 if channels == 1 else 2, 0, 0, 0)
    parts = [PNG_SIGNATURE, _png_chunk(b"IHDR", header)]
    parts += [_png_text_chunk(key, value) for key, value in (text or {}).items()]
    parts += [_png_chunk(b"IDAT", data[start : start + PNG_IDAT_BYTES]) for start in range(0, max(len(data), 1), PNG_IDAT_BYTES)]
    parts.append(_png_chunk(b"IEND", b""))
    return b"".join(parts)


def write_png(path, pixels: np.ndarray, text: dict[str, str] | None = None, compression: int = DEFAULT_PNG_COMPRESSION) -> None:
    """Write uint8 (H, W, C) as lossless PNG (`encode_png`) to a local path or fsspec URL, in one write."""
    data = encode_png(np.ascontiguousarray(pixels), text, compression)
    with fsspec.open(str(path), "wb") as file:
        file.write(data)


def png_text(data: bytes) -> dict[str, str]:
    """The tEXt (and uncompressed iTXt) chunks found in the leading `data` of a PNG file (up to its first IDAT), by keyword;
    empty when `data` does not start like a PNG."""
    if not data.startswith(PNG_SIGNATURE):
        return {}
    found, position = {}, 8
    while position + 8 <= len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        if kind == b"IDAT" or len(body) < length:
            break
        if kind == b"tEXt" and b"\0" in body:
            key, _, value = body.partition(b"\0")
            found[key.decode("latin-1")] = value.decode("latin-1")
        elif kind == b"iTXt" and body.count(b"\0") >= 3:  # keyword, flag, method, language, translated keyword
            key, _, rest = body.partition(b"\0")
            if rest[:1] == b"\0":  # uncompressed
                found[key.decode("latin-1")] = rest[2:].split(b"\0", 2)[-1].decode("utf-8", "replace")
        position += 12 + length
    return found


def file_sha256(path) -> str:
    """SHA-256 of a file's bytes: the provenance of every ingested image."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
