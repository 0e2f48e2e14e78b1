"""Chunk-aligned reads of pixel stores inside tasks.

Each task of a pass over a store reads its own chunk straight from Zarr, so the read and the work
on it are one task (half the tasks and no chunk handed from task to task). The client opens each
array once and sends the opened array (its location and metadata, about a kilobyte) with
(start, stop): it never holds pixels, and tasks do not read the array's metadata again.
"""

import dask
import numpy as np
import xarray as xr
import zarr
from dask.delayed import Delayed

from ensir_flow import schema


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
