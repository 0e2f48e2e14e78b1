"""Ingest: image folders -> one Zarr store in the ragged pixel layout.

Every image is probed first (headers only), so mismatched sizes, unsupported formats and missing
files are reported before anything is written. Pixels are then decoded by one task per group of
consecutive images (at least a chunk's worth and `batches.BATCH_BYTES` of pixels, or one bigger image),
which reads each file once and hashes the same bytes; each chunk is assembled from the groups it
overlaps and written by exactly one task, so no two tasks ever write the same chunk, a big image
is decoded once for all the chunks it spans, and the tasks grow with the corpus's bytes, not its
number of images. The store is staged and moved into place only when complete.

Resuming without hashing up front: each chunk is written with a record of the SHA-256s of the
source files whose pixels it holds (`CHUNK_SOURCES`, before its completion mark). A resumed run
hashes again only the sources of the chunks already complete and redoes the chunks whose sources
changed; at commit the records become the store's `source_sha256` (refused if two chunks holding
one image saw different bytes of a file: a file changed during the run).
"""

import hashlib
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import dask.array as da
import numpy as np
import xarray as xr
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

import ensir_flow
from ensir_flow import schema
from ensir_flow.errors import InputError, TransientError
from ensir_flow.images import (
    GROUND_TRUTH_DIR,
    INPUT_DIR,
    Corpus,
    ImageInfo,
    discover_corpus,
    file_sha256,
    probe_image,
    read_image_and_sha256,
)

from . import batches
from .batches import consecutive_runs
from .chunks import chunk_spans, pixel_slice, ranges_of, task_argument
from .commit import exists, refuse_existing, refuse_or_recover
from .integrity import CHECKSUMMED_VARIABLES, CHUNK_CHECKSUMS, checksum_template, store_identity
from .locks import exclusive_lock
from .plan import Plan, Stage
from .resumable import (
    COMPLETE,
    ArraysToWrite,
    commit_resumable,
    committed_append,
    open_array_for_writing,
    record_checksums,
    resumable_location,
    resumable_marks,
    staged_marks,
    start_resumable,
    write_chunk_then_mark,
)
from .stores import open_store


def _roles(corpus: Corpus) -> list[tuple[str, list]]:
    """(folder name, files in stem order) in pixel-plane order: each model, ground truth, inputs."""
    roles = [(m, corpus.predictions[m]) for m in corpus.models]
    roles += [
        (name, files)
        for name, files in ((GROUND_TRUTH_DIR, corpus.ground_truth), (INPUT_DIR, corpus.inputs))
        if files is not None
    ]
    return roles


