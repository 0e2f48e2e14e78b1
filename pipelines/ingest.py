"""Ingest: image folders -> one Zarr store in the ragged pixel layout.

Every image is probed first (headers only), so mismatched sizes, unsupported formats and missing
files are reported before anything is written. Pixels are then decoded by one task per image and
assembled into Zarr chunks; each chunk is written by exactly one task, so no two tasks ever write
the same chunk. The store is staged and moved into place only when complete.
"""

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import dask
import dask.array as da
import numpy as np
import xarray as xr

import ensir_flow
from ensir_flow import schema
from ensir_flow.errors import InputError, TransientError
from ensir_flow.images import GROUND_TRUTH_DIR, INPUT_DIR, Corpus, ImageInfo, discover_corpus, file_sha256, probe_image, read_image

from .plan import Plan
from .chunks import ranges_of, task_argument
from .storage import (COMPLETE, commit_resumable, committed_append, exclusive_lock, exists, open_array_for_writing, open_store,
                      refuse_existing, refuse_or_recover, resumable_location, resumable_marks, start_resumable,
                      write_chunk_then_mark)


def _roles(corpus: Corpus) -> list[tuple[str, list]]:
    """(folder name, files in stem order) in pixel-plane order: each model, ground truth, inputs."""
    roles = [(m, corpus.predictions[m]) for m in corpus.models]
    roles += [(name, files) for name, files in ((GROUND_TRUTH_DIR, corpus.ground_truth), (INPUT_DIR, corpus.inputs))
              if files is not None]
    return roles


def probe_corpus(corpus: Corpus) -> list[ImageInfo]:
    """One ImageInfo per stem, after checking that the models and ground truth agree on it."""
    roles = _roles(replace(corpus, inputs=None))
    paths = [path for _, files in roles for path in files]
    with ThreadPoolExecutor(max_workers=8) as pool:
        infos = dict(zip(paths, pool.map(probe_image, paths)))
    per_stem = []
    for i, stem in enumerate(corpus.stems):
        _, first_files = roles[0]
        expected = infos[first_files[i]]
        for role, files in roles[1:]:
            got = infos[files[i]]
            if got != expected:
                raise InputError(
                    f"{files[i]}: {got.height}x{got.width}x{got.channels} differs from "
                    f"{first_files[i]} ({expected.height}x{expected.width}x{expected.channels})"
                )
        per_stem.append(expected)
    channels = {info.channels for info in per_stem}
    if len(channels) > 1:
        gray = next(corpus.stems[i] for i, info in enumerate(per_stem) if info.channels == 1)
        raise InputError(f"{corpus.root}: corpus mixes grayscale (e.g. '{gray}') and colour images; convert them to one kind first")
    return per_stem


def inputs_match(corpus: Corpus, infos: list[ImageInfo]) -> bool:
    """Whether every input (lq/) has its outputs' size and channels, so it fits the pixel layout
    (super-resolution inputs do not)."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(probe_image, corpus.inputs)) == infos


def storable_inputs(corpus: Corpus, infos: list[ImageInfo]) -> tuple[Corpus, dict]:
    """The corpus with its inputs kept only if they fit, and an attribute saying why not."""
    if corpus.inputs is None or inputs_match(corpus, infos):
        return corpus, {}
    return replace(corpus, inputs=None), {"input": "lq/ not stored: its images differ in size or channels from the outputs"}


def source_provenance(corpus: Corpus) -> xr.Dataset:
    """Per image and source folder: the file name and the SHA-256 of its bytes."""
    roles = _roles(corpus)
    with ThreadPoolExecutor(max_workers=8) as pool:
        digests = [list(pool.map(file_sha256, files)) for _, files in roles]
    names = [[path.name for path in files] for _, files in roles]
    dims = ("source", "image")
    return xr.Dataset(
        {"source_file": (dims, np.array(names, dtype=object)), "source_sha256": (dims, np.array(digests, dtype=object))},
        coords={"source": np.array([name for name, _ in roles], dtype=object), "image": np.array(corpus.stems, dtype=object)},
    )


def _read_image_planes(paths: list, info: ImageInfo) -> np.ndarray:
    """Pixels (roles, H*W, C) of one image: each role's file decoded once."""
    return np.stack([read_image(path, info).reshape(-1, info.channels) for path in paths])


