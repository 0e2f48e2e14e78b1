"""The layout of ensir-flow's Zarr stores (README, "Data layout"), in one place.

Images of different sizes live back to back on dimension `pixel` (CF contiguous ragged array):
per-image variables on dimension `image` (coordinate = file stem) give `height`, `width`,
`pixel_offset` and `pixel_count`. Pixel variables are uint8 and chunked along `pixel` only:
`prediction` (model, pixel, channel), optional `ground_truth` and `input` (the degraded input,
when it has the outputs' size) (pixel, channel), and `ensemble` (pixel, channel) in the output of
`apply`.
"""

from dataclasses import dataclass

import numpy as np
import xarray as xr
from zarr.codecs import BloscCodec, ZstdCodec

from .errors import InputError
from .images import stem_problem

SCHEMA_VERSION = 1
PREDICTION = "prediction"
GROUND_TRUTH = "ground_truth"
INPUT = "input"
ENSEMBLE = "ensemble"
IMAGE_VARIABLES = ("height", "width", "pixel_offset", "pixel_count")
#: 2 Mpx: 18 MB of predictions per chunk for K = 3 (RGB). Per-chunk costs (task scheduling, Zarr's
#: machinery, completion marks) then weigh half as much as with 1 Mpx chunks: on our benchmark apply
#: ran ~15% faster per worker and two workers scaled better, while a task still holds under 100 MB.
DEFAULT_CHUNK_PIXELS = 1 << 21