def probe_images(paths: list) -> list[ImageInfo]:
    """`probe_image` of each of `paths`, in order: on a few threads (which wait for a file system
    in parallel), each probing a slice of the paths, since a future per file costs as much as a
    probe."""
    size = max(1, -(-len(paths) // PROBE_SLICES))
    with ThreadPoolExecutor(max_workers=8) as pool:
        slices = pool.map(lambda start: [probe_image(path) for path in paths[start : start + size]], range(0, len(paths), size))
        return [info for probed in slices for info in probed]


#: How many slices `probe_images` cuts its paths into.
PROBE_SLICES = 32


def probe_corpus(corpus: Corpus) -> list[ImageInfo]:
    """One ImageInfo per stem, after checking that the models and ground truth agree on it."""
    roles = _roles(replace(corpus, inputs=None))
    paths = [path for _, files in roles for path in files]
    infos = dict(zip(paths, probe_images(paths)))
    per_stem = []
    for i in range(len(corpus.stems)):
        _, first_files = roles[0]
        expected = infos[first_files[i]]
        for _, files in roles[1:]:
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
        raise InputError(
            f"{corpus.root}: corpus mixes grayscale (e.g. '{gray}') and colour images; convert them to one kind first"
        )
    return per_stem


def inputs_match(corpus: Corpus, infos: list[ImageInfo]) -> bool:
    """Whether every input (lq/) has its outputs' size and channels, so it fits the pixel layout
    (super-resolution inputs do not)."""
    return probe_images(corpus.inputs) == infos


def storable_inputs(corpus: Corpus, infos: list[ImageInfo]) -> tuple[Corpus, dict]:
    """The corpus with its inputs kept only if they fit, and an attribute saying why not."""
    if corpus.inputs is None or inputs_match(corpus, infos):
        return corpus, {}
    return replace(corpus, inputs=None), {"input": "lq/ not stored: its images differ in size or channels from the outputs"}


def source_provenance(corpus: Corpus, hashed: bool = True) -> xr.Dataset:
    """Per image and source folder: the file name and the SHA-256 of its bytes (read here; left
    empty unless `hashed`, for a writer whose decoding tasks hash the files: see `store_writer`)."""
    roles = _roles(corpus)
    with ThreadPoolExecutor(max_workers=8) as pool:
        digests = [list(pool.map(file_sha256, files)) if hashed else [""] * len(files) for _, files in roles]
    names = [[path.name for path in files] for _, files in roles]
    dims = ("source", "image")
    return xr.Dataset(
        {"source_file": (dims, np.array(names, dtype=object)), "source_sha256": (dims, np.array(digests, dtype=object))},
        coords={"source": np.array([name for name, _ in roles], dtype=object), "image": np.array(corpus.stems, dtype=object)},
    )


@dataclass(frozen=True)
class PixelBlocks:
    """The planes (roles, pixel, channel) of images lying back to back on the pixel axis, computed
    in blocks of consecutive images: `graph` holds one task per block, keyed (`name`, block),
    that returns (its images' planes (roles, pixels, channels) back to back, the SHA-256 of their
    source files [source][image], or None where the plan hashed them); `firsts` is the first
    image of each block and `counts` its pixels.

    Each chunk of the store is then made by one task from the blocks it overlaps (`chunk_inputs`),
    and each block is computed once, however many chunks it spans. The tasks are written as
    graph layers, each task naming only the keys it reads: building them takes time linear in
    the blocks and chunks (a `dask.delayed` call on other Delayed objects takes milliseconds, and
    a chunk handed the whole array's graph made planning quadratic).
    """

    graph: HighLevelGraph
    name: str
    firsts: np.ndarray
    counts: np.ndarray
    n_roles: int
    channels: int

    @classmethod
    def of_tasks(cls, kind: str, tasks: list[tuple], firsts, counts, n_roles: int, channels: int) -> "PixelBlocks":
        """Blocks computed by `tasks` (dask's tuples: function, then arguments), a layer named for `kind`."""
        name = _layer_name(kind)
        graph = HighLevelGraph.from_collections(name, {(name, i): task for i, task in enumerate(tasks)})
        return cls(graph, name, np.asarray(firsts), np.asarray(counts), n_roles, channels)

    @property
    def n_blocks(self) -> int:
        return len(self.counts)

    def chunk_lengths(self, chunk_pixels: int, first_chunk: int | None = None) -> tuple[int, ...]:
        """Lengths along `pixel` of the chunks of these planes: `chunk_pixels` each, the last one
        shorter, and `first_chunk` the first one, so that an append fills the store's last
        partial chunk."""
        total = int(self.counts.sum())
        head = min(first_chunk or chunk_pixels, total)
        return (head, *schema.pixel_chunks(total - head, chunk_pixels)) if head else schema.pixel_chunks(total, chunk_pixels)

    def chunk_inputs(self, lengths) -> list[tuple[list, list[tuple[int, int, int, int]]]]:
        """Per chunk of `lengths`: the keys of the blocks it overlaps, and its pieces (block in
        that list, the block's pixels start:stop, where they start in the chunk)."""
        offsets = np.cumsum(self.counts) - self.counts
        inputs = []
        for (start, _), spans in zip(ranges_of(lengths), chunk_spans(offsets, self.counts, np.arange(self.n_blocks), lengths)):
            pieces = []
            for k, span in enumerate(spans):
                origin = int(start - offsets[span.label])  # the chunk's first pixel, in the block's pixels
                pieces.append((k, origin + span.start, origin + span.stop, span.start))
            inputs.append(([(self.name, span.label) for span in spans], pieces))
        return inputs

    def layer(self, name: str, tasks: dict, arguments: list = ()) -> HighLevelGraph:
        """The graph of the layer `name` of `tasks` ({key: dask's tuple}), which read the blocks by
        their keys and `arguments` (Delayed values, such as `chunks.task_argument`s) by theirs."""
        blocks = Delayed((self.name, 0), self.graph, layer=self.name)
        return HighLevelGraph.from_collections(name, tasks, dependencies=[blocks, *arguments])

    def chunk_tasks(self, kind: str, tasks: dict[int, tuple], arguments: list = ()) -> list[Delayed]:
        """One Delayed per chunk of `tasks` ({chunk: dask's tuple}, see `layer`), all of one graph."""
        name = _layer_name(kind)
        graph = self.layer(name, {(name, chunk): task for chunk, task in tasks.items()}, arguments)
        return [Delayed((name, chunk), graph, layer=name) for chunk in tasks]

    def planes(self, lengths) -> da.Array:
        """The planes as a lazy array in chunks of `lengths` along `pixel`, each assembled by one
        task (the pixel variables of a store's template, and of the dataset an ingest returns)."""
        name = _layer_name("pixel-planes")
        tasks = {
            (name, 0, i, 0): (_assembled, (self.n_roles, length, self.channels), blocks, pieces)
            for i, (length, (blocks, pieces)) in enumerate(zip(lengths, self.chunk_inputs(lengths)))
        }
        return da.Array(self.layer(name, tasks), name, ((self.n_roles,), tuple(lengths), (self.channels,)), dtype=np.uint8)

    def slots(self, images: list[int]) -> list[tuple[int, int]]:
        """Where the consecutive `images` of one chunk lie among the blocks that chunk overlaps:
        (block, counted from the first image's, position in the block) of each."""
        blocks = np.searchsorted(self.firsts, images, side="right") - 1
        return [(int(block - blocks[0]), int(image - self.firsts[block])) for image, block in zip(images, blocks)]


def _decode_group(paths: np.ndarray, shapes: np.ndarray) -> tuple[np.ndarray, list[list[str]]]:
    """One task: the images of a group, each file (`paths` [source, image]) read once, decoded and
    hashed, as planes (sources, pixels, channels) with the images back to back, and the SHA-256 of
    the bytes each file was decoded from [source][image]. `shapes`: each image's (height, width,
    channels) as probed."""
    infos = [ImageInfo(*shape) for shape in shapes.tolist()]
    counts = [info.height * info.width for info in infos]
    planes = np.empty((len(paths), sum(counts), infos[0].channels), dtype=np.uint8)
    digests = [[] for _ in paths]
    stops = np.cumsum(counts).tolist()
    for source, files in enumerate(paths):
        for path, info, count, stop in zip(files, infos, counts, stops):
            pixels, digest = read_image_and_sha256(path, info)
            planes[source, stop - count : stop] = pixels.reshape(count, info.channels)
            digests[source].append(digest)
    return planes, digests


def decoded_groups(corpus: Corpus, infos: list[ImageInfo], chunk_pixels: int) -> PixelBlocks:
    """The planes of `corpus` (models in order, then ground truth and inputs if any) as blocks of
    consecutive images, each decoded and hashed by one task: a group holds at least a chunk's
    worth of pixels and `batches.BATCH_BYTES`, or one image bigger than that, so a big image is decoded
    once for all the chunks it spans and small ones many to a task."""
    paths = np.array([files for _, files in _roles(corpus)], dtype=object).reshape(-1, len(infos))
    shapes = np.array([(info.height, info.width, info.channels) for info in infos], dtype=np.int64)
    counts = shapes[:, 0] * shapes[:, 1]
    channels = infos[0].channels
    per_pixel = len(paths) * channels
    firsts = [
        group.start for group in consecutive_runs(counts, per_pixel, budget=max(chunk_pixels * per_pixel, batches.BATCH_BYTES))
    ]
    bounds = [*firsts, len(infos)]
    tasks = [(_decode_group, paths[:, first:end], shapes[first:end]) for first, end in zip(bounds, bounds[1:])]
    return PixelBlocks.of_tasks("decode-group", tasks, firsts, np.add.reduceat(counts, firsts), len(paths), channels)


def _layer_name(kind: str) -> str:
    """A name of its own for a layer of tasks of `kind` (the keys of its tasks start with it)."""
    return f"{kind}-{uuid.uuid4().hex}"


def _assembled(shape: tuple[int, int, int], blocks: list, pieces: list[tuple[int, int, int, int]]) -> np.ndarray:
    """One chunk (roles, pixels, channels) from the `blocks` it overlaps (see `PixelBlocks`): each
    of `pieces` is (block, its pixels start:stop, where they start in the chunk)."""
    chunk = np.empty(shape, dtype=np.uint8)
    for block, start, stop, at in pieces:
        chunk[:, at : at + stop - start] = blocks[block][0][:, start:stop]
    return chunk


def _write_chunk(
    shape: tuple[int, int, int],
    blocks: list,
    pieces: list,
    digests: list[list[str]] | None,
    slots: list[tuple[int, int]],
    n_models: int,
    targets: ArraysToWrite,
    index: int,
    start: int,
    stop: int,
) -> None:
    """One task: chunk `index` assembled from the `blocks` it overlaps (`_assembled`) into the
    arrays of `targets` (`chunk_targets`, opened here): the prediction array and the ground
    truth and input arrays there are, their checksums into its row of the checksums, the SHA-256s
    of the files they were decoded from into its row of the records, then the chunk's mark. The
    SHA-256s [source][image] (the chunk's images in order) are `digests`, or where None, those
    the blocks return for the images at `slots` (block, image in the block)."""
    *arrays, marks, records, checksums = targets.open()
    block = _assembled(shape, blocks, pieces)
    planes = [block[:n_models], *block[n_models:]]
    if digests is None:
        digests = [[blocks[k][1][source][image] for k, image in slots] for source in range(records.shape[1])]
    record = np.zeros(records.shape[1:], dtype=np.uint8)
    for role, role_digests in enumerate(digests):
        for slot, digest in enumerate(role_digests):
            record[role, slot] = np.frombuffer(bytes.fromhex(digest), dtype=np.uint8)
    write_chunk_then_mark(list(zip(arrays, planes)), marks, index, start, stop, [(records, record)], checksums)


def _recorded(record: np.ndarray, n_images: int) -> list[list[str]]:
    """The hex SHA-256s [role][image] of the first `n_images` slots of one chunk's record."""
    return [[role[slot].tobytes().hex() for slot in range(n_images)] for role in record]


def _extra_names(corpus: Corpus) -> list[str]:
    """The variables of the ground truth and inputs there are, in the order `_roles` stacks them."""
    return [
        name for name, files in ((schema.GROUND_TRUTH, corpus.ground_truth), (schema.INPUT, corpus.inputs)) if files is not None
    ]


def write_stages(blocks: PixelBlocks, n_read: int, lengths, todo: np.ndarray, computed: str, note: str = "") -> list[Stage]:
    """The stages of writing the chunks `todo` of a store of the planes of `blocks`, in chunks of
    `lengths`: the `n_read` tasks of the blocks that those chunks overlap (`computed`: what they
    do), then one task per chunk that assembles and writes it. `note`: what the counts assume."""
    return [
        Stage(computed, n_read),
        Stage(
            "assemble and write chunks",
            len(todo),
            chunks=len(todo),
            bytes_written=int(np.asarray(lengths)[todo].sum()) * blocks.n_roles * blocks.channels,
            note=note,
        ),
    ]


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
    return (
        all(existing.attrs.get(key) == planned.attrs.get(key) for key in keys)
        and "source_sha256" in existing
        and "appended" not in existing.attrs
        and existing["image"].values.tolist() == planned["image"].values.tolist()
        and existing["source_sha256"].values.tolist() == planned["source_sha256"].values.tolist()
    )


def plan_ingest(
    source,
    store: str,
    models: list[str] | None = None,
    chunk_pixels: int = schema.DEFAULT_CHUNK_PIXELS,
    overwrite: bool = False,
    compression: str = schema.DEFAULT_COMPRESSION,
) -> Plan:
    """Plan the ingest of the corpus folder `source` into the Zarr store `store`, its pixel arrays
    compressed with `compression` (a name of `schema.COMPRESSORS`).

    Without `overwrite`, a store that already holds exactly this ingest (same source files by
    SHA-256, models, chunking and compression: e.g. a run killed after its commit) is left as it
    is (status 'unchanged'); any other existing store is refused.

    The run is resumable: chunks go to a fixed staging location beside `store`, each followed by
    its completion mark (`resumable.start_resumable`), so the same command after a kill decodes and
    writes only the missing chunks (status 'resumed'); the marks are dropped when the complete
    store is moved into place.
    """
    corpus = discover_corpus(source, models)
    infos = probe_corpus(corpus)
    corpus, input_note = storable_inputs(corpus, infos)
    index = schema.ImageIndex(corpus.stems, np.array([i.height for i in infos]), np.array([i.width for i in infos]))
    blocks = decoded_groups(corpus, infos, chunk_pixels)
    lengths = blocks.chunk_lengths(chunk_pixels)
    planes = blocks.planes(lengths)
    n_models, channels = len(corpus.models), infos[0].channels
    attrs = schema.store_attributes(
        corpus.models,
        channels,
        created_by=f"ensir-flow {ensir_flow.__version__} ingest",
        source=str(source),
        chunk_pixels=int(chunk_pixels),
        compression=compression,
        **input_note,
    )
    extra_names = _extra_names(corpus)
    ds, encoding = pixel_store(
        index, corpus.models, planes, extra_names, chunk_pixels, compression, attrs, source_provenance(corpus, hashed=False)
    )
    # a first ingest hashes each file as it decodes it; only a re-run onto an existing store hashes first
    unchanged = (
        not overwrite and exists(store) and holds(store, ds.assign(source_sha256=source_provenance(corpus)["source_sha256"]))
    )
    if not unchanged:
        refuse_existing(store, overwrite)
    details = {
        "source": str(source),
        "store": str(store),
        "models": ", ".join(corpus.models),
        "ground truth": "yes" if corpus.ground_truth is not None else "no",
        "inputs (lq/)": "stored" if corpus.inputs is not None else input_note.get("input", "none"),
        "images": len(corpus.stems),
        "pixels": f"{index.n_pixels:,} x {channels} channels",
        "tasks": f"{blocks.n_blocks} to read, decode and hash the {len(corpus.stems) * blocks.n_roles} files (groups of "
        f"consecutive images), {len(lengths)} to assemble and write the chunks of {chunk_pixels:,} pixels",
        "compression": compression,
    }
    execute, stages = store_writer(
        store,
        ds,
        encoding,
        blocks,
        extra_names,
        overwrite,
        unchanged,
        "ingest",
        "read, decode and hash the source files",
        [files for _, files in _roles(corpus)],
    )
    return Plan(f"ingest {len(corpus.stems)} images of {n_models} models", details, execute, stages=stages)


def pixel_store(
    index: schema.ImageIndex,
    models: list[str],
    planes: da.Array,
    extra_names: list[str],
    chunk_pixels: int,
    compression: str,
    attrs: dict,
    provenance: xr.Dataset,
) -> tuple[xr.Dataset, dict]:
    """The dataset and Zarr encoding of a new pixel store: the image index, `planes` (roles, pixel,
    channel: one per model, then one per name of `extra_names`), `attrs` and the per-source
    `provenance` (its SHA-256s, and their `source_digest`, are set when the store is written:
    `store_writer`)."""
    n_models, channels = len(models), planes.shape[2]
    ds = index.to_dataset()
    ds[schema.PREDICTION] = (("model", "pixel", "channel"), planes[:n_models])
    encoding = {schema.PREDICTION: schema.pixel_encoding((n_models, chunk_pixels, channels), compression)}
    for i, name in enumerate(extra_names):
        ds[name] = (("pixel", "channel"), planes[n_models + i])
        encoding[name] = schema.pixel_encoding((chunk_pixels, channels), compression)
    ds = ds.assign_coords(model=np.array(models, dtype=object))
    ds.attrs = attrs
    return schema.annotate(ds.merge(provenance)), encoding


def source_digest(sha256s: np.ndarray) -> str:
    """The store attribute `source_digest`: the SHA-256 of every source file's SHA-256 (source, image)."""
    return hashlib.sha256(" ".join(np.asarray(sha256s).ravel()).encode()).hexdigest()


#: Staging-only array of a pixel store being written: per chunk, the SHA-256 (32 bytes) of each
#: source file whose pixels the chunk holds (chunk, source, the chunk's images in order, byte),
#: written with the chunk before its mark. It becomes `source_sha256` at commit and is deleted.
CHUNK_SOURCES = "chunk_source_sha256"
#: Staging-only attribute: staging written without chunk records (by an older version) is not resumed.
RESUME_PROTOCOL = {"resume_protocol": f"{CHUNK_SOURCES} and {CHUNK_CHECKSUMS} per chunk"}
#: The variables (besides the attributes) that must be the same for a staging to be resumed: the
#: images, their sizes, the source folders and file names.
IDENTITY_VARIABLES = (*schema.IMAGE_VARIABLES, "image", "source", "source_file")


def store_writer(
    store: str,
    ds: xr.Dataset,
    encoding: dict,
    blocks: PixelBlocks,
    extra_names: list[str],
    overwrite: bool,
    unchanged: bool,
    label: str,
    computed: str,
    source_paths: list[list] | None = None,
) -> tuple[Callable, list[Stage]]:
    """execute(compute) writing the store `ds` (from `pixel_store`) resumably, and its stages
    (`write_stages`; the blocks' tasks do what `computed` says): chunks go to a fixed staging
    location beside `store` (`resumable.resumable_location`), each followed by its completion
    mark, and the store is moved into place when complete; a run killed half-way is resumed by the
    same command. execute returns an IngestResult (`unchanged` when told so).

    Each chunk is written by one task from the `blocks` of `ds`'s planes that it overlaps
    (`_write_chunk`), which opens the arrays it writes (`chunk_targets`). The tasks are built
    here, for the chunks a run started now would write (those a killed run of the same inputs
    left unmarked, `resumable.staged_marks`, or all), and again at run time only if, under the
    lock, the chunks to write, or where, are others by then. The SHA-256 of each source file
    [source][image] comes from the blocks' tasks, which hash the files they decode, where
    `source_paths` (to hash the files again on a resume) is given; else from `ds` (hashed when
    planned). Each chunk records the digests of the files whose pixels it holds
    (`CHUNK_SOURCES`); a resume redoes the complete chunks whose files have changed since, and the
    commit writes the recorded digests as `source_sha256`."""
    n_models = ds.sizes["model"]
    lengths = ds[schema.PREDICTION].chunks[1]
    ranges = ranges_of(lengths)
    inputs = blocks.chunk_inputs(lengths)
    images = [
        [span.label for span in spans]  # the images each chunk holds pixels of, in order
        for spans in chunk_spans(ds["pixel_offset"].values, ds["pixel_count"].values, np.arange(ds.sizes["image"]), lengths)
    ]
    planned = ds["source_sha256"].values
    hashed = source_paths is not None
    slots = max(len(held) for held in images)
    n_sources = planned.shape[0]
    pixel_variables = [schema.PREDICTION, *extra_names]
    template = ds.assign(
        {
            CHUNK_SOURCES: (
                ("chunk", "source", "chunk_image", "sha256_byte"),
                da.zeros((len(ranges), n_sources, slots, 32), dtype=np.uint8, chunks=(1, -1, -1, -1)),
                {"long_name": "SHA-256 of the source files of each chunk's images"},
            ),
            CHUNK_CHECKSUMS: checksum_template(len(ranges), pixel_variables),
        }
    )
    template.attrs = {**ds.attrs, **RESUME_PROTOCOL}
    template_encoding = {
        **encoding,
        CHUNK_SOURCES: {"chunks": (1, n_sources, slots, 32)},
    }
    identity = {name: ds[name].values for name in IDENTITY_VARIABLES}

    def write_tasks(todo: np.ndarray, location: str) -> list[Delayed]:
        """One task per chunk of `todo` that assembles it and writes it into the arrays at
        `location` (`resumable.resumable_location`, see `_write_chunk`)."""
        targets = task_argument(chunk_targets(location, pixel_variables))
        tasks = {
            int(i): (
                _write_chunk,
                (blocks.n_roles, lengths[i], blocks.channels),
                *inputs[i],
                None if hashed else [[role[image] for image in images[i]] for role in planned],
                blocks.slots(images[i]) if hashed else [],
                n_models,
                targets.key,
                int(i),
                *ranges[i],
            )
            for i in todo
        }
        return blocks.chunk_tasks("write-chunk", tasks, [targets])

    # the chunks a run started now would write, where, and their tasks
    staged = None if unchanged else staged_marks(store, template.attrs, identity)
    planned_todo = np.arange(0 if unchanged else len(ranges)) if staged is None else np.flatnonzero(~staged)
    planned_location = resumable_location(store)
    writes = write_tasks(planned_todo, planned_location)

    def current_digests(wanted: list[tuple[int, int]]) -> list[str]:
        """The SHA-256 now of the files (source, image) `wanted`: read again when the tasks hash them."""
        if source_paths is None:
            return [planned[source, image] for source, image in wanted]
        with ThreadPoolExecutor(max_workers=8) as pool:
            return list(pool.map(file_sha256, [source_paths[source][image] for source, image in wanted]))

    def stale_chunks(records, done: np.ndarray) -> np.ndarray:
        """Which complete chunks hold pixels of a file whose bytes have changed since."""
        complete = np.flatnonzero(done)
        wanted = sorted({(source, image) for i in complete for image in images[i] for source in range(n_sources)})
        now = dict(zip(wanted, current_digests(wanted)))
        recorded = records[...] if len(complete) else None
        stale = np.zeros_like(done)
        for i in complete:
            held = _recorded(recorded[i], len(images[i]))
            stale[i] = any(
                held[source][slot] != now[source, image] for source in range(n_sources) for slot, image in enumerate(images[i])
            )
        return stale

    def committed_digests(records) -> np.ndarray:
        """`source_sha256` (source, image) from the chunks' records; a file two chunks saw with
        different bytes changed during the run (the re-run redoes the chunks of its old bytes)."""
        sha256 = np.full(planned.shape, "", dtype=object)
        recorded = records[...]
        for i, held in enumerate(images):
            for source, role_digests in enumerate(_recorded(recorded[i], len(held))):
                for image, digest in zip(held, role_digests):
                    if sha256[source, image] not in ("", digest):
                        raise TransientError(
                            f"{ds.attrs.get('source')}/{ds['source'].values[source]}/"
                            f"{ds['source_file'].values[source, image]}: changed while {store} was written; "
                            "run the command again"
                        )
                    sha256[source, image] = digest
        if (sha256 == "").any():
            raise RuntimeError(f"{store}: images in no chunk; not committing")
        return sha256

    def execute(compute):
        if unchanged:
            return IngestResult(open_store(store), "unchanged")
        with exclusive_lock(store):
            refuse_or_recover(store, overwrite)
            done = resumable_marks(store, template.attrs, identity)
            resuming = done is not None
            if resuming:
                location = resumable_location(store)
                stale = stale_chunks(open_array_for_writing(location, CHUNK_SOURCES), done)
                marks = open_array_for_writing(location, COMPLETE)
                for i in np.flatnonzero(stale):
                    marks[int(i)] = 0  # unmarked before it is rewritten, so no kill leaves it marked with mixed data
                done &= ~stale
            else:
                location = start_resumable(store, template, template_encoding, len(ranges))  # pixels, records: the tasks
                done = np.zeros(len(ranges), dtype=bool)
            todo = np.flatnonzero(~done)
            as_planned = location == planned_location and np.array_equal(todo, planned_todo)
            compute(
                *(writes if as_planned else write_tasks(todo, location)),
                label=f"{label} ({len(todo)} of {len(ranges)} chunks)" if resuming else label,
            )
            sha256 = committed_digests(open_array_for_writing(location, CHUNK_SOURCES))
            attrs = {**ds.attrs, "source_digest": source_digest(sha256)}
            commit_resumable(store, keep_marks=False, values={"source_sha256": sha256}, drop=(CHUNK_SOURCES,), attrs=attrs)
        written = ds.assign(source_sha256=ds["source_sha256"].copy(data=sha256))
        written.attrs = attrs
        return IngestResult(written, "resumed" if resuming else "written", len(ranges), len(todo))

    note = (
        f"a killed run of these inputs left {len(ranges) - len(planned_todo):,} of the {len(ranges):,} chunks written "
        "(those whose source files have changed since are written again)"
        if staged is not None
        else ""
    )
    n_read = len({key for i in planned_todo for key in inputs[i][0]})  # the blocks the tasks name
    return execute, [] if unchanged else write_stages(blocks, n_read, lengths, planned_todo, computed, note)


def chunk_targets(location: str, pixel_variables: list[str]) -> ArraysToWrite:
    """The arrays that the task writing a chunk of a pixel store writes at `location` (where
    `resumable.resumable_location` says; `_write_chunk` opens them): the pixel variables, then the
    marks, the records of sources and the checksums."""
    return ArraysToWrite(location, (*pixel_variables, COMPLETE, CHUNK_SOURCES, CHUNK_CHECKSUMS))


def refuse_changed_sources(corpus: Corpus, existing: xr.Dataset, store: str) -> None:
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
        raise InputError(
            f"{corpus.root}: {len(changed)} image(s) already in {store} have changed ({', '.join(changed[:5])}"
            f"{', ...' if len(changed) > 5 else ''}); --append adds new images only: re-ingest the corpus with "
            "--overwrite to rebuild the store"
        )


def plan_append(source, store: str, models: list[str] | None = None) -> Plan:
    """Plan adding the images of `source` whose stems `store` lacks (same models, channels, ground truth).

    The store is locked during the append, which follows `resumable.committed_append`: until its
    single final metadata write, every reader sees the store as it was. A store that does not exist
    yet is created by a plain ingest (default chunks and compression), so a scheduled job runs the
    same command from its first night on.
    """
    if not exists(store):
        first = plan_ingest(source, store, models)
        return Plan(
            f"append to a new store: {first.title}",
            first.details,
            lambda compute: first.run(compute).dataset.sizes["image"],
            stages=first.stages,
        )
    existing = open_store(store)
    store_models = schema.check_store(existing, store)
    if models is not None and list(models) != store_models:
        raise InputError(f"{store}: models {list(models)} differ from the store's {store_models} (order matters)")
    folders = discover_corpus(source).models
    if sorted(folders) != sorted(store_models):
        extra, missing = sorted(set(folders) - set(store_models)), sorted(set(store_models) - set(folders))
        raise InputError(
            f"{source}: model folders differ from the store's models"
            + (f"; not in the store: {', '.join(extra)}" if extra else "")
            + (f"; missing here: {', '.join(missing)}" if missing else "")
        )
    corpus = discover_corpus(source, store_models)
    has_truth = schema.GROUND_TRUTH in existing
    if (corpus.ground_truth is not None) != has_truth:
        raise InputError(
            f"{source}: {'has' if corpus.ground_truth is not None else 'lacks'} gt/ but the store "
            f"{'has' if has_truth else 'has no'} ground truth"
        )
    known = {str(stem) for stem in existing["image"].values}
    refuse_changed_sources(corpus, existing, store)
    keep = [i for i, stem in enumerate(corpus.stems) if stem not in known]
    skipped = len(corpus.stems) - len(keep)
    pick = lambda files: None if files is None else [files[i] for i in keep]  # noqa: E731
    corpus = Corpus(
        corpus.root,
        corpus.models,
        pick(corpus.stems),
        {m: pick(f) for m, f in corpus.predictions.items()},
        pick(corpus.ground_truth),
        pick(corpus.inputs),
    )
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
    index = schema.ImageIndex(corpus.stems, np.array([i.height for i in infos]), np.array([i.width for i in infos]))
    return append_plan(
        f"append {len(keep)} images to {store}",
        source,
        store,
        existing,
        corpus,
        index,
        decoded_groups(corpus, infos, chunk_pixels),
        _extra_names(corpus),
        details,
        "ingest --append",
        "read, decode and hash the new files",
    )


def append_plan(
    title: str,
    source,
    store: str,
    existing: xr.Dataset,
    corpus: Corpus,
    index: schema.ImageIndex,
    blocks: PixelBlocks,
    extra_names: list[str],
    details: dict,
    by: str,
    computed: str,
) -> Plan:
    """The plan appending the images of `corpus` (their `index`, and `blocks`: their planes, the
    models' then those of the variables `extra_names`, computed by tasks that do what `computed`
    says) to the `existing` store, with their sources' provenance, recorded in the `appended`
    attribute as made `by`. One task per chunk's worth of new pixels (the first one filling the
    store's last partial chunk) assembles them from the blocks it overlaps and writes them.

    The store is locked during the append, which follows `resumable.committed_append`: until its
    single final metadata write, every reader sees the store as it was."""
    planned = store_identity(store)
    n_existing, n_known = existing.sizes["pixel"], existing.sizes["image"]
    images = index.to_dataset().merge(source_provenance(corpus))
    if images["source"].values.tolist() != existing["source"].values.tolist():
        raise InputError(
            f"{source}: source folders {images['source'].values.tolist()} differ from the store's "
            f"{existing['source'].values.tolist()}"
        )
    images["pixel_offset"] = images["pixel_offset"] + n_existing
    image_values = {name: images[name].values for name in (*schema.IMAGE_VARIABLES, "image", "source_file", "source_sha256")}
    attrs = dict(existing.attrs)
    attrs["appended"] = [
        *attrs.get("appended", []),
        {"source": str(source), "images": len(index.stems), "by": f"ensir-flow {ensir_flow.__version__} {by}"},
    ]
    committed = {"pixel": n_existing, "image": n_known}
    grown = {"pixel": n_existing + index.n_pixels, "image": n_known + len(index.stems)}
    checksummed = CHUNK_CHECKSUMS in existing and CHECKSUMMED_VARIABLES in existing[CHUNK_CHECKSUMS].attrs
    chunk_pixels = existing[schema.PREDICTION].encoding["chunks"][1]
    if checksummed:
        committed["chunk"], grown["chunk"] = (-(-pixels // chunk_pixels) for pixels in (committed["pixel"], grown["pixel"]))
    details["pixels"] = f"{index.n_pixels:,} appended to {n_existing:,}"
    names = [schema.PREDICTION, *extra_names]
    lengths = blocks.chunk_lengths(chunk_pixels, first_chunk=chunk_pixels - n_existing % chunk_pixels)
    checked_chunks = range(n_existing // chunk_pixels, grown.get("chunk", 0))
    columns = existing[CHUNK_CHECKSUMS].attrs[CHECKSUMMED_VARIABLES] if checksummed else []
    # the tasks, built now: each opens the arrays it writes (`ArraysToWrite`), which
    # `committed_append` has grown by then
    targets = task_argument(ArraysToWrite(str(store), tuple(names)))
    n_models = existing.sizes["model"]
    tasks = {
        i: (
            _append_chunk,
            (blocks.n_roles, stop - start, blocks.channels),
            held,
            pieces,
            n_models,
            targets.key,
            n_existing + start,
            n_existing + stop,
        )
        for i, ((start, stop), (held, pieces)) in enumerate(zip(ranges_of(lengths), blocks.chunk_inputs(lengths)))
    }
    appends = blocks.chunk_tasks("append-chunk", tasks, [targets])
    checks = checksum_tasks(store, columns, checked_chunks, chunk_pixels, grown["pixel"]) if checksummed else []
    stages = [
        Stage(computed, blocks.n_blocks),
        Stage(
            "assemble and append chunks",
            len(appends),
            chunks=len(lengths),
            bytes_written=index.n_pixels * blocks.n_roles * blocks.channels,
        ),
    ]
    if checksummed:
        stages.append(
            Stage(
                "checksums of the chunks written",
                len(checks),
                chunks=len(checked_chunks) * len(columns),
                bytes_read=(grown["pixel"] - checked_chunks.start * chunk_pixels)
                * existing.sizes["channel"]
                * sum(existing[name].shape[0] if existing[name].ndim == 3 else 1 for name in columns),
            )
        )

    def write_pixels(compute):  # each new plane into its array, past the committed pixels
        compute(*appends, label="append")
        if checksummed:  # the store's last chunk, rewritten whole, and each new one
            compute(*checks, label="append checksums")

    def execute(compute):
        with exclusive_lock(store):
            if store_identity(store) != planned or open_store(store).sizes != existing.sizes:
                raise TransientError(f"{store}: changed by another run while this one was planned; run it again")
            committed_append(store, committed, grown, lambda _arrays: write_pixels(compute), image_values, attrs)
        return len(index.stems)

    return Plan(title, details, execute, stages=stages)


def checksum_tasks(store: str, columns: list[str], chunks: range, chunk_pixels: int, n_pixels: int) -> list[Delayed]:
    """One task per chunk of `chunks` of the store at `store` (`n_pixels` long, in chunks of
    `chunk_pixels`) that records its row of checksums from the arrays `columns` as they are
    stored then (`_record_checksums`)."""
    targets = task_argument(ArraysToWrite(str(store), (*columns, CHUNK_CHECKSUMS)))
    name = _layer_name("append-checksums")
    tasks = {
        (name, chunk): (_record_checksums, targets.key, chunk, chunk * chunk_pixels, min((chunk + 1) * chunk_pixels, n_pixels))
        for chunk in chunks
    }
    graph = HighLevelGraph.from_collections(name, tasks, dependencies=[targets])
    return [Delayed(key, graph, layer=name) for key in tasks]


def _record_checksums(targets: ArraysToWrite, index: int, start: int, stop: int) -> None:
    """One task: row `index` of the checksums (the last array of `targets`) from chunk `index`
    (pixels start:stop) of the other arrays of `targets` as they are stored now."""
    *arrays, checksums = targets.open()
    record_checksums(arrays, checksums, index, start, stop)


def _append_chunk(
    shape: tuple[int, int, int], blocks: list, pieces: list, n_models: int, targets: ArraysToWrite, start: int, stop: int
) -> None:
    """One task of an append: new pixels start:stop of the grown arrays (at most one chunk), assembled
    from the `blocks` they overlap (`_assembled`), into the prediction array and the others of
    `targets` (opened here)."""
    chunk = _assembled(shape, blocks, pieces)
    for array, values in zip(targets.open(), [chunk[:n_models], *chunk[n_models:]]):
        array[pixel_slice(array, start, stop)] = values