def _pixel_planes(corpus: Corpus, infos: list[ImageInfo], chunk_pixels: int, first_chunk: int | None = None) -> da.Array:
    """Lazy (roles, pixel, channel) array in Zarr chunks: models in order, then ground truth and
    inputs if any. One task decodes one image (all roles); see `chunked_planes`."""
    role_files = [files for _, files in _roles(corpus)]
    blocks = [
        da.from_delayed(dask.delayed(_read_image_planes, pure=True)([files[i] for files in role_files], info),
                        shape=(len(role_files), info.height * info.width, info.channels), dtype=np.uint8)
        for i, info in enumerate(infos)
    ]
    return chunked_planes(blocks, chunk_pixels, first_chunk)


def chunked_planes(blocks: list[da.Array], chunk_pixels: int, first_chunk: int | None = None) -> da.Array:
    """Per-image blocks (roles, H*W, C) back to back on the pixel axis, in the store's chunks.

    Dask's rechunk assembles each pixel chunk from the blocks it spans, so each image is computed
    (decoded, predicted) once and each chunk written by exactly one task. `first_chunk` shortens
    the first chunk so that an append fills the store's last partial chunk.
    """
    planes = da.concatenate(blocks, axis=1)
    total = planes.shape[1]
    head = min(first_chunk or chunk_pixels, total)
    lengths = (head, *schema.pixel_chunks(total - head, chunk_pixels)) if head else schema.pixel_chunks(total, chunk_pixels)
    return planes.rechunk({0: -1, 1: lengths, 2: -1})


def _write_chunk(block: np.ndarray, n_models: int, arrays: list, marks, index: int, start: int, stop: int) -> None:
    """One task: the decoded planes of chunk `index` (roles, pixels, channels) into the prediction
    array and the ground truth and input arrays there are, then the chunk's mark."""
    planes = [block[:n_models], *block[n_models:]]
    write_chunk_then_mark(list(zip(arrays, planes)), marks, index, start, stop)


def _extra_planes(corpus: Corpus, planes: da.Array) -> list[tuple[str, da.Array]]:
    """(variable, plane) of the ground truth and inputs, in the order `_roles` stacks them."""
    names = [name for name, files in ((schema.GROUND_TRUTH, corpus.ground_truth), (schema.INPUT, corpus.inputs)) if files is not None]
    return [(name, planes[len(corpus.models) + i]) for i, name in enumerate(names)]


@dataclass
class IngestResult:
    """What an ingest did: `written`, `resumed` (a killed run finished) or `unchanged` (the store
    already held exactly this ingest)."""

    dataset: xr.Dataset
    status: str
    chunks_total: int = 0
    chunks_written: int = 0


#: The attributes that say what a store was written from and how (with its sources' SHA-256s).
WRITE_KEYS = ("models", "source", "chunk_pixels", "compression", "channels")


def holds(store: str, planned: xr.Dataset, keys: tuple[str, ...] = WRITE_KEYS) -> bool:
    """Whether the existing `store` is what writing `planned` would write (by the provenance `keys`)."""
    try:
        existing = open_store(store)
    except InputError:
        return False
    return (all(existing.attrs.get(key) == planned.attrs.get(key) for key in keys)
            and "source_sha256" in existing and "appended" not in existing.attrs
            and existing["image"].values.tolist() == planned["image"].values.tolist()
            and existing["source_sha256"].values.tolist() == planned["source_sha256"].values.tolist())


