"""What lets a reader trust a store: a checksum of every pixel chunk where it was written, and the
identity of the store a run planned on.

- Chunk checksums. Every task that writes chunk `i` of the pixel arrays of a store (ingest,
  predict, apply, appends) also writes row `i` of `chunk_xxh3` (dims chunk, pixel_variable): the
  XXH3-64 hash of each array's chunk as written (its decoded bytes, C order, seeded with `i`:
  `SEEDED_BY_POSITION`). A reader checks every
  chunk it reads against the row of its position (`chunks.read_pixels`): a missing chunk (Zarr
  would read it as the fill value), a truncated or corrupt one, or a valid chunk of another
  position or store is refused in one line naming the array and the chunk. XXH3 (the `xxhash`
  package) hashes about 30 GB/s on one core here, 8x zlib's CRC-32: hashing is about 2% of fit and
  of apply, the fastest pass over the same bytes (`benchmarks/integrity.py`).
- Store identity. A store gets a random `store_id` when it is committed and a `generation`
  that every later commit to it (an append) increments. A plan records the identity of each store
  it reads (`store_identity`); a run refuses with exit 75 (`refuse_changed`) when a store it read is
  no longer the one planned, before committing anything. Stores written before these attributes
  are identified by the digest of their root metadata, which an append or a replacement changes too.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import fsspec
import numpy as np
import xxhash

from ensir_flow.errors import InputError, TransientError

if TYPE_CHECKING:
    import zarr

#: The array of a store's chunk checksums: (chunk, pixel_variable) uint64, one chunk per row.
CHUNK_CHECKSUMS = "chunk_xxh3"
#: Its attribute listing the pixel variables of its columns, in order.
CHECKSUMMED_VARIABLES = "variables"
#: Store attribute holding the checksums of the last chunk ({"chunk": i, "xxh3": [...]}), which
#: readers use instead of its row (see `resumable.with_checksum_tail`).
CHECKSUM_TAIL = "chunk_xxh3_tail"
#: Attribute of `CHUNK_CHECKSUMS` in the stores written since checksums are seeded with their
#: chunk's index: a chunk moved to another position together with its row of checksums fails
#: there. Stores without it (and appends to them) keep unseeded checksums.
SEEDED_BY_POSITION = "seeded_by_chunk_index"
ROOT_METADATA = "zarr.json"


def chunk_checksum(values: np.ndarray, seed: int = 0) -> int:
    """The XXH3-64 hash of a chunk's values (its bytes in C order, as written and as read back),
    seeded with `seed` (its chunk's index where its store says so: `checksum_seed`)."""
    return xxhash.xxh3_64_intdigest(np.ascontiguousarray(values).data, seed=seed)


def checksum_seed(checksums: zarr.Array, index: int) -> int:
    """The seed of chunk `index`'s checksums in the opened `CHUNK_CHECKSUMS` array: the index
    where the array is `SEEDED_BY_POSITION`, else 0 (XXH3-64's default)."""
    return index if checksums.attrs.get(SEEDED_BY_POSITION) else 0


def checksum_template(n_chunks: int, variables: list[str]):
    """The lazy, unwritten `CHUNK_CHECKSUMS` variable (dims, data, attrs) of a store being written,
    in chunks of one row (Zarr's chunks are the dask chunks): each written by the task of its chunk."""
    import dask.array

    return (
        ("chunk", "pixel_variable"),
        dask.array.zeros((n_chunks, len(variables)), dtype=np.uint64, chunks=(1, -1)),
        {
            "long_name": "XXH3-64 checksum of each pixel variable's chunk as written",
            CHECKSUMMED_VARIABLES: list(variables),
            SEEDED_BY_POSITION: True,
            "description": "XXH3-64 of the chunk's decoded bytes (C order), seeded with i; row i is chunk i along pixel",
        },
    )


def new_identity() -> dict:
    """The identity attributes of a store being committed for the first time."""
    return {"store_id": uuid.uuid4().hex, "generation": 1}


def next_generation(attrs: dict) -> dict:
    """The identity attributes after one more commit to a store with attributes `attrs`."""
    if "store_id" not in attrs:
        return new_identity()
    return {"store_id": attrs["store_id"], "generation": int(attrs.get("generation", 1)) + 1}


def store_identity(path: str) -> str:
    """The identity of the store at `path` now (one read of its root `zarr.json`): `store_id/generation`,
    or for a store written without them the digest of its root metadata document."""
    fs, root = fsspec.core.url_to_fs(str(path))
    try:
        document = fs.cat_file(f"{root.rstrip('/')}/{ROOT_METADATA}")
        attrs = json.loads(document).get("attributes") or {}
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError, AttributeError) as error:
        raise InputError(f"{path}: root metadata unreadable ({type(error).__name__})") from None
    if "store_id" in attrs:
        return f"{attrs['store_id']}/{attrs.get('generation', 1)}"
    return "metadata-sha256:" + hashlib.sha256(document).hexdigest()


def refuse_changed(path: str, planned: str) -> None:
    """Refuse (exit 75) when the store at `path` is not the one this run planned on."""
    now = store_identity(path)
    if now != planned:
        what = "removed" if now == "missing" else "replaced or changed"
        raise TransientError(f"{path}: {what} while this run read it; nothing was written: run the command again")


@dataclass(frozen=True)
class ChunkChecksums:
    """The XXH3-64 checksums the writer of a store recorded for the chunks of one pixel variable
    (`integrity`): column `column` of its `chunk_xxh3` array opened as committed, and the
    committed checksum of its last chunk (`tail`: chunk, checksum), which an append rewrites.
    Tasks read the rows of the chunks they read (`rows`): a store of 10^6 chunks holds 10^6 rows
    of one object each, minutes to read on the client."""

    array: zarr.Array
    column: int
    tail: tuple[int, int] | None
    location: str

    def seed(self, index: int) -> int:
        """The seed chunk `index`'s checksum was made with (`checksum_seed`)."""
        return checksum_seed(self.array, index)

    def rows(self, first: int, end: int) -> np.ndarray:
        """The checksums of chunks first:end (those the array holds)."""
        from .zarr_adapter import rows_of

        end = min(end, self.array.shape[0])
        if end <= first:
            return np.zeros(0, dtype=np.uint64)
        values = np.asarray(rows_of(self.location, self.array, first, end)[:, self.column], dtype=np.uint64)
        if self.tail is not None and first <= self.tail[0] < end:
            values[self.tail[0] - first] = self.tail[1]
        return values


def checksums_for(group: zarr.Group, variable: str, location: str) -> ChunkChecksums | None:
    """The `ChunkChecksums` of `variable` in the group opened from the store at `location`, or
    None where the store has none for it (written before chunk checksums)."""
    if CHUNK_CHECKSUMS not in group:
        return None
    array = group[CHUNK_CHECKSUMS]
    names = list(array.attrs.get(CHECKSUMMED_VARIABLES) or ())
    if variable not in names:
        return None
    column, tail = names.index(variable), group.attrs.get(CHECKSUM_TAIL)
    return ChunkChecksums(array, column, None if tail is None else (int(tail["chunk"]), int(tail["xxh3"][column])), location)
