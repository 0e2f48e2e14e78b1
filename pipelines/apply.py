"""Apply: blend a store's predictions with a LUT chunk by chunk into a new store (and export it)."""

import functools
from dataclasses import dataclass, replace

import dask
import dask.array as da
import numpy as np
import xarray as xr
import zarr

import ensir_flow
from ensir_flow import schema
from ensir_flow.blend import blend
from ensir_flow.errors import InputError, TransientError
from ensir_flow.images import DEFAULT_PNG_COMPRESSION
from ensir_flow.solvers import REGISTRY

from .chunks import (
    CHUNK_TASKS,
    PixelSource,
    chunk_runs,
    chunk_spans,
    graph_tasks,
    pixel_array,
    ranges_of,
    read_pixels,
    task_argument,
)
from .commit import exists, refuse_existing, refuse_or_recover
from .export import check_export_target, export, export_stages
from .fingerprint import store_fingerprint
from .integrity import CHUNK_CHECKSUMS, checksum_template, refuse_changed, store_identity
from .locks import exclusive_lock
from .lut_io import read_lut
from .per_image import blend_image_spans, image_weights_graph, image_weights_tasks
from .plan import Plan, Stage
from .resumable import (
    COMPLETE,
    ArraysToWrite,
    commit_resumable,
    committed_append,
    resumable_location,
    resumable_marks,
    staged_marks,
    start_resumable,
    write_chunk_then_mark,
)
from .stores import open_store

#: Attribute of apply's staging: staging written without chunk checksums (an older version) is not resumed.
RESUME_PROTOCOL = {"resume_protocol": "chunk_complete and chunk_xxh3 per chunk"}


@dataclass
class ApplyResult:
    """What an apply run did: `written` (from scratch), `resumed`, `updated` (new images of a grown
    store added) or `unchanged` (already complete)."""

    output: xr.Dataset
    status: str
    chunks_total: int
    chunks_computed: int
    images_added: int = 0


def _blend_run_into(combine, shared: list, predictions, starts, stops, outputs: ArraysToWrite, indices) -> None:
    """One task: for each chunk `indices[i]` (pixels `starts[i]`:`stops[i]`) in turn, read it from
    the array of predictions, combine it (`combine(pixels, *shared)`; a list: a function per
    chunk), write the result to its own chunk of the array of ensembles, its checksum (where the
    output has them: one updated in its own older layout may not) and mark it complete
    (`outputs`: those three arrays, opened here). A task holds one chunk, and a killed task leaves
    the chunks it finished marked."""
    ensemble, marks, checksums = outputs.open()
    for i, (index, start, stop) in enumerate(zip(indices.tolist(), starts.tolist(), stops.tolist())):
        chunk_combine = combine[i] if isinstance(combine, list) else combine
        pixels = chunk_combine(read_pixels(predictions, start, stop), *shared)
        write_chunk_then_mark([(ensemble, pixels)], marks, index, start, stop, checksums=checksums)


@dataclass
class BlendGraph:
    """How apply's tasks are built for a set of chunks: each reads its chunks' predictions (a
    `PixelSource` in the LUT's model order), blends them with the LUT's lookup table (or, for a
    per-image solver, with the images' weights, gathered by `per_image.image_weights_graph` in
    the same graph) and writes them into `outputs`."""

    predictions: PixelSource
    chunk_lengths: np.ndarray
    bytes_per_pixel: int
    bin_width: int
    device: str
    lookup: object = None  # the LUT's lookup table; None for a per-image solver
    image_weights: object = None  # a per-image solver's `Solver.image_weights`
    dataset: xr.Dataset | None = None  # the store, for a per-image solver's weights

    def tasks(self, todo: np.ndarray, outputs: ArraysToWrite) -> list:
        """The tasks computing chunks `todo` into `outputs`, one per run of consecutive chunks
        (`chunks.chunk_runs`)."""
        if not len(todo):
            return []
        stops = np.cumsum(self.chunk_lengths, dtype=np.int64)
        starts = stops - self.chunk_lengths
        predictions, written = task_argument(self.predictions), task_argument(outputs)
        arguments = [predictions, written]
        runs = chunk_runs(self.chunk_lengths[todo], self.bytes_per_pixel)
        if self.image_weights is not None:
            ranges = ranges_of(self.chunk_lengths)
            index = schema.ImageIndex.from_dataset(self.dataset)
            spans = chunk_spans(index.offsets, index.counts, np.arange(len(index.stems)), tuple(self.chunk_lengths))
            weights = image_weights_graph(self.image_weights, predictions, ranges, spans, self.dataset)
            combines = [[functools.partial(blend_image_spans, spans[i]) for i in todo[run.start : run.stop]] for run in runs]
        else:
            weights = dask.delayed(self.lookup, pure=True)  # one graph key: sent once to each worker
            combines = [blend] * len(runs)
        arguments.append(weights)
        shared = [weights.key] if self.image_weights is not None else [weights.key, self.bin_width, self.device]
        tasks = []
        for run, combine in zip(runs, combines):
            indices = np.asarray(todo[run.start : run.stop], dtype=np.int64)
            tasks.append(
                (_blend_run_into, combine, shared, predictions.key, starts[indices], stops[indices], written.key, indices)
            )
        return graph_tasks("blend", tasks, arguments, apart=True)