def plan_ingest(source, store: str, models: list[str] | None = None,
                chunk_pixels: int = schema.DEFAULT_CHUNK_PIXELS, overwrite: bool = False,
                compression: str = schema.DEFAULT_COMPRESSION) -> Plan:
    """Plan the ingest of the corpus folder `source` into the Zarr store `store`, its pixel arrays
    compressed with `compression` (a name of `schema.COMPRESSORS`).

    Without `overwrite`, a store that already holds exactly this ingest (same source files by
    SHA-256, models, chunking and compression: e.g. a run killed after its commit) is left as it
    is (status 'unchanged'); any other existing store is refused.

    The run is resumable: chunks go to a fixed staging location beside `store`, each followed by
    its completion mark (`storage.start_resumable`), so the same command after a kill decodes and
    writes only the missing chunks (status 'resumed'); the marks are dropped when the complete
    store is moved into place.
    """
    corpus = discover_corpus(source, models)
    infos = probe_corpus(corpus)
    corpus, input_note = storable_inputs(corpus, infos)
    index = schema.ImageIndex(corpus.stems, np.array([i.height for i in infos]), np.array([i.width for i in infos]))
    planes = _pixel_planes(corpus, infos, chunk_pixels)
    n_models, channels = len(corpus.models), infos[0].channels
    attrs = schema.store_attributes(corpus.models, channels, created_by=f"ensir-flow {ensir_flow.__version__} ingest",
                                    source=str(source), chunk_pixels=int(chunk_pixels), compression=compression, **input_note)
    extra_names = [name for name, _ in _extra_planes(corpus, planes)]
    ds, encoding = pixel_store(index, corpus.models, planes, extra_names, chunk_pixels, compression, attrs,
                               source_provenance(corpus))
    unchanged = not overwrite and exists(store) and holds(store, ds)
    if not unchanged:
        refuse_existing(store, overwrite)
    details = {
        "source": str(source), "store": str(store), "models": ", ".join(corpus.models),
        "ground truth": "yes" if corpus.ground_truth is not None else "no",
        "inputs (lq/)": "stored" if corpus.inputs is not None else input_note.get("input", "none"),
        "images": len(corpus.stems), "pixels": f"{index.n_pixels:,} x {channels} channels",
        "tasks": f"{len(corpus.stems)} image reads, {planes.numblocks[1]} chunks of {chunk_pixels:,} pixels (one write each)",
        "compression": compression,
    }
    return Plan(f"ingest {len(corpus.stems)} images of {n_models} models", details,
                store_writer(store, ds, encoding, planes, extra_names, overwrite, unchanged, "ingest"))


def pixel_store(index: schema.ImageIndex, models: list[str], planes: da.Array, extra_names: list[str], chunk_pixels: int,
                compression: str, attrs: dict, provenance: xr.Dataset) -> tuple[xr.Dataset, dict]:
    """The dataset and Zarr encoding of a new pixel store: the image index, `planes` (roles, pixel,
    channel: one per model, then one per name of `extra_names`), `attrs`, the per-source
    `provenance` and the digest of its SHA-256s."""
    n_models, channels = len(models), planes.shape[2]
    ds = index.to_dataset()
    ds[schema.PREDICTION] = (("model", "pixel", "channel"), planes[:n_models])
    encoding = {schema.PREDICTION: schema.pixel_encoding((n_models, chunk_pixels, channels), compression)}
    for i, name in enumerate(extra_names):
        ds[name] = (("pixel", "channel"), planes[n_models + i])
        encoding[name] = schema.pixel_encoding((chunk_pixels, channels), compression)
    ds = ds.assign_coords(model=np.array(models, dtype=object))
    ds.attrs = attrs
    ds = schema.annotate(ds.merge(provenance))
    ds.attrs["source_digest"] = hashlib.sha256(" ".join(ds["source_sha256"].values.ravel()).encode()).hexdigest()
    return ds, encoding


