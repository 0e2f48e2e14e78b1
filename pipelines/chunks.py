"""Building blocks of a pass over a store's chunks: chunk ranges, spans, reads inside tasks, and
the tree that reduces per-chunk results.

A *span* is a run of pixels start:stop of one chunk (in chunk coordinates) that share a label:
the image they belong to (apply, ZZPM) or the fold of images (fit's cross-validation). Images lie
back to back on the pixel axis, so a chunk is covered by a few spans.

Each task of a pass over a store reads its own chunk straight from Zarr, so the read and the work
on it are one task (half the tasks and no chunk handed from task to task). The client opens each
array once and sends the opened array (its location and metadata, about a kilobyte) with
(start, stop): it never holds pixels, and tasks do not read the array's metadata again.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import dask
import fsspec
import numpy as np
import zarr
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

from ensir_flow import schema
from ensir_flow.errors import InputError, TransientError, first_line

from .batches import consecutive_runs
from .integrity import ChunkChecksums, checksums_for, chunk_checksum, store_identity
from .stores import open_group_as_committed

if TYPE_CHECKING:
    import xarray as xr

    from .stores import StoreIndex

#: How many partial results one merge task of `tree_reduce` combines.
MERGE_FAN_IN = 8
#: A pass over a store of at most this many chunks runs a task per chunk (a store spread over
#: every worker, each task reading one chunk); a pass over more runs a task per run of
#: consecutive chunks (`chunk_runs`).
CHUNK_TASKS = 4096
#: Bytes a task of a pass over a store of more than `CHUNK_TASKS` chunks reads at least: the
#: scheduler's cost of a task (about a millisecond) and the client's (its key, its few arguments)
#: are then well under 1% of its work (a second or more of reading and computing), and a pass
#: over 10^6 Full HD frames (about 10^6 chunks of 2 Mpx) runs tens of thousands of tasks, not
#: millions. A task reads and handles its chunks one at a time, so it holds one chunk's pixels.
RUN_BYTES = 512 << 20


class Span(NamedTuple):
    """Pixels start:stop of a chunk (chunk coordinates) that share `label` (an image, or a fold)."""

    start: int
    stop: int
    label: int


def chunk_ranges(ds: xr.Dataset | StoreIndex) -> list[tuple[int, int]]:
    """(start, stop) along `pixel` of each chunk of the store's predictions."""
    return ranges_of(pixel_chunk_lengths(ds))


def pixel_chunk_lengths(ds: xr.Dataset | StoreIndex) -> tuple[int, ...]:
    """Length along `pixel` of each chunk of the store's predictions, from a store opened by
    `stores.open_store` (xarray) or by `stores.open_store_index` (zarr alone)."""
    return ds[schema.PREDICTION].chunks[1]


def ranges_of(lengths) -> list[tuple[int, int]]:
    """(start, stop) of consecutive chunks of the given lengths."""
    stops = np.cumsum(lengths)
    return [(int(stop - length), int(stop)) for stop, length in zip(stops, lengths)]


def chunk_runs(lengths, bytes_per_pixel: int, budget: int = 1) -> list[range]:
    """The tasks of a pass over chunks of `lengths` pixels (`bytes_per_pixel` read of each), as
    runs of consecutive chunks (index ranges): of at least `budget` bytes each (by default a run
    per chunk) where there are at most `CHUNK_TASKS` chunks, else of at least `RUN_BYTES`."""
    return consecutive_runs(lengths, bytes_per_pixel, budget=budget if len(lengths) <= CHUNK_TASKS else max(budget, RUN_BYTES))


def graph_tasks(kind: str, tasks: list[tuple], arguments: list[Delayed] = (), apart: bool = False) -> list[Delayed]:
    """One Delayed per task of `tasks` (dask's tuples: a function, then its arguments: values, or
    the keys of `arguments`, Delayed values such as `task_argument`s), named for `kind`. Building
    them takes microseconds a task; a `dask.delayed` call takes about a millisecond, minutes for
    a pass of 10^5 tasks.

    They share one graph layer, for tasks reduced into one result (`tree_reduce`); `apart`, each
    holds its own task and the arguments alone, for tasks computed as many Delayed: dask
    optimises each against its graph, which for a graph shared by all takes time and memory
    quadratic in the tasks (tens of GB for 3 x 10^4 tasks), while a graph of a layer per task
    makes a reduction's graph slow to handle (minutes for 5 x 10^4 layers)."""
    name = f"{kind}-{uuid.uuid4().hex}"
    if not apart:
        layer = {(name, i): task for i, task in enumerate(tasks)}
        graph = HighLevelGraph.from_collections(name, layer, dependencies=list(arguments))
        return [Delayed((name, i), graph, layer=name) for i in range(len(tasks))]
    shared = HighLevelGraph.merge(*(argument.dask for argument in arguments)) if arguments else HighLevelGraph({}, {})
    layers, dependencies = dict(shared.layers), dict(shared.dependencies)
    argument_layers = {layer for argument in arguments for layer in argument.__dask_layers__()}
    delayed = []
    for i, task in enumerate(tasks):
        layer = f"{name}-{i}"
        graph = HighLevelGraph({**layers, layer: {(name, i): task}}, {**dependencies, layer: argument_layers})
        delayed.append(Delayed((name, i), graph, layer=layer))
    return delayed


