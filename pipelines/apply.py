"""Apply: blend a store's predictions with a LUT chunk by chunk into a new store (and export it)."""

import hashlib
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np
import xarray as xr

import ensir_flow
from ensir_flow import schema
from ensir_flow.blend import blend
from ensir_flow.errors import InputError

from .chunks import chunk_ranges, chunk_spans, pixel_array, read_pixels, task_argument
from .export import check_export_target, export
from .plan import Plan
from .storage import (COMPLETE, commit_resumable, exclusive_lock, exists, open_array_for_writing, open_store, read_lut,
                      refuse_existing, resumable_location, resumable_marks, start_resumable, write_chunk_then_mark)
from .zzpm import zzpm_blend_jobs


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


def _blend_chunk_into(combine, arguments: tuple, predictions, start: int, stop: int, ensemble, marks, index: int) -> None:
    """One task: read chunk start:stop of the array of predictions, combine it, write the result
    to its own chunk of the array `ensemble` and mark it complete."""
    write_chunk_then_mark(combine(read_pixels(predictions, start, stop), *arguments), ensemble, marks, index, start, stop)


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
    lut = read_lut(lut_path)
    lut.check_matches(models, ds.sizes["channel"], str(lut_path))
    provenance = {"source": str(store), "source_fingerprint": store_fingerprint(ds), "lut": str(lut_path),
                  "lut_sha256": lut.digest()}
    finished = exists(output) and _matches(_attributes(output), provenance)
    if not finished:
        refuse_existing(output, overwrite)
    if export_dir is not None and not (finished and exists(export_dir)):
        check_export_target(export_dir, schema.ImageIndex.from_dataset(ds).stems, overwrite, source=store)
    chunk_lengths = ds[schema.PREDICTION].data.chunks[1]
    ranges = chunk_ranges(ds)
    out = ds[list(schema.IMAGE_VARIABLES)].load()  # written with the template; `ensemble` by the tasks
    out[schema.ENSEMBLE] = (("pixel", "channel"), da.zeros((ds.sizes["pixel"], ds.sizes["channel"]), dtype=np.uint8,
                                                           chunks=(chunk_lengths, -1)))
    out.attrs = schema.store_attributes(models, ds.sizes["channel"], created_by=f"ensir-flow {ensir_flow.__version__} apply",
                                        bin_width=lut.bin_width, solver=lut.solver, **provenance)
    encoding = {schema.ENSEMBLE: schema.pixel_encoding((chunk_lengths[0], ds.sizes["channel"]), compression)}
    spans = chunk_spans(schema.ImageIndex.from_dataset(ds), np.arange(ds.sizes["image"]), chunk_lengths)

    def execute(compute):
        if finished:
            if export_dir is not None and not exists(export_dir):
                export(output, export_dir, compute, overwrite)
            return ApplyResult(open_store(output), "unchanged", len(chunk_lengths), 0)
        with exclusive_lock(output):
            done = resumable_marks(output, provenance)
            resuming = done is not None
            if resuming:
                staging = resumable_location(output)
            else:
                staging = start_resumable(output, out, encoding, len(chunk_lengths))  # `ensemble` is written below
                done = np.zeros(len(chunk_lengths), dtype=bool)
            todo = np.flatnonzero(~done)
            predictions = task_argument(pixel_array(store, schema.PREDICTION))
            if lut.solver == "zzpm":  # per-image weights, gathered from the store first
                jobs = zzpm_blend_jobs(predictions, ranges, spans, ds, todo, compute)
            else:
                weights = dask.delayed(lut.weights, pure=True)
                jobs = [(blend, (weights, lut.bin_width, device)) for _ in todo]
            ensemble, marks = (task_argument(open_array_for_writing(staging, name)) for name in (schema.ENSEMBLE, COMPLETE))
            tasks = [dask.delayed(_blend_chunk_into)(combine, arguments, predictions, *ranges[i], ensemble, marks, int(i))
                     for i, (combine, arguments) in zip(todo, jobs)]
            compute(*tasks, label=f"apply ({len(tasks)} of {len(done)} chunks)" if resuming else "apply")
            commit_resumable(output)
        if export_dir is not None:
            export(output, export_dir, compute, overwrite)
        return ApplyResult(open_store(output), "resumed" if resuming else "written", len(done), len(tasks))

    details = {
        "store": str(store), "LUT": f"{lut_path} ({lut.solver}, bin width {lut.bin_width})", "output": str(output),
        "images": ds.sizes["image"], "pixels": f"{ds.sizes['pixel']:,}",
        "tasks": "none: the output is already complete" if finished else
                 f"{len(chunk_lengths)} chunks, one blend + write each, on {device} (resumable from {resumable_location(output)})",
        "compression": compression,
    }
    if export_dir is not None:
        details["export"] = f"{export_dir} (one PNG per image)"
    return Plan(f"apply a LUT to {ds.sizes['image']} images", details, execute)


def _attributes(path: str) -> dict:
    """A store's attributes; none for one that cannot be read (so it is treated as another run's output)."""
    try:
        return dict(open_store(path).attrs)
    except InputError:
        return {}


def _matches(attrs: dict, provenance: dict) -> bool:
    """Whether a store was (or is being) made from the same inputs as this run."""
    return all(attrs.get(key) == value for key, value in provenance.items())