def store_writer(store: str, ds: xr.Dataset, encoding: dict, planes: da.Array, extra_names: list[str], overwrite: bool,
                 unchanged: bool, label: str):
    """execute(compute) writing the store `ds` (from `pixel_store`) resumably: chunks go to a fixed
    staging location beside `store`, each followed by its completion mark, and the store is moved
    into place when complete; a run killed half-way is resumed by the same command. Returns an
    IngestResult (`unchanged` when told so)."""
    n_models = ds.sizes["model"]
    ranges = ranges_of(planes.chunks[1])
    blocks = planes.to_delayed().ravel()

    def execute(compute):
        if unchanged:
            return IngestResult(ds, "unchanged")
        with exclusive_lock(store):
            refuse_or_recover(store, overwrite)
            done = resumable_marks(store, ds.attrs)
            resuming = done is not None
            if resuming:
                staging = resumable_location(store)
            else:
                staging = start_resumable(store, ds, encoding, len(ranges))  # pixels written below
                done = np.zeros(len(ranges), dtype=bool)
            arrays = [task_argument(open_array_for_writing(staging, name)) for name in (schema.PREDICTION, *extra_names)]
            marks = task_argument(open_array_for_writing(staging, COMPLETE))
            todo = np.flatnonzero(~done)
            compute(*[dask.delayed(_write_chunk)(blocks[i], n_models, arrays, marks, int(i), *ranges[i]) for i in todo],
                    label=f"{label} ({len(todo)} of {len(ranges)} chunks)" if resuming else label)
            commit_resumable(store, keep_marks=False)
        return IngestResult(ds, "resumed" if resuming else "written", len(ranges), len(todo))

    return execute



def _refuse_changed_sources(corpus: Corpus, existing: xr.Dataset, store: str) -> None:
    """Refuse an append whose source folder holds an image the store already has with other
    content (SHA-256 of the file's bytes): skipping it would leave the store silently stale."""
    if "source_sha256" not in existing:
        return
    recorded = existing["source_sha256"].to_pandas()  # (source, image)
    changed = []
    for role, files in _roles(corpus):
        if role not in recorded.index:
            continue
        known = [(stem, path) for stem, path in zip(corpus.stems, files) if stem in recorded.columns]
        with ThreadPoolExecutor(max_workers=8) as pool:
            digests = list(pool.map(file_sha256, [path for _, path in known]))
        changed += [f"{role}/{path.name}" for (stem, path), digest in zip(known, digests) if digest != recorded.at[role, stem]]
    if changed:
        raise InputError(f"{corpus.root}: {len(changed)} image(s) already in {store} have changed ({', '.join(changed[:5])}"
                         f"{', ...' if len(changed) > 5 else ''}); --append adds new images only: re-ingest the corpus with "
                         "--overwrite to rebuild the store")


