"""LUT stores: `read_lut` reads one whole and checks it; `write_lut` writes one with zarr alone,
as xarray would, committing it with one write of its root metadata (`zarr_adapter.commit_metadata`).
A LUT is written into staging (`commit.staged_output`), so readers see it whole or not at all.
"""

from __future__ import annotations

import base64
import struct
from typing import TYPE_CHECKING

import numpy as np
import zarr
from zarr.buffer import default_buffer_prototype

from .stores import open_store, unreadable_store
from .zarr_adapter import commit_metadata

if TYPE_CHECKING:
    from ensir_flow.lut import Lut


def read_lut(path: str) -> Lut:
    """Read a LUT store fully and check it. Its weights (bin, channel, model), nearly all of a
    many-model LUT, are read straight into the leading rows of an array with one spare row, where
    `blend.weights_with_fallback` puts the fallback for apply's lookup table instead of copying
    them (at K = 16, w = 16 on 10 Mpx: 505 MB). Weights stored with a scale, an offset or a fill
    value other than NaN (not written by ensir-flow) are decoded by xarray instead."""
    from ensir_flow.blend import rows_with_spare_row
    from ensir_flow.lut import WEIGHT_DIMS, Lut

    ds = open_store(path, in_memory=True, read_later=("weights",))
    if "weights" in ds:
        variable = ds["weights"].variable
        fill = variable.encoding.get("_FillValue")
        if (
            variable.dims == WEIGHT_DIMS
            and variable.dtype == np.float32
            and (fill is None or (isinstance(fill, (float, np.floating)) and np.isnan(fill)))
            and not {"scale_factor", "add_offset"} & set(variable.encoding)
        ):
            rows = rows_with_spare_row(*variable.shape)
            try:
                zarr.open_array(store=str(path), path="weights", mode="r").get_basic_selection(
                    ..., out=default_buffer_prototype().nd_buffer.from_numpy_array(rows[:-1])
                )
            except Exception as error:
                raise unreadable_store(path, error) from None
            ds["weights"] = ds["weights"].copy(data=rows[:-1])
        else:
            variable.load()
    return Lut.from_dataset(ds, source=str(path))


#: xarray's attribute for a float array's missing value in Zarr v3: the float64 bytes of NaN in base64.
NAN_FILL_VALUE_ATTRIBUTE = base64.standard_b64encode(struct.pack("<d", float("nan"))).decode()


def write_lut(lut: Lut, path: str) -> None:
    """Write `lut` as a new Zarr v3 store at `path` (a staging location: see
    `commit.staged_output`) with zarr alone, as xarray's `to_zarr` writes `lut.to_dataset()`: the
    same arrays, chunks, codecs and metadata (tested), so xarray and every reader of LUT stores
    read it as before. Importing xarray and dask.array for that write took 1.3 s of every `fit`.

    xarray's encoding, made explicit: each array's dimension names; a float array's fill value
    NaN, also as its `_FillValue` attribute; each data variable's CF `coordinates` attribute,
    naming the coordinates (other than dimensions) whose dimensions it spans. The attributes and
    the consolidated metadata go in the one final write of the root `zarr.json`
    (`zarr_adapter.commit_metadata`).
    """
    data_vars, coords, attrs = lut.layout()
    group = zarr.open_group(str(path), mode="w-", zarr_format=3)
    for name, (dims, values, var_attrs) in {**coords, **data_vars}.items():
        attributes = {key: value.tolist() if isinstance(value, np.ndarray) else value for key, value in var_attrs.items()}
        linked = [
            coord
            for coord, (coord_dims, _, _) in coords.items()
            if name in data_vars and coord not in dims and set(coord_dims) <= set(dims)
        ]
        if linked:
            attributes["coordinates"] = " ".join(linked)
        fill_value, dtype = None, values.dtype
        if dtype.kind == "f":
            fill_value, attributes["_FillValue"] = np.nan, NAN_FILL_VALUE_ATTRIBUTE
        elif dtype.kind == "O":  # names: zarr's variable-length strings
            values, dtype = values.astype(str), str
        array = group.create_array(
            name, shape=values.shape, dtype=dtype, fill_value=fill_value, attributes=attributes, dimension_names=dims
        )
        array[...] = values
    commit_metadata(path, attrs)
