"""Apply: blend a store's predictions with a LUT chunk by chunk, and export images."""

import hashlib
from dataclasses import dataclass

import dask
import dask.array as da
import fsspec
import numpy as np
import xarray as xr
import zarr

import ensir_flow
from ensir_flow import schema
from ensir_flow.blend import blend, blend_segments, squared_distance_sums, zzpm_weights
from ensir_flow.errors import InputError
from ensir_flow.images import write_png
from ensir_flow.lut import Lut

from .chunks import chunk_ranges, pixel_array, read_pixels, task_argument
from .fit import chunk_segments
from .plan import Plan
from .storage import (commit, exclusive_lock, exists, open_array_for_writing, open_store, refuse_existing, resumable_location,
                      staged_output, write_dataset)


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


COMPLETE = "chunk_complete"


@dataclass
class ApplyResult:
    """What an apply run did: `written` (from scratch), `resumed` or `unchanged` (already complete)."""

    output: xr.Dataset
    status: str
    chunks_total: int
    chunks_computed: int


def store_fingerprint(ds: xr.Dataset) -> str:
    """SHA-256 identifying a pixel store's content: models, images, sizes, chunking, source hashes."""
    digest = hashlib.sha256(repr((ds.attrs.get("models"), [str(s) for s in ds["image"].values],
                                  ds["pixel_count"].values.tolist(), ds[schema.PREDICTION].data.chunks)).encode())
    if "source_sha256" in ds:
        digest.update(" ".join(map(str, ds["source_sha256"].values.ravel())).encode())
    return digest.hexdigest()


def _blend_chunk_into(combine, arguments: tuple, predictions, start: int, stop: int, ensemble, complete, index: int) -> None:
    """One task: read chunk start:stop of the array of predictions, combine it, write the result
    to its own chunk of the array `ensemble`, then mark it in `complete` (chunk `index`)."""
    ensemble[start:stop] = combine(read_pixels(predictions, start, stop), *arguments)
    complete[index] = 1


