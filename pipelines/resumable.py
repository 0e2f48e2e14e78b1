"""Outputs whose chunks the tasks write themselves: resumable outputs and appends, each committed
by one write of its root `zarr.json` (`zarr_adapter.commit_metadata`), which readers open the
store by (`stores.open_store`).

- Resumable outputs (ingest, predict, apply) are written into the fixed staging location of
  their target (`resumable_location`), which stays across runs: a completion mark per chunk,
  written after the chunk (`write_chunk_then_mark`), tells the next run of the same inputs which
  chunks are done (`resumable_marks`), so a killed run loses only the chunks it was writing. Once
  every chunk is marked, `commit_resumable` commits the staging and moves it into place
  (`commit.commit`).
- Appends (`ingest --append`, `predict --append`, apply's update of its output) write past the
  store's committed extent and commit with a single write of the root `zarr.json` (attributes
  and the consolidated metadata every reader uses): see `committed_append`. A killed append
  leaves the store as it was.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import fsspec
import numpy as np
import zarr

from .chunks import pixel_slice
from .commit import commit, exists, remove
from .integrity import CHECKSUM_TAIL, CHUNK_CHECKSUMS, chunk_checksum, new_identity, next_generation
from .stores import open_group_as_committed
from .targets import as_location, sibling
from .zarr_adapter import commit_metadata

if TYPE_CHECKING:
    import xarray as xr


def resumable_location(path: str) -> str:
    """The fixed staging location of `path` that an interrupted run leaves for the next one."""
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
        """The arrays, in the order of `names`, opened to write whole chunks (a metadata read each)."""
        return [None if name is None else open_array_for_writing(self.location, name) for name in self.names]


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
    image names and sizes); else None. Reads only: a plan asks it what a run would resume."""
    staging = resumable_location(path)
    if not exists(staging):
        return None
    try:
        group = zarr.open_group(staging, mode="r", use_consolidated=False)
        if all(group.attrs.get(key) == value for key, value in provenance.items()) and all(
            group[name][...].tolist() == np.asarray(values).tolist() for name, values in (variables or {}).items()
        ):
            return group[COMPLETE][:].astype(bool)
    except Exception:  # noqa: BLE001 - anything unreadable is stale staging
        pass
    return None


def resumable_marks(path: str, provenance: dict, variables: dict | None = None) -> np.ndarray | None:
    """`staged_marks`, after removing whatever staging is there when it holds none (a run of other
    inputs, or anything unreadable). The caller holds the lock of `path`."""
    marks = staged_marks(path, provenance, variables)
    if marks is None and exists(resumable_location(path)):
        remove(resumable_location(path))
    return marks


def start_resumable(path: str, template: xr.Dataset, encoding: dict, n_chunks: int) -> str:
    """Write the template of a resumable output (every variable but the chunk-written ones, left
    lazy in `template`) into the staging of `path`, with one unwritten completion mark per chunk
    (an unwritten mark reads 0: completion is never inferred from data, since Zarr reads an
    unwritten chunk as zeros). The attributes (which `resumable_marks` recognises a run by) are
    written last, with the consolidated metadata, so a template cut short is never resumed.
    Returns the staging location."""
    import dask.array

    staging = resumable_location(path)
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
    template.attrs = {}
    write_dataset(template, staging, {**encoding, COMPLETE: {"chunks": (1,)}})
    commit_metadata(staging, attrs)
    return staging


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
        checksums[index] = np.array([chunk_checksum(values) for values in written], dtype=np.uint64)
    for array, values in records:
        array[index] = values
    marks[index] = 1


def record_checksums(arrays: list, checksums, index: int, start: int, stop: int) -> None:
    """In a task: row `index` of `checksums` from chunk `index` (pixels start:stop) of each of
    `arrays` as it is stored now (for writes that do not hold the chunk's values: `da.store`)."""
    checksums[index] = np.array([chunk_checksum(array[pixel_slice(array, start, stop)]) for array in arrays], dtype=np.uint64)


def with_checksum_tail(path: str, attrs: dict, n_chunks: int) -> dict:
    """`attrs` with the checksums of chunk `n_chunks - 1` of the store at `path` copied into
    `CHECKSUM_TAIL`, where readers take the last chunk's checksums from (`integrity.checksums_for`):
    an append rewrites the store's last chunk, if partial, and its row of checksums before its
    commit, so a committed reader must not depend on that row (unchanged where the store has no
    checksums)."""
    group = zarr.open_group(str(path), mode="r", use_consolidated=False)
    if CHUNK_CHECKSUMS not in group or not n_chunks:
        return attrs
    return {
        **attrs,
        CHECKSUM_TAIL: {"chunk": int(n_chunks - 1), "xxh3": [int(value) for value in group[CHUNK_CHECKSUMS][n_chunks - 1]]},
    }


def commit_resumable(
    path: str, keep_marks: bool = True, values: dict | None = None, drop: tuple[str, ...] = (), attrs: dict | None = None
) -> None:
    """Move the staging of `path` into place once every chunk is marked complete (caller holds the
    lock). First `values` (name -> every value of that array) are written; then, without
    `keep_marks`, the marks are deleted (the store's layout has none), then the arrays named in
    `drop`, and the metadata is committed with `attrs` (default: the staging's), a new store
    identity (`integrity.new_identity`) and the last chunk's checksums (`with_checksum_tail`).
    The marks go first: a run killed after that finds no staging to resume (`resumable_marks`) and
    starts over."""
    staging = resumable_location(path)
    marks = zarr.open_array(store=staging, path=COMPLETE, mode="r")[:]
    if not marks.all():
        raise RuntimeError(f"{staging}: chunks left unmarked after every task succeeded; not committing")
    group = zarr.open_group(staging, mode="r+", use_consolidated=False)
    for name, array_values in (values or {}).items():
        group[name][...] = array_values
    for name in (*(() if keep_marks else (COMPLETE,)), *drop):
        del group[name]
    attrs = dict(group.attrs) if attrs is None else attrs
    commit_metadata(staging, with_checksum_tail(staging, {**attrs, **new_identity()}, len(marks)))
    commit(staging, path)