def _compute_blend(arrays: dict, tasks: list, compute, label: str, check) -> None:
    """`resumable.committed_append`'s writer: compute the blend `tasks` (which open the arrays they
    write themselves, not the `arrays` it passes), then `check()` what was read."""
    compute(*tasks, label=label)
    check()


def _where_written(output: str, outputs: ArraysToWrite) -> str:
    """Where a run writes the chunks of `output`, in the words of `--dry-run`."""
    if outputs.location == str(output):
        return f"written in place under {output}, resumable, committed by one write of its root metadata"
    return f"resumable from {outputs.location}"


def _output_arrays(output: str) -> ArraysToWrite:
    """The arrays an update of the apply output at `output` writes: its ensembles, marks and, if
    it has them (one written in an older layout may not), chunk checksums."""
    names = set(zarr.open_group(str(output), mode="r", use_consolidated=False).array_keys())
    return ArraysToWrite(str(output), (schema.ENSEMBLE, COMPLETE, CHUNK_CHECKSUMS if CHUNK_CHECKSUMS in names else None))


def plan_apply(
    store: str,
    lut_path: str,
    output: str,
    export_dir: str | None = None,
    overwrite: bool = False,
    device: str = "auto",
    compression: str = schema.DEFAULT_COMPRESSION,
    png_compression: int = DEFAULT_PNG_COMPRESSION,
) -> Plan:
    """Plan blending every image of `store` with the LUT into the store `output`.

    The run is resumable: chunks are written into a fixed staging location beside `output`, each
    followed by its mark in the `chunk_complete` array, so a run that was killed is finished by
    running the same command again (only unmarked chunks are computed). The finished store is moved
    into place; re-running a finished job is a no-op. A lock beside `output` keeps a second run
    away. `device` is where the blend tasks run ('auto': each worker's GPU if it has one);
    `compression` names the compressor of `ensemble` (`schema.COMPRESSORS`); `png_compression` is
    the zlib level (0-9) of the exported PNGs.

    When `output` was made with the same LUT from an earlier state of `store` that `ingest
    --append` has since grown, it is updated in place instead (no `overwrite` needed): only the
    chunks from the output's last one on are computed and appended by `resumable.committed_append`
    (a killed update leaves the output as it was; re-running redoes it), and `export_dir`, if it
    exists, gets the new images only. The result is the same bytes as a fresh apply.
    """
    planned_store = store_identity(store)
    ds = open_store(store)
    models = schema.check_store(ds, store)
    lut = read_lut(lut_path)
    model_order = lut.model_order(models, ds.sizes["channel"], str(lut_path))
    bin_width, solver = lut.bin_width, lut.solver
    image_weights = REGISTRY[solver].image_weights  # a per-image solver's (zzpm); None: blend by the LUT
    provenance = {
        "source": str(store),
        "source_fingerprint": store_fingerprint(ds),
        "source_images": ds.sizes["image"],
        "lut": str(lut_path),
        "lut_sha256": lut.digest(),
        **({"source_store_id": ds.attrs["store_id"]} if "store_id" in ds.attrs else {}),
    }
    previous = _attributes(output) if exists(output) else {}
    finished = _matches(previous, provenance)
    grown_from = None if finished or overwrite else _grown_from(previous, provenance, ds)
    if not finished and grown_from is None:
        refuse_existing(output, overwrite)
    stems = schema.ImageIndex.from_dataset(ds).stems
    update_export = export_dir is not None and grown_from is not None and exists(export_dir)
    if update_export:
        check_export_target(export_dir, stems[:grown_from], overwrite=True, source=store)
    elif export_dir is not None and not (finished and exists(export_dir)):
        check_export_target(export_dir, stems, overwrite, source=store)
    chunk_pixels = ds[schema.PREDICTION].encoding["chunks"][1]  # the store's; the output's ensemble is chunked alike
    chunk_lengths = ds[schema.PREDICTION].data.chunks[1]
    out = ds[list(schema.IMAGE_VARIABLES)].load()  # written with the template; `ensemble` by the tasks
    # The arrays the tasks write, as one dask chunk each (the encoding gives their Zarr chunks): the
    # template is never computed, and a dask chunk per Zarr chunk made writing it a task per chunk.
    out[schema.ENSEMBLE] = (
        ("pixel", "channel"),
        da.zeros((ds.sizes["pixel"], ds.sizes["channel"]), dtype=np.uint8, chunks=-1),
    )
    checksum_dims, checksum_data, checksum_attrs = checksum_template(len(chunk_lengths), [schema.ENSEMBLE])
    out[CHUNK_CHECKSUMS] = (checksum_dims, da.zeros(checksum_data.shape, dtype=checksum_data.dtype, chunks=-1), checksum_attrs)
    out.attrs = schema.store_attributes(
        models,
        ds.sizes["channel"],
        created_by=f"ensir-flow {ensir_flow.__version__} apply",
        bin_width=bin_width,
        solver=solver,
        **provenance,
        **RESUME_PROTOCOL,
    )
    out = schema.annotate(out)
    encoding = {
        schema.ENSEMBLE: schema.pixel_encoding((chunk_pixels, ds.sizes["channel"]), compression),
        CHUNK_CHECKSUMS: {"chunks": (1, 1)},  # a row per chunk, written by its task
    }
    if finished:
        todo, outputs = np.arange(0), None
    elif grown_from is not None:
        todo = np.arange(int(schema.ImageIndex.from_dataset(ds).offsets[grown_from]) // chunk_pixels, len(chunk_lengths))
        outputs = _output_arrays(output)
    else:
        marks = staged_marks(output, {**provenance, **RESUME_PROTOCOL})
        todo = np.arange(len(chunk_lengths)) if marks is None else np.flatnonzero(~marks)
        outputs = ArraysToWrite(resumable_location(output), (schema.ENSEMBLE, COMPLETE, CHUNK_CHECKSUMS))
    graph = BlendGraph(
        pixel_array(store, schema.PREDICTION, model_order),  # in the LUT's order
        np.asarray(chunk_lengths, dtype=np.int64),
        ds.sizes["model"] * ds.sizes["channel"],
        bin_width,
        device,
        # the lookup table alone: the LUT's counts, statuses and digits (140 MB at K = 16 on 10 Mpx) are let go
        lookup=None if image_weights is not None or not len(todo) else lut.lookup_table(),
        image_weights=image_weights,
        dataset=ds,
    )
    del lut
    planned_tasks = graph.tasks(todo, outputs)

    def update(compute) -> ApplyResult:
        with exclusive_lock(output):
            old = open_store(output)
            if _matches(dict(old.attrs), provenance):  # another run updated it meanwhile
                return ApplyResult(old, "unchanged", len(chunk_lengths), 0)
            if old.sizes["image"] != grown_from:
                raise TransientError(f"{output}: changed by another run while this one was planned; run it again")
            first = old.sizes["pixel"] // chunk_pixels  # the output's last chunk, if partial, is redone whole
            now = np.arange(first, len(chunk_lengths))
            committed_append(
                output,
                {"pixel": old.sizes["pixel"], "image": grown_from, "chunk": old.sizes["chunk"]},
                {"pixel": ds.sizes["pixel"], "image": ds.sizes["image"], "chunk": len(chunk_lengths)},
                functools.partial(
                    _compute_blend,
                    tasks=planned_tasks if np.array_equal(now, todo) else graph.tasks(now, outputs),
                    compute=compute,
                    label=f"apply ({len(now)} of {len(chunk_lengths)} chunks: new images)",
                    check=functools.partial(refuse_changed, store, planned_store),
                ),
                {name: out[name].values[grown_from:] for name in (*schema.IMAGE_VARIABLES, "image")},
                out.attrs,
            )
        if update_export:
            export(output, export_dir, compute, first_image=grown_from, compression=png_compression)
        elif export_dir is not None:
            export(output, export_dir, compute, overwrite, compression=png_compression)
        return ApplyResult(open_store(output), "updated", len(chunk_lengths), len(now), ds.sizes["image"] - grown_from)

    def execute(compute):
        if grown_from is not None:
            return update(compute)
        if finished:
            if export_dir is not None and not exists(export_dir):
                export(output, export_dir, compute, overwrite, compression=png_compression)
            return ApplyResult(open_store(output), "unchanged", len(chunk_lengths), 0)
        with exclusive_lock(output):
            if exists(output) and _matches(_attributes(output), provenance):  # another run made it meanwhile
                return ApplyResult(open_store(output), "unchanged", len(chunk_lengths), 0)
            refuse_or_recover(output, overwrite)  # one that appeared since the plan is not replaced unasked
            done = resumable_marks(output, {**provenance, **RESUME_PROTOCOL})
            resuming = done is not None
            if resuming:
                location = resumable_location(output)
            else:
                location = start_resumable(output, out, encoding, len(chunk_lengths))  # `ensemble`: by the tasks
                done = np.zeros(len(chunk_lengths), dtype=bool)
            # what and where the plan saw, unless another run went on meanwhile (or, on object
            # storage, a store appeared at the target: then the staging is beside it, not in place)
            now, writes = np.flatnonzero(~done), replace(outputs, location=location)
            tasks = planned_tasks if writes == outputs and np.array_equal(now, todo) else graph.tasks(now, writes)
            compute(*tasks, label=f"apply ({len(now)} of {len(done)} chunks)" if resuming else "apply")
            refuse_changed(store, planned_store)
            commit_resumable(output)
        if export_dir is not None:
            export(output, export_dir, compute, overwrite, compression=png_compression)
        return ApplyResult(open_store(output), "resumed" if resuming else "written", len(done), len(now))

    details = {
        "store": str(store),
        "LUT": f"{lut_path} ({solver}, bin width {bin_width})",
        "output": str(output),
        "images": ds.sizes["image"],
        "pixels": f"{ds.sizes['pixel']:,}",
        "tasks": "none: the output is already complete"
        if finished
        else f"an update: the chunks of {ds.sizes['image'] - grown_from} new image(s), appended to {output}"
        if grown_from is not None
        else f"{len(chunk_lengths):,} chunk(s), each read, blended and written by a task (by runs of consecutive chunks "
        f"past {CHUNK_TASKS:,} chunks), on {device} ({_where_written(output, outputs)})",
        "compression": compression,
    }
    if export_dir is not None:
        details["export"] = f"{export_dir} (one PNG per image)"
    stages = _apply_stages(np.asarray(chunk_lengths), todo, ds.sizes["channel"], len(models), image_weights is not None)
    if export_dir is not None and not (finished and exists(export_dir)):
        stages += export_stages(out, schema.ENSEMBLE, grown_from if update_export else 0)
    return Plan(f"apply a LUT to {ds.sizes['image']} images", details, execute, stages=stages)


def _apply_stages(chunk_lengths: np.ndarray, todo: np.ndarray, n_channels: int, n_models: int, per_image: bool) -> list[Stage]:
    """What apply will run to compute the chunks `todo` of a store whose pixel chunks are
    `chunk_lengths` long: a per-image solver first reads every chunk for its images' weights
    (`per_image.image_weights_graph`); then a task per run of chunks (`chunks.chunk_runs`: a chunk each on
    a store of few chunks) reads their predictions, blends them and writes the ensemble."""
    if not len(todo):
        return []
    pixels = int(chunk_lengths[todo].sum())
    stages = []
    if per_image:
        stages.append(
            Stage(
                "per-image weights",
                image_weights_tasks(chunk_lengths, n_models, n_channels),
                len(chunk_lengths),
                int(chunk_lengths.sum()) * n_channels * n_models,
            )
        )
    tasks = len(chunk_runs(chunk_lengths[todo], n_models * n_channels))
    stages.append(Stage("blend and write", tasks, len(todo), pixels * n_channels * n_models, pixels * n_channels))
    return stages


def _attributes(path: str) -> dict:
    """A store's attributes; none for one that cannot be read (so it is treated as another run's output)."""
    try:
        return dict(open_store(path).attrs)
    except InputError:
        return {}


def _grown_from(previous: dict, provenance: dict, ds: xr.Dataset) -> int | None:
    """How many images the output with attributes `previous` holds, if it was made by this LUT from
    the first images of this store (which has since grown by appends); else None."""
    n_images = previous.get("source_images")
    same = all(previous.get(key) == provenance[key] for key in ("source", "lut", "lut_sha256"))
    if not same or not isinstance(n_images, int) or not 0 < n_images < ds.sizes["image"]:
        return None
    return n_images if previous.get("source_fingerprint") == store_fingerprint(ds, n_images) else None


def _matches(attrs: dict, provenance: dict) -> bool:
    """Whether a store was (or is being) made from the same inputs as this run."""
    return all(attrs.get(key) == value for key, value in provenance.items())
