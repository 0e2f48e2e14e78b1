"""The layout of ensir-flow's Zarr stores (README, "Data layout"), in one place.

Images of different sizes live back to back on dimension `pixel` (CF contiguous ragged array):
per-image variables on dimension `image` (coordinate = file stem) give `height`, `width`,
`pixel_offset` and `pixel_count`. Pixel variables are uint8 and chunked along `pixel` only:
`prediction` (model, pixel, channel), optional `ground_truth` and `input` (the degraded input,
when it has the outputs' size) (pixel, channel), and `ensemble` (pixel, channel) in the output of
`apply`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import InputError
from .images import GROUND_TRUTH_DIR, INPUT_DIR, stem_problem

if TYPE_CHECKING:
    import xarray as xr

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
#: Their codecs: `pixel_encoding`.
COMPRESSORS = ("lz4", "zstd", "none")
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
        import xarray as xr  # writers only: readers check stores without xarray (`pipelines.stores.open_store_index`)

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
    def from_dataset(cls, ds: xr.Dataset) -> ImageIndex:
        return cls(
            [str(s) for s in ds["image"].values], ds["height"].values.astype(np.int64), ds["width"].values.astype(np.int64)
        )


def pixel_chunks(n_pixels: int, chunk_pixels: int) -> tuple[int, ...]:
    """Chunk lengths along `pixel`: equal chunks of `chunk_pixels`, the last one shorter."""
    if chunk_pixels < 1:
        raise ValueError("chunk size must be at least one pixel")
    full, rest = divmod(n_pixels, chunk_pixels)
    return (chunk_pixels,) * full + ((rest,) if rest else ())


#: The most bytes a chunk of a pixel variable may hold: blosc compresses buffers of under 2 GiB.
MAX_CHUNK_BYTES = 2**31 - 2**16


def pixel_encoding(chunks: tuple[int, ...], compression: str = DEFAULT_COMPRESSION) -> dict:
    """xarray's Zarr encoding of a pixel variable (uint8): its chunk shape and compressor. Chunks
    over `MAX_CHUNK_BYTES` (many models at a large --chunk-pixels) are an InputError."""
    if compression not in COMPRESSORS:
        raise ValueError(f"unknown compression {compression!r} (choose from {', '.join(COMPRESSORS)})")
    size = math.prod(chunks)
    if size > MAX_CHUNK_BYTES:
        per_pixel = size // chunks[-2]
        raise InputError(
            f"--chunk-pixels {chunks[-2]}: chunks of {' x '.join(map(str, chunks))} values hold "
            f"{size / 2**30:.1f} GiB, over the {MAX_CHUNK_BYTES / 2**30:.0f} GiB a chunk may hold; "
            f"{MAX_CHUNK_BYTES // per_pixel:,} at most here"
        )
    # zarr's codecs only where a store is written: the CLI's options need the names alone
    from zarr.codecs import BloscCodec, ZstdCodec

    codecs = {"lz4": (BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle"),), "zstd": (ZstdCodec(level=3),), "none": None}
    return {"chunks": chunks, "compressors": codecs[compression]}


def compression_of(encoding: dict) -> str:
    """How an array opened by xarray is compressed, in words (e.g. 'blosc lz4 level 5', 'none')."""
    labels = []
    for codec in encoding.get("compressors") or ():
        spec = codec.to_dict()
        settings = spec.get("configuration", {})
        labels.append(
            " ".join(
                str(part)
                for part in (spec["name"], settings.get("cname"), f"level {settings.get('clevel', settings.get('level'))}")
                if part
            )
        )
    return ", ".join(labels) or "none"


#: The CF version whose attribute conventions the stores follow where they fit (long_name, units,
#: flag_values/flag_meanings, the contiguous ragged array's sample_dimension).
CONVENTIONS = "CF-1.10"  # as the LUTs (lut.py)


def store_attributes(models: list[str], channels: int, **provenance) -> dict:
    """Attributes every ensir-flow pixel store carries."""
    return {
        "Conventions": CONVENTIONS,
        "schema_version": SCHEMA_VERSION,
        "models": list(models),
        "channels": channels,
        **provenance,
    }


#: Names of the `channel` coordinate by number of channels: colour corpora are RGB, grayscale ones
#: (kept as one channel, see `images`) a single luminance channel.
CHANNEL_NAMES = {3: ("R", "G", "B"), 1: ("Y",)}

#: The 8-bit range of every pixel variable (CF `valid_range`).
PIXEL_RANGE = [0, 255]

#: CF attributes of every variable and coordinate a store can hold, so that `xarray.open_zarr`
#: (or any CF-aware reader) shows what each one is. `annotate` adds them to what a writer writes.
VARIABLE_ATTRIBUTES = {
    PREDICTION: {"long_name": "restored image of each base model", "valid_range": PIXEL_RANGE},
    GROUND_TRUTH: {"long_name": "ground truth image", "valid_range": PIXEL_RANGE},
    INPUT: {"long_name": "degraded input image (lq/)", "valid_range": PIXEL_RANGE},
    ENSEMBLE: {"long_name": "EnsIR ensemble of the base models' images", "valid_range": PIXEL_RANGE},
    "height": {"long_name": "image height", "units": "1"},
    "width": {"long_name": "image width", "units": "1"},
    "pixel_offset": {"long_name": "index on dimension pixel of the image's first pixel", "units": "1"},
    "pixel_count": {"long_name": "number of pixels of the image (height x width)", "units": "1", "sample_dimension": "pixel"},
    "source_file": {"long_name": "name of the source image file"},
    "source_sha256": {"long_name": "SHA-256 of the source image file's bytes"},
    "image": {"long_name": "image name (source file stem)"},
    "model": {"long_name": "base restoration model"},
    "channel": {"long_name": "colour channel"},
    "source": {"long_name": "source folder (a model, gt or lq)"},
}


def channel_names(n_channels: int) -> tuple[str, ...]:
    """The `channel` coordinate of a store of `n_channels`-channel images."""
    if n_channels not in CHANNEL_NAMES:
        raise ValueError(f"no channel names for {n_channels} channels (stores hold 1 or 3)")
    return CHANNEL_NAMES[n_channels]


def annotate(ds: xr.Dataset) -> xr.Dataset:
    """`ds` with a `channel` coordinate (R, G, B or Y) and the CF attributes of `VARIABLE_ATTRIBUTES`
    on every variable it has (existing attributes kept). Writers call it on what they write; it
    changes no data, so stores written before it hold the same pixels and still open."""
    if "channel" in ds.dims and "channel" not in ds.coords:
        ds = ds.assign_coords(channel=np.array(channel_names(ds.sizes["channel"]), dtype=object))
    for name, attributes in VARIABLE_ATTRIBUTES.items():
        if name in ds.variables:
            ds[name].attrs = {**attributes, **ds[name].attrs}
    return ds


def image(ds: xr.Dataset, which: str | int, variable: str = ENSEMBLE, model: str | int | None = None) -> np.ndarray:
    """Image `which` (its name, or its position in the store) of `variable` as an (H, W, C) uint8
    array, read from the ragged `pixel` axis at the offset the image index gives.

    For `prediction` (one plane per model) `model` names the model (or its position); it may be
    left out when the store has a single model. A name or position the store lacks is an InputError.
    """
    index = ImageIndex.from_dataset(ds)
    if isinstance(which, (int, np.integer)) and not isinstance(which, bool):
        if not -len(index.stems) <= which < len(index.stems):
            raise InputError(f"image {which}: the store holds {len(index.stems)} images")
        position = int(which) % len(index.stems)
    elif which in index.stems:
        position = index.stems.index(which)
    else:
        raise InputError(
            f"image {which!r}: not in the store (images: {', '.join(index.stems[:5])}{', ...' if len(index.stems) > 5 else ''})"
        )
    if variable not in ds:
        raise InputError(f"no variable '{variable}' in the store (it has {', '.join(map(str, ds.data_vars))})")
    pixels = ds[variable]
    if "model" in pixels.dims:
        models = [str(m) for m in ds.attrs.get("models", [])]
        if model is None and pixels.sizes["model"] != 1:
            raise InputError(f"'{variable}' holds {pixels.sizes['model']} models ({', '.join(models)}): say which with model=")
        if isinstance(model, str):
            if model not in models:
                raise InputError(f"model {model!r}: not in the store (models: {', '.join(models)})")
            model = models.index(model)
        elif model is not None and not -pixels.sizes["model"] <= model < pixels.sizes["model"]:
            raise InputError(f"model {model}: '{variable}' holds {pixels.sizes['model']} models")
        pixels = pixels.isel(model=model or 0)
    elif model is not None:
        raise InputError(f"'{variable}' has no model dimension: model= applies to '{PREDICTION}' only")
    start = int(index.offsets[position])
    values = pixels.isel(pixel=slice(start, start + int(index.counts[position]))).transpose("pixel", "channel").values
    return np.asarray(values, dtype=np.uint8).reshape(int(index.heights[position]), int(index.widths[position]), -1)


#: The dimensions of each pixel variable, in the order the pipelines read them (`chunks.pixel_array`).
PIXEL_DIMS = {
    PREDICTION: ("model", "pixel", "channel"),
    GROUND_TRUTH: ("pixel", "channel"),
    INPUT: ("pixel", "channel"),
    ENSEMBLE: ("pixel", "channel"),
}


def is_integer(value) -> bool:
    """Whether an attribute read from a store is an integer (3 or 3.0; not True, 3.5 or "3")."""
    return isinstance(value, (int, np.integer, float, np.floating)) and not isinstance(value, bool) and float(value).is_integer()


def check_store(ds: xr.Dataset, source: str, require: tuple[str, ...] = (PREDICTION,)) -> list[str]:
    """Validate a pixel store's schema and structural invariants; return its model list.

    Stores can be written by anyone (or left by a crash), so every reader checks, before using
    the image index: the schema version (an integer this version reads); required attributes and
    variables; the `models` attribute, a list of names that the `model` coordinate, where there is
    one, spells the same, as do the model folders of the `source` coordinate (of stores ingested
    from folders); every variable's dimensions (the pixel variables' in the order
    `PIXEL_DIMS`) of the lengths the store's images, models and `channels` give; the pixel axis
    holding exactly the images' pixels (sum of height x width); `pixel_count` = height x width and
    `pixel_offset` = the cumulative counts (the contiguous ragged layout: offsets are authoritative
    only because they must equal the cumulative counts). A store that fails is refused, naming what
    is wrong. `ds` is the store opened by xarray, or read with zarr alone
    (`pipelines.stores.StoreIndex`: the same `attrs`, variables by name with their `dims`, `sizes`
    and `values`, but no check that variables sharing a dimension agree on its length).
    """
    version = ds.attrs.get("schema_version")
    if version is None:
        raise InputError(f"{source}: not an ensir-flow store (no schema_version attribute)")
    if not is_integer(version) or version < 1:
        raise InputError(
            f"{source}: attribute schema_version is {version!r}, not a schema version (a whole number; "
            f"this ensir-flow reads up to {SCHEMA_VERSION})"
        )
    if version > SCHEMA_VERSION:
        raise InputError(
            f"{source}: written by a newer ensir-flow (schema {version}, this one reads up to {SCHEMA_VERSION}); "
            "upgrade ensir-flow"
        )
    for name in (*require, *IMAGE_VARIABLES, "image"):
        if name not in ds.variables:
            what = (
                "ground truth (fit and evaluate need a reference set with gt/)" if name == GROUND_TRUTH else f"variable '{name}'"
            )
            raise InputError(f"{source}: store has no {what}")
    models = ds.attrs.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
        raise InputError(f"{source}: inconsistent store: attribute 'models' is {models!r}, not a list of model names")
    if "model" in ds.variables:
        coordinate = [str(m) for m in np.asarray(ds["model"].values).reshape(-1)]
        if coordinate != models:
            raise InputError(
                f"{source}: inconsistent store: attribute 'models' {models} disagrees with the model coordinate {coordinate}"
            )
    if "source" in ds.variables:  # the folders the store's planes came from: each model's, then gt/ and lq/
        folders = [str(name) for name in np.asarray(ds["source"].values).reshape(-1)]
        named = [name for name in folders if name not in (GROUND_TRUTH_DIR, INPUT_DIR)]
        if named and named != models:
            raise InputError(
                f"{source}: inconsistent store: attribute 'models' {models} disagrees with the model folders of "
                f"the source coordinate {named}"
            )
    _check_image_variables(ds, source)
    index = ImageIndex.from_dataset(ds)
    unsafe = next(((stem, problem) for stem in index.stems if (problem := stem_problem(stem))), None)
    if unsafe:
        raise InputError(f"{source}: inconsistent store: image name {unsafe[0]!r} {unsafe[1]}")
    if (index.heights < 1).any() or (index.widths < 1).any():
        raise InputError(
            f"{source}: inconsistent store: image '{index.stems[int(np.argmin(index.heights * index.widths))]}' has no pixels"
        )
    pixel_lengths = {name: ds[name].sizes.get("pixel", 0) for name in PIXEL_DIMS if name in ds.variables} or {"the store": 0}
    for name, n_pixels in pixel_lengths.items():
        if n_pixels != index.n_pixels:
            raise InputError(
                f"{source}: inconsistent store: the pixel axis of {name} holds {n_pixels:,} pixels, its images "
                f"{index.n_pixels:,} (an interrupted write? re-run the command that wrote it)"
            )
    _check_dimensions(ds, source, len(models))
    for name, expected in (("pixel_count", index.counts), ("pixel_offset", index.offsets)):
        stored = ds[name].values.astype(np.int64)
        wrong = np.flatnonzero(stored != expected)
        if len(wrong):
            raise InputError(
                f"{source}: inconsistent store: {name} of image '{index.stems[wrong[0]]}' is {stored[wrong[0]]:,}, "
                f"expected {expected[wrong[0]]:,}"
            )
    return list(models)


def _check_image_variables(ds: xr.Dataset, source: str) -> None:
    """Refuse an image index `ImageIndex.from_dataset` cannot read as one: `image` and every
    variable of `IMAGE_VARIABLES` on dimension `image` alone, all of one length, the latter
    holding integers."""
    names = ("image", *IMAGE_VARIABLES)
    for name in names:
        if tuple(ds[name].dims) != ("image",):
            raise InputError(f"{source}: inconsistent store: {name} has dimensions {tuple(ds[name].dims)}, expected ('image',)")
        if name != "image" and np.asarray(ds[name].values).dtype.kind not in "iu":
            raise InputError(
                f"{source}: inconsistent store: {name} holds {np.asarray(ds[name].values).dtype} values, not integers"
            )
    lengths = [ds[name].sizes["image"] for name in names]
    if len(set(lengths)) > 1:
        raise InputError(
            f"{source}: inconsistent store: the image index disagrees on the number of images "
            f"({', '.join(f'{name} {n}' for name, n in zip(names, lengths))})"
        )


def _check_dimensions(ds: xr.Dataset, source: str, n_models: int) -> None:
    """Refuse a pixel variable whose dimensions are not `PIXEL_DIMS`, and any variable whose length
    on dimension image, model or channel is not the store's: its images, its models, and its
    `channels` attribute (or, without one, the length every other variable gives the dimension)."""
    channels = ds.attrs.get("channels")
    if channels is not None and (not is_integer(channels) or channels < 1):
        raise InputError(f"{source}: inconsistent store: attribute 'channels' is {channels!r}, not a number of channels")
    expected = {"image": (ds["image"].sizes["image"], "images"), "model": (n_models, "models")}
    if channels is not None:
        expected["channel"] = (int(channels), "channels (attribute 'channels')")
    for name in ds.variables:
        variable = ds[name]
        if name in PIXEL_DIMS and tuple(variable.dims) != PIXEL_DIMS[name]:
            raise InputError(
                f"{source}: inconsistent store: {name} has dimensions {tuple(variable.dims)}, expected {PIXEL_DIMS[name]}"
            )
        for dim, size in variable.sizes.items():
            if dim == "channel" and dim not in expected:
                expected[dim] = (size, f"channels (as {name})")
            if dim in expected and size != expected[dim][0]:
                raise InputError(
                    f"{source}: inconsistent store: {name} has length {size} on dimension {dim}; the store has "
                    f"{expected[dim][0]} {expected[dim][1]}"
                )