#: Compressors of pixel arrays, by the names `--compression` takes. Both are codecs of the Zarr v3
#: spec, so any Zarr reader opens the stores. On the GoPro reference predictions, lz4 (through
#: Blosc, no shuffle: uint8 has no bytes to shuffle) keeps 79% of the bytes and decodes a 9 MB
#: chunk in ~3 ms, encodes it in ~13 ms; zstd (level 3) keeps 61% but takes ~12 ms and ~60 ms.
#: Reading and writing chunks bound every pipeline, so lz4 is the default; zstd is for archives.
COMPRESSORS = {
    "lz4": (BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle"),),
    "zstd": (ZstdCodec(level=3),),
    "none": None,
}
DEFAULT_COMPRESSION = "lz4"


@dataclass(frozen=True)
class ImageIndex:
    """Where each image lives on the pixel dimension."""

    stems: list[str]
    heights: np.ndarray
    widths: np.ndarray

    @property
    def counts(self) -> np.ndarray:
        return self.heights.astype(np.int64) * self.widths

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate(([0], np.cumsum(self.counts)[:-1])).astype(np.int64)

    @property
    def n_pixels(self) -> int:
        return int(self.counts.sum())

    def to_dataset(self) -> xr.Dataset:
        """The per-image variables, with the CF attribute that marks the ragged layout."""
        return xr.Dataset(
            {
                "height": ("image", self.heights.astype(np.int64)),
                "width": ("image", self.widths.astype(np.int64)),
                "pixel_offset": ("image", self.offsets),
                "pixel_count": ("image", self.counts, {"sample_dimension": "pixel"}),
            },
            coords={"image": np.array(self.stems, dtype=object)},
        )

    @classmethod
    def from_dataset(cls, ds: xr.Dataset) -> "ImageIndex":
        return cls([str(s) for s in ds["image"].values], ds["height"].values.astype(np.int64), ds["width"].values.astype(np.int64))


def pixel_chunks(n_pixels: int, chunk_pixels: int) -> tuple[int, ...]:
    """Chunk lengths along `pixel`: equal chunks of `chunk_pixels`, the last one shorter."""
    if chunk_pixels < 1:
        raise ValueError("chunk size must be at least one pixel")
    full, rest = divmod(n_pixels, chunk_pixels)
    return (chunk_pixels,) * full + ((rest,) if rest else ())


def pixel_encoding(chunks: tuple[int, ...], compression: str = DEFAULT_COMPRESSION) -> dict:
    """xarray's Zarr encoding of a pixel variable: its chunk shape and compressor."""
    if compression not in COMPRESSORS:
        raise ValueError(f"unknown compression {compression!r} (choose from {', '.join(COMPRESSORS)})")
    return {"chunks": chunks, "compressors": COMPRESSORS[compression]}


def compression_of(encoding: dict) -> str:
    """How an array opened by xarray is compressed, in words (e.g. 'blosc lz4 level 5', 'none')."""
    labels = []
    for codec in encoding.get("compressors") or ():
        spec = codec.to_dict()
        settings = spec.get("configuration", {})
        labels.append(" ".join(str(part) for part in (spec["name"], settings.get("cname"),
                                                      f"level {settings.get('clevel', settings.get('level'))}") if part))
    return ", ".join(labels) or "none"


def store_attributes(models: list[str], channels: int, **provenance) -> dict:
    """Attributes every ensir-flow pixel store carries."""
    return {"schema_version": SCHEMA_VERSION, "models": list(models), "channels": channels, **provenance}


def check_store(ds: xr.Dataset, source: str, require: tuple[str, ...] = (PREDICTION,)) -> list[str]:
    """Validate a pixel store's schema and structural invariants; return its model list.

    Stores can be written by anyone (or left by a crash), so every reader checks, before using
    the image index: required attributes and variables; one `model` entry per model; the pixel
    axis holding exactly the images' pixels (sum of height x width); `pixel_count` = height x
    width and `pixel_offset` = the cumulative counts (the contiguous ragged layout: offsets are
    authoritative only because they must equal the cumulative counts). A store that fails is
    refused, naming what is wrong.
    """
    version = ds.attrs.get("schema_version")
    if version is None:
        raise InputError(f"{source}: not an ensir-flow store (no schema_version attribute)")
    if int(version) > SCHEMA_VERSION:
        raise InputError(f"{source}: written by a newer ensir-flow (schema {version}, this one reads up to {SCHEMA_VERSION}); upgrade ensir-flow")
    for name in (*require, *IMAGE_VARIABLES):
        if name not in ds.variables:
            what = "ground truth (fit and evaluate need a reference set with gt/)" if name == GROUND_TRUTH else f"variable '{name}'"
            raise InputError(f"{source}: store has no {what}")
    models = ds.attrs.get("models")
    if not isinstance(models, list) or not models:
        raise InputError(f"{source}: inconsistent store: attribute 'models' is not a list of model names")
    if PREDICTION in ds and ds[PREDICTION].sizes.get("model") != len(models):
        raise InputError(f"{source}: inconsistent store: {ds[PREDICTION].sizes.get('model')} prediction planes for "
                         f"{len(models)} models {models}")
    index = ImageIndex.from_dataset(ds)
    unsafe = next(((stem, problem) for stem in index.stems if (problem := stem_problem(stem))), None)
    if unsafe:
        raise InputError(f"{source}: inconsistent store: image name {unsafe[0]!r} {unsafe[1]}")
    if (index.heights < 1).any() or (index.widths < 1).any():
        raise InputError(f"{source}: inconsistent store: image '{index.stems[int(np.argmin(index.heights * index.widths))]}' "
                         "has no pixels")
    n_pixels = ds.sizes.get("pixel", 0)
    if n_pixels != index.n_pixels:
        raise InputError(f"{source}: inconsistent store: the pixel axis holds {n_pixels:,} pixels, its images "
                         f"{index.n_pixels:,} (an interrupted write? re-run the command that wrote it)")
    for name, expected in (("pixel_count", index.counts), ("pixel_offset", index.offsets)):
        stored = ds[name].values.astype(np.int64)
        wrong = np.flatnonzero(stored != expected)
        if len(wrong):
            raise InputError(f"{source}: inconsistent store: {name} of image '{index.stems[wrong[0]]}' is {stored[wrong[0]]:,}, "
                             f"expected {expected[wrong[0]]:,}")
    return [str(m) for m in models]
