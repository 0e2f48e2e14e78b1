"""The one write ensir-flow needs that zarr's public API lacks, built on zarr internals kept here,
and one read that zarr makes slow.

Committing a store (`resumable.committed_append`, `resumable.commit_resumable`,
`lut_io.write_lut`) is ONE write of the root `zarr.json` holding both the group's attributes and
the consolidated metadata of its arrays: readers open a store by that document
(`stores.open_store`), so its attributes (generation, identity, checksums of the last chunk) and
its arrays' shapes must change together. zarr 3.1's `consolidate_metadata` writes the
consolidated metadata with the attributes already stored, so new attributes would need a second
write, and a reader between the two would see one without the other. The zarr internals used
(`zarr.core.group.ConsolidatedMetadata`, `zarr.core.sync.sync`,
`zarr.storage._common.make_store_path`, a group's `store_path` and its metadata's
`to_buffer_dict`) are used nowhere else; tests/test_zarr_adapter.py pins what is
relied on, so a zarr release that changes it fails there.

Reading a row of a few bytes through zarr (`rows_of`, for the chunk checksums every task reads)
goes through zarr's one event loop, where it waits behind the decoding of other threads' pixel
chunks: about 1.4 ms a row, and 10% of a fit. The row's object is read with fsspec and decoded
here instead, for the layouts ensir-flow writes (one row per chunk, `bytes` then optionally
`zstd`); any other layout is read through zarr.
"""

from __future__ import annotations

import asyncio
import dataclasses

import fsspec
import numpy as np
import zarr
import zarr.api.asynchronous
from numcodecs import Zstd
from zarr.buffer import default_buffer_prototype
from zarr.core.group import ConsolidatedMetadata
from zarr.core.sync import sync
from zarr.storage._common import make_store_path

from .integrity import ROOT_METADATA


def commit_metadata(path: str, attrs: dict, members: tuple[str, ...] | None = None, like: str | None = None) -> None:
    """Commit a store's current arrays: ONE write of the root `zarr.json` holding `attrs` and the
    consolidated metadata of every array as their own metadata now says (zarr's own
    `consolidate_metadata` would need a second write for the attributes).

    A store written in place (`resumable.resumable_location`) has no root `zarr.json` before this
    write: the group's other metadata is then taken from the group at `like` (its staging), and
    only the arrays named in `members` are committed (others under `path` are left out)."""

    async def commit():
        if like is None:
            group = await zarr.api.asynchronous.open_group(str(path), mode="r+", use_consolidated=False)
            metadata, store_path = group.metadata, group.store_path
            arrays = {name: member.metadata async for name, member in group.members(use_consolidated_for_children=False)}
        else:
            metadata = (await zarr.api.asynchronous.open_group(str(like), mode="r", use_consolidated=False)).metadata
            store_path = await make_store_path(str(path), mode="r+")
            opened = await asyncio.gather(
                *(zarr.api.asynchronous.open_array(store=str(path), path=name, mode="r") for name in members)
            )
            arrays = {name: array.metadata for name, array in zip(members, opened)}
        metadata = dataclasses.replace(metadata, attributes=attrs, consolidated_metadata=ConsolidatedMetadata(metadata=arrays))
        (document,) = metadata.to_buffer_dict(default_buffer_prototype()).values()
        await store_path.store.set(f"{store_path.path}/{ROOT_METADATA}".lstrip("/"), document)

    sync(commit())


def forget_listings(path: str) -> None:
    """Clear the directory listings that zarr's own file system object for `path` caches (s3fs
    keeps them per object; zarr's is the one made on the thread of its event loop). A tree
    deleted through another object, as the commit does, stays listed there, and zarr would then
    take a store written at the same place again for one that already holds data."""

    async def forget():
        fs, _ = fsspec.core.url_to_fs(str(path), asynchronous=True)
        fs.invalidate_cache()

    sync(forget())


def rows_of(location: str, array: zarr.Array, first: int, end: int) -> np.ndarray:
    """Rows first:end of the 2-D `array` of the store at `location`, as zarr reads them (an
    unwritten row reads as the fill value): each row's object read with fsspec and decoded here
    where the array has one row per chunk and the codecs ensir-flow writes, else through zarr."""
    names = [codec.to_dict() for codec in array.metadata.codecs]
    simple = [name["name"] for name in names] in (["bytes"], ["bytes", "zstd"])
    if not simple or array.chunks != (1, array.shape[1]) or names[0].get("configuration", {}).get("endian") != "little":
        return np.asarray(array[first:end])
    fs, root = fsspec.core.url_to_fs(location)
    keys = [f"{root.rstrip('/')}/{array.path}/{array.metadata.encode_chunk_key((row, 0))}" for row in range(first, end)]
    found = fs.cat(keys, on_error="omit") if len(keys) > 1 else _cat_one(fs, keys[0])
    values = np.full((end - first, array.shape[1]), array.metadata.fill_value, dtype=array.dtype)
    for i, key in enumerate(keys):
        if key in found:
            raw = found[key] if len(names) == 1 else _ZSTD.decode(found[key])
            values[i] = np.frombuffer(raw, dtype=array.dtype.newbyteorder("<"))
    return values


def _cat_one(fs, key: str) -> dict:
    try:
        return {key: fs.cat_file(key)}
    except FileNotFoundError:
        return {}


_ZSTD = Zstd()