@dataclass(frozen=True)
class PixelSource:
    """A pixel variable of a store as the tasks of a pass read it: the opened array, the XXH3-64 checksums
    its writer recorded for its chunks (None for a store written before chunk checksums), where
    the store lies (absolute, as the plan resolved it), its identity when planned
    (`integrity.store_identity`) and, for predictions, the order to read its models in (None:
    the store's own)."""

    array: zarr.Array
    checksums: ChunkChecksums | None
    location: str
    identity: str
    model_order: tuple[int, ...] | None = None

    @property
    def name(self) -> str:
        return self.array.path


def pixel_array(store: str, name: str, model_order: tuple[int, ...] | None = None) -> PixelSource:
    """The pixel variable `name` ((model,) pixel, channel) of the store at `store`, to read in tasks
    with `read_pixels`: opened as committed (its shape, chunk checksums and identity), so an
    append in progress, which grows the array's own metadata and rewrites its last chunk past the
    committed pixels, changes nothing that is read."""
    identity = store_identity(str(store))
    group = open_group_as_committed(str(store))
    return PixelSource(group[name], checksums_for(group, name, str(store)), str(store), identity, model_order)


def task_argument(value) -> Delayed:
    """A value every task of a pass takes (an opened array, a `PixelSource`, the `ArraysToWrite` of
    its outputs) as one key of the graph.

    A zarr Array is a dataclass, and dask walks dataclass arguments field by field (about 7 ms an
    argument, so most of the time to build a graph); behind one key it is walked once and sent
    to each worker once.
    """
    return dask.delayed(value, pure=True)


def read_pixels(source: PixelSource, start: int, stop: int) -> np.ndarray:
    """Pixels start:stop of a `pixel_array`, every chunk they lie in checked against its checksum.

    Each chunk is read whole and its XXH3-64 hash compared with the one recorded for its position: a
    missing chunk (which Zarr reads as the fill value), a truncated or corrupt one, or the valid
    chunk of another position is an InputError naming the array and the chunk; a store that is no
    longer the one planned (replaced, or another store at that path on this worker) a
    TransientError. A store without checksums is checked for the presence of each chunk only.
    The checksums are read with the chunks, from the store planned on (its `store_id`; appends
    keep it): read from another store, they would vouch for its chunks.
    """
    array = source.array
    length, n_pixels = array.chunks[-2], array.shape[-2]
    first_index, end_index = start // length, -(-stop // length)
    recorded = None
    if source.checksums is not None:
        _refuse_if_another_store(source)
        recorded = source.checksums.rows(first_index, end_index)
    parts = []
    for index in range(first_index, end_index):
        first, end = index * length, min((index + 1) * length, n_pixels)
        checksum = None if recorded is None or index - first_index >= len(recorded) else recorded[index - first_index]
        chunk = _read_chunk(source, index, first, end)
        _check_chunk(source, index, first, end, chunk, checksum)
        parts.append(chunk[pixel_slice(array, max(start, first) - first, min(stop, end) - first)])
    pixels = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-2)
    return pixels if source.model_order is None else pixels[list(source.model_order)]


def _read_chunk(source: PixelSource, index: int, start: int, stop: int) -> np.ndarray:
    """Chunk `index` (pixels start:stop) of `source`, read (see `read_pixels`)."""
    array = source.array
    try:
        return array[pixel_slice(array, start, stop)]
    except (RuntimeError, ValueError) as error:
        _refuse(source, index, start, stop, f"unreadable ({first_line(error)})")


def _check_chunk(source: PixelSource, index: int, start: int, stop: int, values: np.ndarray, checksum) -> None:
    """Refuse chunk `index` (pixels start:stop) of `source`, read as `values`, if it is missing or
    not the chunk of `checksum` (the one recorded for it, None where there is none)."""
    problem = _problem_of(source, index, values, checksum)
    if problem is not None:
        _refuse(source, index, start, stop, problem)


def _refuse(source: PixelSource, index: int, start: int, stop: int, problem: str):
    _refuse_if_replaced(source)
    raise _bad_chunk(source, index, start, stop, problem)


def _problem_of(source: PixelSource, index: int, values: np.ndarray, checksum) -> str | None:
    """What is wrong with the values read of chunk `index`, if anything: missing, or (where the
    store has hashes) not the chunk its writer recorded there (`checksum`)."""
    if checksum is not None and chunk_checksum(values, source.checksums.seed(index)) == checksum:
        return None
    if not _chunk_exists(source, index):
        return "missing"
    return None if source.checksums is None else "not the chunk written there (its XXH3-64 hash differs: corrupt or swapped)"


