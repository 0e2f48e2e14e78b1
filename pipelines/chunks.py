"""Chunk-aligned reads of pixel stores inside tasks.

Each task of a pass over a store reads its own chunk straight from Zarr, so the read and the work
on it are one task (half the tasks and no chunk handed from task to task), and the client only
ever sends (store, start, stop): it never holds pixels.
"""

import numpy as np
import xarray as xr
import zarr

from ensir_flow import schema


def chunk_ranges(ds: xr.Dataset) -> list[tuple[int, int]]:
    """(start, stop) along `pixel` of each chunk of the store's predictions."""
    stops = np.cumsum(ds[schema.PREDICTION].data.chunks[1])
    return [(int(stop - length), int(stop)) for stop, length in zip(stops, ds[schema.PREDICTION].data.chunks[1])]


def read_pixels(store: str, name: str, start: int, stop: int) -> np.ndarray:
    """Pixels start:stop of the pixel variable `name` ((model,) pixel, channel) of `store`."""
    array = zarr.open_array(store=str(store), path=name, mode="r")
    return array[(slice(None),) * (array.ndim - 2) + (slice(start, stop),)]
