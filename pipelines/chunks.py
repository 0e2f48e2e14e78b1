"""Building blocks of a pass over a store's chunks: chunk ranges, spans, reads inside tasks, and
the tree that reduces per-chunk results.

A *span* is a run of pixels start:stop of one chunk (in chunk coordinates) that share a label:
the image they belong to (apply, ZZPM) or the fold of images (fit's cross-validation). Images lie
back to back on the pixel axis, so a chunk is covered by a few spans.

Each task of a pass over a store reads its own chunk straight from Zarr, so the read and the work
on it are one task (half the tasks and no chunk handed from task to task). The client opens each
array once and sends the opened array (its location and metadata, about a kilobyte) with
(start, stop): it never holds pixels, and tasks do not read the array's metadata again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import dask
import numpy as np
import zarr
from dask.delayed import Delayed

from ensir_flow import schema
from ensir_flow.errors import InputError

if TYPE_CHECKING:
    import xarray as xr

    from .storage import StoreIndex

#: How many partial results one merge task of `tree_reduce` combines.
MERGE_FAN_IN = 8


class Span(NamedTuple):
    """Pixels start:stop of a chunk (chunk coordinates) that share `label` (an image, or a fold)."""

    start: int
    stop: int
    label: int


def chunk_ranges(ds: xr.Dataset | StoreIndex) -> list[tuple[int, int]]:
    """(start, stop) along `pixel` of each chunk of the store's predictions."""
    return ranges_of(pixel_chunk_lengths(ds))


def pixel_chunk_lengths(ds: xr.Dataset | StoreIndex) -> tuple[int, ...]:
    """Length along `pixel` of each chunk of the store's predictions, from a store opened by
    `storage.open_store` (xarray) or by `storage.open_store_index` (zarr alone)."""
    return ds[schema.PREDICTION].chunks[1]


def ranges_of(lengths) -> list[tuple[int, int]]:
    """(start, stop) of consecutive chunks of the given lengths."""
    stops = np.cumsum(lengths)
    return [(int(stop - length), int(stop)) for stop, length in zip(stops, lengths)]


def pixel_array(store: str, name: str) -> zarr.Array:
    """The pixel variable `name` ((model,) pixel, channel) of the store at `store`, opened to read."""
    return zarr.open_array(store=str(store), path=name, mode="r")


def task_argument(array: zarr.Array) -> Delayed:
    """An opened array as one key of the graph, to pass to every task of a pass.

    A zarr Array is a dataclass, and dask walks dataclass arguments field by field (about 7 ms an
    argument, so most of the time to build a graph); behind one key it is walked once and sent
    to each worker once.
    """
    return dask.delayed(array, pure=True)


def read_pixels(array: zarr.Array, start: int, stop: int) -> np.ndarray:
    """Pixels start:stop of a `pixel_array`.

    A chunk that its codec cannot decode (corrupt or truncated: blosc and zstd raise RuntimeError,
    a chunk of the wrong size ValueError) is an InputError naming the store, the array and the
    chunk. A chunk that is missing reads as the fill value (Zarr's rule); that is not detected here.
    """
    try:
        return array[_pixel_slice(array, start, stop)]
    except (RuntimeError, ValueError) as error:
        raise _unreadable(array, start, stop, error) from None


def _pixel_slice(array: zarr.Array, start: int, stop: int) -> tuple:
    return (slice(None),) * (array.ndim - 2) + (slice(start, stop),)


def _unreadable(array: zarr.Array, start: int, stop: int, error: Exception) -> InputError:
    """The InputError for a failed read of pixels start:stop: the first chunk among them that
    cannot be read alone is named (the one read first, if each reads alone)."""
    length, n_pixels = array.chunks[-2], array.shape[-2]
    culprit, reason = start // length, error
    for index in range(start // length, -(-stop // length)):
        try:
            array[_pixel_slice(array, index * length, min((index + 1) * length, n_pixels))]
        except (RuntimeError, ValueError) as chunk_error:
            culprit, reason = index, chunk_error
            break
    text = str(reason).strip()
    first_line = text.splitlines()[0] if text else type(reason).__name__
    return InputError(f"{store_location(array)}/{array.path}: chunk {culprit} (pixels {culprit * length}:"
                      f"{min((culprit + 1) * length, n_pixels)}) is unreadable ({first_line})")


def store_location(array: zarr.Array) -> str:
    """Where the store of an opened zarr Array lies, as a path or URL (for messages)."""
    store = array.store
    root = getattr(store, "root", None)  # a LocalStore
    if root is not None:
        return str(root)
    fs, path = getattr(store, "fs", None), getattr(store, "path", None)  # an FsspecStore
    if fs is not None and path is not None:
        return fs.unstrip_protocol(path)
    return str(store)


def chunk_spans(offsets: np.ndarray, counts: np.ndarray, label_of_image: np.ndarray,
                chunk_lengths: tuple[int, ...]) -> list[list[Span]]:
    """Per chunk of the given lengths, the spans of its pixels, labelled by `label_of_image`, of
    images lying back to back at `offsets` with `counts` pixels each (`schema.ImageIndex`'s);
    neighbouring images of one label share a span."""
    starts, stops = offsets, offsets + counts
    per_chunk, chunk_start = [], 0
    for length in chunk_lengths:
        chunk_stop = chunk_start + length
        spans: list[Span] = []
        for i in np.flatnonzero((starts < chunk_stop) & (stops > chunk_start)):
            start, stop = int(max(starts[i], chunk_start) - chunk_start), int(min(stops[i], chunk_stop) - chunk_start)
            label = int(label_of_image[i])
            if spans and spans[-1].label == label and spans[-1].stop == start:
                spans[-1] = spans[-1]._replace(stop=stop)
            else:
                spans.append(Span(start, stop, label))
        per_chunk.append(spans)
        chunk_start = chunk_stop
    return per_chunk


def image_folds(n_images: int, n_folds: int) -> np.ndarray:
    """Fold of each image for cross-validation by image: image i (in store order) is in fold i % n_folds."""
    return np.arange(n_images) % n_folds


def tree_reduce(parts: list, combine, fan_in: int = MERGE_FAN_IN):
    """Combine delayed parts in a tree of `fan_in`-way merges (bounded memory per merge task)."""
    while len(parts) > 1:
        parts = [dask.delayed(combine, pure=True)(*parts[i: i + fan_in]) for i in range(0, len(parts), fan_in)]
    return parts[0]