def plan_append(source, store: str, models: list[str] | None = None) -> Plan:
    """Plan adding the images of `source` whose stems `store` lacks (same models, channels, ground truth).

    The store is locked during the append, which follows `storage.committed_append`: until its
    single final metadata write, every reader sees the store as it was. A store that does not exist
    yet is created by a plain ingest (default chunks and compression), so a scheduled job runs the
    same command from its first night on.
    """
    if not exists(store):
        first = plan_ingest(source, store, models)
        return Plan(f"append to a new store: {first.title}", first.details,
                    lambda compute: first.run(compute).dataset.sizes["image"])
    existing = open_store(store)
    store_models = schema.check_store(existing, store)
    if models is not None and list(models) != store_models:
        raise InputError(f"{store}: models {list(models)} differ from the store's {store_models} (order matters)")
    folders = discover_corpus(source).models
    if sorted(folders) != sorted(store_models):
        extra, missing = sorted(set(folders) - set(store_models)), sorted(set(store_models) - set(folders))
        raise InputError(f"{source}: model folders differ from the store's models"
                         + (f"; not in the store: {', '.join(extra)}" if extra else "")
                         + (f"; missing here: {', '.join(missing)}" if missing else ""))
    corpus = discover_corpus(source, store_models)
    has_truth = schema.GROUND_TRUTH in existing
    if (corpus.ground_truth is not None) != has_truth:
        raise InputError(f"{source}: {'has' if corpus.ground_truth is not None else 'lacks'} gt/ but the store "
                         f"{'has' if has_truth else 'has no'} ground truth")
    known = {str(stem) for stem in existing["image"].values}
    _refuse_changed_sources(corpus, existing, store)
    keep = [i for i, stem in enumerate(corpus.stems) if stem not in known]
    skipped = len(corpus.stems) - len(keep)
    pick = lambda files: None if files is None else [files[i] for i in keep]  # noqa: E731
    corpus = Corpus(corpus.root, corpus.models, pick(corpus.stems), {m: pick(f) for m, f in corpus.predictions.items()},
                    pick(corpus.ground_truth), pick(corpus.inputs))
    details = {"source": str(source), "store": str(store), "new images": len(keep), "already in the store (skipped)": skipped}
    if not keep:
        return Plan("append: nothing new", details, lambda compute: 0)
    infos = probe_corpus(corpus)
    if schema.INPUT not in existing:
        corpus = replace(corpus, inputs=None)
    elif corpus.inputs is None or not inputs_match(corpus, infos):
        raise InputError(f"{source}: the store holds inputs, so lq/ must hold every new image at its outputs' size")
    if infos[0].channels != existing.sizes["channel"]:
        raise InputError(f"{source}: images have {infos[0].channels} channel(s), the store {existing.sizes['channel']}")
    chunk_pixels = existing[schema.PREDICTION].encoding["chunks"][1]
    n_existing = existing.sizes["pixel"]
    planes = _pixel_planes(corpus, infos, chunk_pixels, first_chunk=chunk_pixels - n_existing % chunk_pixels)
    n_models = len(store_models)
    new_planes = {schema.PREDICTION: planes[:n_models], **dict(_extra_planes(corpus, planes))}
    index = schema.ImageIndex(corpus.stems, np.array([i.height for i in infos]), np.array([i.width for i in infos]))
    return append_plan(f"append {len(keep)} images to {store}", source, store, existing, corpus, index, new_planes, details,
                       "ingest --append")


def append_plan(title: str, source, store: str, existing: xr.Dataset, corpus: Corpus, index: schema.ImageIndex,
                new_planes: dict[str, da.Array], details: dict, by: str) -> Plan:
    """The plan appending the images of `corpus` (their `index`, and `new_planes`: variable -> lazy
    planes in the store's chunks, the first one filling its last partial chunk) to the `existing`
    store, with their sources' provenance, recorded in the `appended` attribute as made `by`.

    The store is locked during the append, which follows `storage.committed_append`: until its
    single final metadata write, every reader sees the store as it was."""
    n_existing, n_known = existing.sizes["pixel"], existing.sizes["image"]
    images = index.to_dataset().merge(source_provenance(corpus))
    if images["source"].values.tolist() != existing["source"].values.tolist():
        raise InputError(f"{source}: source folders {images['source'].values.tolist()} differ from the store's "
                         f"{existing['source'].values.tolist()}")
    images["pixel_offset"] = images["pixel_offset"] + n_existing
    image_values = {name: images[name].values for name in (*schema.IMAGE_VARIABLES, "image", "source_file", "source_sha256")}
    attrs = dict(existing.attrs)
    attrs["appended"] = [*attrs.get("appended", []), {"source": str(source), "images": len(index.stems),
                                                       "by": f"ensir-flow {ensir_flow.__version__} {by}"}]
    committed = {"pixel": n_existing, "image": n_known}
    grown = {"pixel": n_existing + index.n_pixels, "image": n_known + len(index.stems)}
    details["pixels"] = f"{index.n_pixels:,} appended to {n_existing:,}"

    def execute(compute):
        def write_pixels(arrays):  # each new plane into its array, past the committed pixels
            region = slice(n_existing, grown["pixel"])
            names = list(new_planes)
            compute(da.store([new_planes[name] for name in names], [arrays[name] for name in names],
                             regions=[(slice(None),) * (arrays[name].ndim - 2) + (region, slice(None)) for name in names],
                             lock=False, compute=False), label="append")

        with exclusive_lock(store):
            if open_store(store).sizes != existing.sizes:
                raise TransientError(f"{store}: changed by another run while this one was planned; run it again")
            committed_append(store, committed, grown, write_pixels, image_values, attrs)
        return len(index.stems)

    return Plan(title, details, execute)