def plan_apply(store: str, lut_path: str, output: str, export_dir: str | None = None, overwrite: bool = False,
               device: str = "auto", compression: str = schema.DEFAULT_COMPRESSION) -> Plan:
    """Plan blending every image of `store` with the LUT into the store `output`.

    The run is resumable: chunks are written into a fixed staging location beside `output`, each
    followed by its mark in the `chunk_complete` array, so a run that was killed is finished by
    running the same command again (only unmarked chunks are computed). The finished store is moved
    into place; re-running a finished job is a no-op. A lock beside `output` keeps a second run
    away. `device` is where the blend tasks run ('auto': each worker's GPU if it has one);
    `compression` names the compressor of `ensemble` (`schema.COMPRESSORS`).
    """
    ds = open_store(store)
    models = schema.check_store(ds, store)
    lut = load_lut(lut_path)
    lut.check_matches(models, ds.sizes["channel"], str(lut_path))
    provenance = {"source": str(store), "source_fingerprint": store_fingerprint(ds), "lut": str(lut_path),
                  "lut_sha256": lut_digest(lut)}
    finished = exists(output) and _matches(open_store(output).attrs, provenance)
    if not finished:
        refuse_existing(output, overwrite)
    if export_dir is not None and not (finished and exists(export_dir)):
        refuse_existing(export_dir, overwrite)
    chunk_lengths = ds[schema.PREDICTION].data.chunks[1]
    ranges = chunk_ranges(ds)
    out = ds[list(schema.IMAGE_VARIABLES)].load()  # written with the template; `ensemble` by the tasks
    out[schema.ENSEMBLE] = (("pixel", "channel"), da.zeros((ds.sizes["pixel"], ds.sizes["channel"]), dtype=np.uint8,
                                                           chunks=(chunk_lengths, -1)))
    # Marks are written by the tasks only: an unwritten one reads as 0, not complete.
    out[COMPLETE] = ("chunk", da.zeros(len(chunk_lengths), dtype=np.uint8, chunks=1),
                     {"description": "1 once the chunk of `ensemble` with this index is written"})
    out.attrs = schema.store_attributes(models, ds.sizes["channel"], created_by=f"ensir-flow {ensir_flow.__version__} apply",
                                        bin_width=lut.bin_width, solver=lut.solver, **provenance)
    encoding = {COMPLETE: {"chunks": (1,)},
                schema.ENSEMBLE: schema.pixel_encoding((chunk_lengths[0], ds.sizes["channel"]), compression)}
    staging = resumable_location(output)
    segments = chunk_segments(ds, np.arange(ds.sizes["image"]), chunk_lengths)  # (start, stop, image) per chunk

    def execute(compute):
        if finished:
            if export_dir is not None and not exists(export_dir):
                export(output, export_dir, compute, overwrite)
            return ApplyResult(open_store(output), "unchanged", len(chunk_lengths), 0)
        with exclusive_lock(output):
            resuming = exists(staging) and _matches(open_store(staging).attrs, provenance)
            if not resuming:
                if exists(staging):  # left by a run with other inputs
                    fs, path = fsspec.core.url_to_fs(staging)
                    fs.rm(path, recursive=True)
                write_dataset(out, staging, encoding)  # all but `ensemble` and its marks, written below
                done = np.zeros(len(chunk_lengths), dtype=bool)
            else:
                done = zarr.open_group(staging, mode="r")[COMPLETE][:].astype(bool)
            todo = np.flatnonzero(~done)
            predictions = task_argument(pixel_array(store, schema.PREDICTION))
            if lut.solver == "zzpm":
                image_weights = _zzpm_image_weights(predictions, ranges, ds, segments, compute)
                jobs = [(blend_segments, (image_weights[[g for _, _, g in segments[i]]], [(a, b) for a, b, _ in segments[i]]))
                        for i in todo]
            else:
                weights = dask.delayed(lut.weights, pure=True)
                jobs = [(blend, (weights, lut.bin_width, device)) for _ in todo]
            ensemble, complete = (task_argument(open_array_for_writing(staging, name)) for name in (schema.ENSEMBLE, COMPLETE))
            tasks = [dask.delayed(_blend_chunk_into)(combine, arguments, predictions, *ranges[i], ensemble, complete, int(i))
                     for i, (combine, arguments) in zip(todo, jobs)]
            compute(*tasks, label=f"apply ({len(tasks)} of {len(done)} chunks)" if resuming else "apply")
            if not zarr.open_group(staging, mode="r")[COMPLETE][:].all():
                raise RuntimeError(f"{staging}: chunks left unmarked after every task succeeded; not committing")
            commit(staging, output)
        if export_dir is not None:
            export(output, export_dir, compute, overwrite)
        return ApplyResult(open_store(output), "resumed" if resuming else "written", len(done), len(tasks))

    details = {
        "store": str(store), "LUT": f"{lut_path} ({lut.solver}, bin width {lut.bin_width})", "output": str(output),
        "images": ds.sizes["image"], "pixels": f"{ds.sizes['pixel']:,}",
        "tasks": "none: the output is already complete" if finished else
                 f"{len(chunk_lengths)} chunks, one blend + write each, on {device} (resumable from {staging})",
        "compression": compression,
    }
    if export_dir is not None:
        details["export"] = f"{export_dir} (one PNG per image)"
    return Plan(f"apply a LUT to {ds.sizes['image']} images", details, execute)


def _zzpm_image_weights(predictions, ranges, ds: xr.Dataset, segments, compute) -> np.ndarray:
    """ZZPM's weights (images, K): one pass of per-chunk, per-image squared distances to the mean
    (`predictions`: the store's opened array as a graph key; `ranges`: its chunks' (start, stop))."""
    parts = [dask.delayed(_segment_distance_sums, pure=True)(predictions, start, stop, runs)
             for (start, stop), runs in zip(ranges, segments)]
    sums = np.zeros((ds.sizes["image"], ds.sizes["model"]))
    for chunk_sums in compute(*parts, label="ZZPM weights"):
        for image, values in chunk_sums:
            sums[image] += values
    values_per_image = ds["pixel_count"].values[:, None] * ds.sizes["channel"]
    return zzpm_weights(sums / values_per_image)


def _segment_distance_sums(predictions, start: int, stop: int, runs) -> list[tuple[int, np.ndarray]]:
    """One task: per image in chunk start:stop of the array of predictions, its `squared_distance_sums`."""
    chunk = read_pixels(predictions, start, stop)
    return [(image, squared_distance_sums(chunk[:, lo:hi])) for lo, hi, image in runs]


def _matches(attrs: dict, provenance: dict) -> bool:
    """Whether a store was (or is being) made from the same inputs as this run."""
    return all(attrs.get(key) == value for key, value in provenance.items())


def export(store: str, directory: str, compute, overwrite: bool = False, variable: str = schema.ENSEMBLE) -> None:
    """Write every image of `store` as PNG into `directory`, staged so it appears complete or not at all."""
    ds = open_store(store)
    if variable not in ds:
        raise InputError(f"{store}: no '{variable}' variable to export")
    with staged_output(directory, overwrite) as staging:
        fs, root = fsspec.core.url_to_fs(staging)
        fs.makedirs(root, exist_ok=True)
        compute(*export_graph(ds, variable, staging), label="export")
