"""Export: one lossless PNG per image of a pixel store, one task per image."""

import dask
import fsspec
import numpy as np
import xarray as xr

from ensir_flow import schema
from ensir_flow.errors import InputError
from ensir_flow.images import write_png

from .executor import Compute
from .storage import open_store, staged_output


def _export_image(pixels: np.ndarray, height: int, width: int, path) -> None:
    write_png(path, np.asarray(pixels).reshape(height, width, -1))


def export_graph(ds: xr.Dataset, variable: str, directory) -> list:
    """Delayed writes of one lossless PNG per image of `ds[variable]`, named by stem."""
    index = schema.ImageIndex.from_dataset(ds)
    data = ds[variable].data
    return [
        dask.delayed(_export_image, pure=True)(data[offset: offset + count], h, w, f"{directory}/{stem}.png")
        for stem, h, w, offset, count in zip(index.stems, index.heights, index.widths, index.offsets, index.counts)
    ]


def export(store: str, directory: str, compute: Compute, overwrite: bool = False, variable: str = schema.ENSEMBLE) -> None:
    """Write every image of `store` as PNG into `directory`, staged so it appears complete or not at all."""
    ds = open_store(store)
    if variable not in ds:
        raise InputError(f"{store}: no '{variable}' variable to export")
    with staged_output(directory, overwrite) as staging:
        fs, root = fsspec.core.url_to_fs(staging)
        fs.makedirs(root, exist_ok=True)
        compute(*export_graph(ds, variable, staging), label="export")
