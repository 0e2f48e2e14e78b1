"""Apply: blend a store's predictions with a LUT chunk by chunk, and export images."""

import hashlib

import dask
import dask.array as da
import fsspec
import numpy as np
import xarray as xr

import ensir_flow
from ensir_flow import schema
from ensir_flow.blend import blend
from ensir_flow.errors import InputError
from ensir_flow.images import write_png
from ensir_flow.lut import Lut

from .plan import Plan
from .storage import open_store, refuse_existing, staged_output, write_dataset


def load_lut(path: str) -> Lut:
    """Read a LUT store fully (it is small) and check it."""
    return Lut.from_dataset(open_store(path).load(), source=str(path))


def lut_digest(lut: Lut) -> str:
    """SHA-256 of the weights and their meaning, recorded in every output made with the LUT."""
    digest = hashlib.sha256(np.ascontiguousarray(lut.weights, dtype="<f4").tobytes())
    digest.update(repr((lut.models, lut.bin_width)).encode())
    return digest.hexdigest()


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


def plan_apply(store: str, lut_path: str, output: str, export_dir: str | None = None, overwrite: bool = False,
               device: str = "auto") -> Plan:
    """Plan blending every image of `store` with the LUT into the new store `output`.

    `device` is where the blend tasks run ('auto': each worker's GPU if it has one).
    """
    refuse_existing(output, overwrite)
    if export_dir is not None:
        refuse_existing(export_dir, overwrite)
    ds = open_store(store)
    models = schema.check_store(ds, store)
    lut = load_lut(lut_path)
    lut.check_matches(models, ds.sizes["channel"], str(lut_path))
    predictions = ds[schema.PREDICTION].data
    weights = dask.delayed(lut.weights, pure=True)
    ensemble = da.map_blocks(blend, predictions, weights, lut.bin_width, device, drop_axis=0, dtype=np.uint8,
                             chunks=predictions.chunks[1:])
    out = ds[list(schema.IMAGE_VARIABLES)].copy()
    out[schema.ENSEMBLE] = (("pixel", "channel"), ensemble)
    out.attrs = schema.store_attributes(models, ds.sizes["channel"], created_by=f"ensir-flow {ensir_flow.__version__} apply",
                                        source=str(store), lut=str(lut_path), lut_sha256=lut_digest(lut),
                                        bin_width=lut.bin_width, solver=lut.solver)
    encoding = {schema.ENSEMBLE: {"chunks": (predictions.chunks[1][0], ds.sizes["channel"])}}

    def execute(compute):
        with staged_output(output, overwrite) as staging:
            compute(write_dataset(out, staging, encoding), label="apply")
        if export_dir is not None:
            export(output, export_dir, compute, overwrite)
        return out

    details = {
        "store": str(store), "LUT": f"{lut_path} ({lut.solver}, bin width {lut.bin_width})", "output": str(output),
        "images": ds.sizes["image"], "pixels": f"{ds.sizes['pixel']:,}",
        "tasks": f"{predictions.numblocks[1]} chunks, one blend + write each, on {device}",
    }
    if export_dir is not None:
        details["export"] = f"{export_dir} (one PNG per image)"
    return Plan(f"apply a LUT to {ds.sizes['image']} images", details, execute)


def export(store: str, directory: str, compute, overwrite: bool = False, variable: str = schema.ENSEMBLE) -> None:
    """Write every image of `store` as PNG into `directory`, staged so it appears complete or not at all."""
    ds = open_store(store)
    if variable not in ds:
        raise InputError(f"{store}: no '{variable}' variable to export")
    with staged_output(directory, overwrite) as staging:
        fs, root = fsspec.core.url_to_fs(staging)
        fs.makedirs(root, exist_ok=True)
        compute(*export_graph(ds, variable, staging), label="export")