def _chunk_exists(source: PixelSource, index: int) -> bool:
    array = source.array
    coords = tuple(index if axis == array.ndim - 2 else 0 for axis in range(array.ndim))
    fs, root = fsspec.core.url_to_fs(source.location)
    return fs.exists(f"{root.rstrip('/')}/{array.path}/{array.metadata.encode_chunk_key(coords)}")


def _refuse_if_another_store(source: PixelSource) -> None:
    """Before reading checksums: refuse (exit 75) a store that is missing, or that has another
    `store_id` than the one planned on (a store without one: another root metadata document)."""
    if store_identity(source.location).partition("/")[0] != source.identity.partition("/")[0]:
        _refuse_if_replaced(source)


def _refuse_if_replaced(source: PixelSource) -> None:
    """A chunk that fails its check in a store that is no longer the planned one: say that (exit
    75: the run read another store, or one replaced under it), not that the store is damaged."""
    now = store_identity(source.location)
    if now == "missing":
        raise TransientError(
            f"{source.location}: not found by this worker (a path every worker must reach, "
            "or a store removed during the run); nothing was written"
        )
    if now != source.identity:
        raise TransientError(
            f"{source.location}: not the store this run planned on (replaced during the run, or another "
            "store at that path on this worker); nothing was written: run the command again"
        )


def pixel_slice(array: zarr.Array, start: int, stop: int) -> tuple:
    """The selection of pixels start:stop of a pixel array ((model,) pixel, channel)."""
    return (slice(None),) * (array.ndim - 2) + (slice(start, stop),)


def _bad_chunk(source: PixelSource, index: int, start: int, stop: int, problem: str) -> InputError:
    return InputError(
        f"{source.location}/{source.name}: chunk {index} (pixels {start}:{stop}) is {problem}; "
        "the store is damaged: write it again (the command that made it, with --overwrite)"
    )


def chunk_spans(
    offsets: np.ndarray, counts: np.ndarray, label_of_image: np.ndarray, chunk_lengths: tuple[int, ...]
) -> list[list[Span]]:
    """Per chunk of the given lengths, the spans of its pixels, labelled by `label_of_image`, of
    images lying back to back at `offsets` with `counts` pixels each (`schema.ImageIndex`'s);
    neighbouring images of one label share a span."""
    starts, stops = np.asarray(offsets), np.asarray(offsets) + np.asarray(counts)
    chunk_stops = np.cumsum(chunk_lengths, dtype=np.int64)
    chunk_starts = chunk_stops - np.asarray(chunk_lengths, dtype=np.int64)
    # the images a chunk holds are a run of consecutive images: found by bisection, O(images + chunks)
    firsts = np.searchsorted(stops, chunk_starts, side="right")
    ends = np.searchsorted(starts, chunk_stops, side="left")
    per_chunk = []
    for chunk_start, chunk_stop, first, end in zip(chunk_starts.tolist(), chunk_stops.tolist(), firsts.tolist(), ends.tolist()):
        spans: list[Span] = []
        for i in range(first, end):
            if stops[i] <= chunk_start:  # an image of no pixels
                continue
            start, stop = int(max(starts[i], chunk_start) - chunk_start), int(min(stops[i], chunk_stop) - chunk_start)
            label = int(label_of_image[i])
            if spans and spans[-1].label == label and spans[-1].stop == start:
                spans[-1] = spans[-1]._replace(stop=stop)
            else:
                spans.append(Span(start, stop, label))
        per_chunk.append(spans)
    return per_chunk


def image_folds(n_images: int, n_folds: int) -> np.ndarray:
    """Fold of each image for cross-validation by image: image i (in store order) is in fold i % n_folds."""
    return np.arange(n_images) % n_folds


def reduce_tasks(n_parts: int, fan_in: int = MERGE_FAN_IN) -> int:
    """The merge tasks of `tree_reduce` of `n_parts` parts."""
    merges = 0
    while n_parts > 1:
        n_parts = -(-n_parts // fan_in)
        merges += n_parts
    return merges


def tree_reduce(parts: list[Delayed], combine, fan_in: int = MERGE_FAN_IN) -> Delayed:
    """Combine delayed parts in a tree of `fan_in`-way merges (bounded memory per merge task),
    written as one graph layer (see `graph_tasks`)."""
    if len(parts) == 1:
        return parts[0]
    name, layer, keys, level = f"tree-{uuid.uuid4().hex}", {}, [part.key for part in parts], 0
    while len(keys) > 1:
        merged = [(name, level, i) for i in range(-(-len(keys) // fan_in))]
        layer.update({key: (combine, *keys[i * fan_in : (i + 1) * fan_in]) for i, key in enumerate(merged)})
        keys, level = merged, level + 1
    return Delayed(keys[0], HighLevelGraph.from_collections(name, layer, dependencies=parts), layer=name)
