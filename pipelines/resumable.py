"""Outputs whose chunks the tasks write themselves: resumable outputs and appends, each committed
by one write of its root `zarr.json` (`zarr_adapter.commit_metadata`), which readers open the
store by (`stores.open_store`).

- Resumable outputs (ingest, predict, apply) are written into a location that stays across runs
  (`resumable_location`): a completion mark per chunk, written after the chunk
  (`write_chunk_then_mark`), tells the next run of the same inputs which chunks are done
  (`resumable_marks`), so a killed run loses only the chunks it was writing. Once every chunk is
  marked, `commit_resumable` commits it. On a local disk, or to replace a store, that location is
  the fixed staging beside the target (`.NAME.partial`), moved into place by the commit
  (`commit.commit`). On object storage, where no store is there yet, it is the target itself: the
  arrays are written in place, the commit is the one write of the root `zarr.json` (a number of
  requests bounded by the arrays, not the chunks), and the staging beside holds the run's record
  (its attributes, which a resumed run is recognised by, and the template of its arrays).
- Appends (`ingest --append`, `predict --append`, apply's update of its output) write past the
  store's committed extent and commit with a single write of the root `zarr.json` (attributes
  and the consolidated metadata every reader uses): see `committed_append`. A killed append
  leaves the store as it was.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import fsspec
import numpy as np
import zarr
from fsspec.implementations.local import LocalFileSystem

from ensir_flow.errors import InputError, TransientError

from .chunks import pixel_slice
from .commit import commit, exists, remove
from .integrity import (
    CHECKSUM_TAIL,
    CHUNK_CHECKSUMS,
    ROOT_METADATA,
    checksum_seed,
    chunk_checksum,
    new_identity,
    next_generation,
)
from .stores import open_group_as_committed
from .targets import WRITTEN_IN_PLACE, as_location, describe, sibling
from .zarr_adapter import commit_metadata

if TYPE_CHECKING:
    import xarray as xr


def resumable_location(path: str) -> str:
    """Where the tasks of a resumable output of `path` write its arrays; the same for the next run
    of an interrupted one.

    On a local disk, and where a store is at `path` already (`--overwrite`) or a retired one waits
    to be put back (`.NAME.replaced`, see `commit`), the fixed staging `.NAME.partial` beside it,
    moved into place by the commit. On object storage otherwise, `path` itself: the arrays are
    written in place and no reader finds a store there until the commit writes its root
    `zarr.json` (`targets.staged_in_place`). Decided by the state of `path` now: under the lock of
    `path` it holds for the run (a plan that named it earlier must find it unchanged there)."""
    fs, root = fsspec.core.url_to_fs(str(path))
    if _in_place(fs, root):
        return str(path)
    return as_location(fs, sibling(root, "partial"), path)


def _in_place(fs, root: str) -> bool:
    if isinstance(fs, LocalFileSystem):
        return False
    fs.invalidate_cache(root)
    return not fs.exists(f"{root}/{ROOT_METADATA}") and not fs.exists(sibling(root, "replaced"))


def _staging(path: str) -> str:
    """The staging `.NAME.partial` beside `path`: the whole output, or, written in place, its record."""
    fs, root = fsspec.core.url_to_fs(str(path))
    return as_location(fs, sibling(root, "partial"), path)


#: Zarr's array configuration for our writes. By default Zarr compares every chunk with the fill
#: value before writing it, to skip "empty" ones: that costs as much as encoding it with lz4, and our
#: chunks are never empty in that sense (a zero pixel is data).
WRITE_CONFIG = {"write_empty_chunks": True}


def write_dataset(ds: xr.Dataset, path: str, encoding: dict | None = None):
    """Lazy write of `ds` as a new Zarr v3 store; returns the delayed object to compute."""
    with warnings.catch_warnings():
        # Consolidated metadata is not in the v3 spec yet, but xarray reads it to open stores quickly.
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        return ds.to_zarr(
            str(path),
            mode="w-",
            zarr_format=3,
            encoding=encoding or {},
            compute=False,
            write_empty_chunks=WRITE_CONFIG["write_empty_chunks"],
        )


def resize_arrays(path: str, lengths: dict[str, int]) -> None:
    """Resize every array of the store along the named dimensions (zarr deletes whole chunks past a
    shrunk end; readers never look past the committed extent, so what remains there is unread)."""
    group = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    for _, array in group.arrays():
        dims = array.metadata.dimension_names or array.attrs.get("_ARRAY_DIMENSIONS") or ()
        shape = tuple(lengths.get(dim, size) for dim, size in zip(dims, array.shape))
        if shape != array.shape:
            array.resize(shape)


def open_array_for_writing(store: str, name: str):
    """Array `name` of the Zarr group at `store`, opened to write whole chunks (see WRITE_CONFIG)."""
    return zarr.open_array(store=str(store), path=name, mode="r+").with_config(WRITE_CONFIG)


@dataclass(frozen=True)
class ArraysToWrite:
    """Arrays of the Zarr group at `location` that a pass's tasks write, named, not opened: each
    task opens them when it runs (`open`), so a plan builds its tasks before what they write
    exists (a resumable output's staging is made under the writer's lock, once the run starts).
    A name None stands for an array the output does not have (a task gets None for it)."""

    location: str
    names: tuple[str | None, ...]

    def open(self) -> list:
        """The arrays, in the order of `names`, opened to write whole chunks (a metadata read each).
        A location this worker does not find (a staging made on the client at a path the workers
        cannot reach, or removed during the run) is refused (exit 75), as readers refuse a store
        they do not find (`chunks.read_pixels`)."""
        try:
            return [None if name is None else open_array_for_writing(self.location, name) for name in self.names]
        except FileNotFoundError:
            raise TransientError(
                f"{self.location}: not found by this worker (a path every worker must reach, or one removed "
                "during the run); nothing was committed: run the command again"
            ) from None


def committed_append(
    path: str, committed: dict[str, int], grown: dict[str, int], write_arrays, image_values: dict, attrs: dict
) -> None:
    """Append to the store at `path` so that every reader sees it as before or as after, never between.

    1. Cut every array back to the `committed` lengths (what a killed append left past them).
    2. Grow the arrays to the `grown` lengths: their own metadata only; the root `zarr.json`,
       which readers open the store by (`stores.open_store`), still holds the committed shapes.
    3. `write_arrays(arrays)` (arrays: name -> zarr array opened for writing) writes the new chunks,
       all past the committed extent except the store's last partial chunk, which is rewritten whole
       (one atomic object write) with its committed part unchanged.
    4. Write the tail of each image variable (`image_values`: name -> the new values along `image`).
    5. Commit: one write of the root `zarr.json` with `attrs` and the arrays' new shapes.
    A failure before 5 cuts the arrays back again; a kill before 5 leaves the committed store as
    it was, and the next append cuts back first. The commit moves the store to its next generation
    (`integrity.next_generation`) and records the last chunk's checksums (`with_checksum_tail`).
    """
    previous = dict(open_group_as_committed(str(path)).attrs)
    resize_arrays(path, committed)
    try:
        resize_arrays(path, grown)
        group = zarr.open_group(str(path), mode="r+", use_consolidated=False)
        write_arrays({name: array.with_config(WRITE_CONFIG) for name, array in group.arrays()})
        start, stop = committed["image"], grown["image"]
        for name, values in image_values.items():
            group[name][..., start:stop] = values
    except BaseException:
        resize_arrays(path, committed)
        raise
    attrs = {**attrs, **next_generation(previous)}
    commit_metadata(path, with_checksum_tail(path, attrs, grown.get("chunk", 0)))


#: The array of completion marks of a resumable output: one per chunk, written after the chunk.
COMPLETE = "chunk_complete"


def staged_marks(path: str, provenance: dict, variables: dict | None = None) -> np.ndarray | None:
    """Which chunks the staging of `path` holds complete, if it holds a run with the same inputs
    (`provenance`, among its attributes, and the values of `variables`: name -> values, e.g. the
    image names and sizes), written where `resumable_location` says now; else None. Reads only:
    a plan asks it what a run would resume."""
    staging = _staging(path)
    if not exists(staging):
        return None
    location = resumable_location(path)
    try:
        group = zarr.open_group(staging, mode="r", use_consolidated=False)
        if (
            group.attrs.get(WRITTEN_IN_PLACE, False) is (location != staging)
            and all(group.attrs.get(key) == value for key, value in provenance.items())
            and all(group[name][...].tolist() == np.asarray(values).tolist() for name, values in (variables or {}).items())
        ):
            return _marks_at(location)
    except Exception:  # noqa: BLE001 - anything unreadable is stale staging
        pass
    return None


def _marks_at(location: str) -> np.ndarray:
    """The completion marks of the output at `location`, as booleans. On object storage, where a
    read per mark is a request per chunk, one listing (a request per thousand marks) shows each
    mark's ETag, a digest of its bytes: when every mark is there with the same ETag as the first,
    which reads 1, all are 1 (a mark written 0, or a store whose ETags are no digests, has
    another, and the marks are read)."""
    marks = zarr.open_array(store=location, path=COMPLETE, mode="r")
    fs, root = fsspec.core.url_to_fs(str(location))
    if not isinstance(fs, LocalFileSystem) and marks.shape[0]:
        prefix = f"{root}/{COMPLETE}/c"
        listing = fs.find(prefix, detail=True)
        tags = {str(info.get("ETag") or "") for info in listing.values()}
        if len(tags) == 1 and "" not in tags and set(listing) == {f"{prefix}/{i}" for i in range(marks.shape[0])}:
            if marks[0] == 1:
                return np.ones(marks.shape[0], dtype=bool)
    return marks[:].astype(bool)


def resumable_marks(path: str, provenance: dict, variables: dict | None = None) -> np.ndarray | None:
    """`staged_marks`, after removing whatever staging is there when it holds none (a run of other
    inputs, or anything unreadable). The caller holds the lock of `path`."""
    marks = staged_marks(path, provenance, variables)
    if marks is None:
        remove_staging(path)
    return marks


def remove_staging(path: str) -> None:
    """Remove the staging of `path` (the caller holds its lock). For a run written in place, its
    arrays under `path` go first (the staging, removed last, is what says they are that run's):
    all of them while no store is committed there, else those the committed store does not list
    (what a commit killed before its clean-up left, see `commit_resumable`). Nothing else under
    `path` is touched."""
    fs, root = fsspec.core.url_to_fs(str(path))
    staging = sibling(root, "partial")
    if not fs.exists(staging):
        return
    if (_root_metadata(fs, staging).get("attributes") or {}).get(WRITTEN_IN_PLACE) is True:
        fs.invalidate_cache()  # listings cached before the run wrote there
        kept = set((_root_metadata(fs, root).get("consolidated_metadata") or {}).get("metadata") or {})
        names = [entry.rstrip("/").rpartition("/")[2] for entry in fs.ls(staging, detail=False)]
        written = [f"{root}/{name}" for name in names if name != ROOT_METADATA and name not in kept]
        written = [prefix for prefix in written if fs.exists(prefix)]
        if written:
            fs.rm(written, recursive=True)
    remove(as_location(fs, staging, path))


def _root_metadata(fs, group: str) -> dict:
    """The root `zarr.json` of the group at `group` ({} where there is none)."""
    try:
        document = json.loads(fs.cat_file(f"{group}/{ROOT_METADATA}"))
    except (OSError, ValueError):
        return {}
    return document if isinstance(document, dict) else {}


def start_resumable(path: str, template: xr.Dataset, encoding: dict, n_chunks: int) -> str:
    """Write the template of a resumable output (every variable but the chunk-written ones, left
    lazy in `template`) into the staging of `path`, with one unwritten completion mark per chunk
    (an unwritten mark reads 0: completion is never inferred from data, since Zarr reads an
    unwritten chunk as zeros). The attributes (which `resumable_marks` recognises a run by) are
    written last, with the consolidated metadata, so a template cut short is never resumed.

    Written in place (`resumable_location`), the template's arrays are then copied under `path`
    (their metadata and the values of the small ones: objects bounded by the arrays, not the
    chunks), never its root `zarr.json`; the staging says so first (`WRITTEN_IN_PLACE`), so that
    what is copied is never taken for a target. Anything already under `path` is someone else's:
    refused, named, kept. Returns `resumable_location(path)`, where the tasks write."""
    import dask.array

    staging, location = _staging(path), resumable_location(path)
    in_place = location != staging
    fs, root = fsspec.core.url_to_fs(str(path))
    if in_place and fs.exists(root):
        raise InputError(
            f"{path}: is {describe(path)}, with no Zarr store; refusing to write a store over it (move it away, "
            "or name another output)"
        )
    attrs = dict(template.attrs)
    template = template.assign(
        {
            COMPLETE: (
                "chunk",
                # one dask chunk (the encoding gives a Zarr chunk per mark): never computed, and a
                # dask chunk per mark made writing the template a task per chunk (minutes at 10^6)
                dask.array.zeros(n_chunks, dtype=np.uint8, chunks=-1),
                {
                    "long_name": "chunk of pixels written",
                    "flag_values": [0, 1],
                    "flag_meanings": "not_written written",
                    "description": "1 once the chunk of pixels with this index is written",
                },
            )
        }
    )
    template.attrs = {WRITTEN_IN_PLACE: True} if in_place else {}
    write_dataset(template, staging, {**encoding, COMPLETE: {"chunks": (1,)}})
    if in_place:
        staged = sibling(root, "partial")
        objects = [name for name in fs.find(staged) if name != f"{staged}/{ROOT_METADATA}"]
        fs.copy(objects, [root + name[len(staged) :] for name in objects])
    commit_metadata(staging, {**attrs, WRITTEN_IN_PLACE: True} if in_place else attrs)
    return location


def write_chunk_then_mark(
    writes: list[tuple], marks, index: int, start: int, stop: int, records: list[tuple] = (), checksums=None
) -> None:
    """In a task: write pixels start:stop (one whole chunk along `pixel`, the second-last axis) of
    each array of `writes` [(array, values)], then row `index` of `checksums` (the XXH3-64 checksum of each
    array's chunk as written, in the order of `writes`; see `integrity`) and of each per-chunk
    array of `records` [(array, values)] (what the chunk was made from), then mark chunk `index`
    complete."""
    written = []
    for array, values in writes:
        values = np.asarray(values, dtype=array.dtype)
        array[pixel_slice(array, start, stop)] = values
        written.append(values)
    if checksums is not None:
        seed = checksum_seed(checksums, index)
        checksums[index] = np.array([chunk_checksum(values, seed) for values in written], dtype=np.uint64)
    for array, values in records:
        array[index] = values
    marks[index] = 1


def record_checksums(arrays: list, checksums, index: int, start: int, stop: int) -> None:
    """In a task: row `index` of `checksums` from chunk `index` (pixels start:stop) of each of
    `arrays` as it is stored now (for writes that do not hold the chunk's values: `da.store`)."""
    seed = checksum_seed(checksums, index)
    checksums[index] = np.array(
        [chunk_checksum(array[pixel_slice(array, start, stop)], seed) for array in arrays], dtype=np.uint64
    )


def with_checksum_tail(path: str, attrs: dict, n_chunks: int) -> dict:
    """`attrs` with the checksums of chunk `n_chunks - 1` of the store at `path` copied into
    `CHECKSUM_TAIL`, where readers take the last chunk's checksums from (`integrity.checksums_for`):
    an append rewrites the store's last chunk, if partial, and its row of checksums before its
    commit, so a committed reader must not depend on that row (unchanged where the store has no
    checksums)."""
    if not n_chunks:
        return attrs
    try:
        checksums = zarr.open_array(store=str(path), path=CHUNK_CHECKSUMS, mode="r")
    except FileNotFoundError:
        return attrs
    return {**attrs, CHECKSUM_TAIL: {"chunk": int(n_chunks - 1), "xxh3": [int(value) for value in checksums[n_chunks - 1]]}}


def commit_resumable(
    path: str, keep_marks: bool = True, values: dict | None = None, drop: tuple[str, ...] = (), attrs: dict | None = None
) -> None:
    """Commit the output of `path` once every chunk is marked complete (caller holds the lock).
    First `values` (name -> every value of that array) are written; then, without `keep_marks`,
    the marks are deleted (the store's layout has none), then the arrays named in `drop`, and the
    metadata is committed with `attrs` (default: the staging's), a new store identity
    (`integrity.new_identity`) and the last chunk's checksums (`with_checksum_tail`). The marks go
    first: a run killed after that finds no staging to resume (`resumable_marks`) and starts over.

    From the staging, the commit moves the output into place (`commit.commit`). Written in place,
    the commit is the write of the root `zarr.json` under `path`, listing the arrays kept: only the
    metadata of the deleted arrays goes before it (one request each), their chunks and the staging
    after it (`remove_staging`): a clean-up, which a kill leaves to the next run of `path`, unseen
    by readers meanwhile."""
    staging, location = _staging(path), resumable_location(path)
    marks = _marks_at(location)
    if not marks.all():
        raise RuntimeError(f"{location}: chunks left unmarked after every task succeeded; not committing")
    deleted = (*(() if keep_marks else (COMPLETE,)), *drop)
    if location == staging:
        group = zarr.open_group(staging, mode="r+", use_consolidated=False)
        for name, array_values in (values or {}).items():
            group[name][...] = array_values
        for name in deleted:
            del group[name]
        attrs = dict(group.attrs) if attrs is None else attrs
        commit_metadata(staging, with_checksum_tail(staging, {**attrs, **new_identity()}, len(marks)))
        commit(staging, path)
        return
    fs, root = fsspec.core.url_to_fs(str(path))
    record = _root_metadata(fs, sibling(root, "partial"))
    for name, array_values in (values or {}).items():
        zarr.open_array(store=location, path=name, mode="r+")[...] = array_values
    for name in deleted:
        fs.rm_file(f"{root}/{name}/{ROOT_METADATA}")
    if attrs is None:
        attrs = {key: value for key, value in record["attributes"].items() if key != WRITTEN_IN_PLACE}
    kept = tuple(name for name in record["consolidated_metadata"]["metadata"] if name not in deleted)
    commit_metadata(location, with_checksum_tail(location, {**attrs, **new_identity()}, len(marks)), kept, like=staging)
    remove_staging(path)
