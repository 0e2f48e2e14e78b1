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

from typing import NamedTuple

import dask
import numpy as np
import xarray as xr
import zarr
from dask.delayed import Delayed

from ensir_flow import schema

#: How many partial results one merge task of `tree_reduce` combines.
MERGE_FAN_IN = 8


class Span(NamedTuple):
    """Pixels start:stop of a chunk (chunk coordinates) that share `label` (an image, or a fold)."""

    start: int
    stop: int
    label: int


def chunk_ranges(ds: xr.Dataset) -> list[tuple[int, int]]:
    """(start, stop) along `pixel` of each chunk of the store's predictions."""
    lengths = ds[schema.PREDICTION].data.chunks[1]
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
    """Pixels start:stop of a `pixel_array`."""
    return array[(slice(None),) * (array.ndim - 2) + (slice(start, stop),)]


def chunk_spans(index: schema.ImageIndex, label_of_image: np.ndarray, chunk_lengths: tuple[int, ...]) -> list[list[Span]]:
    """Per chunk of the given lengths, the spans of its pixels, labelled by `label_of_image`;
    neighbouring images of one label share a span."""
    starts, stops = index.offsets, index.offsets + index.counts
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
