"""The one write ensir-flow needs that zarr's public API lacks, built on zarr internals kept here.

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
"""

from __future__ import annotations

import asyncio
import dataclasses

import fsspec
import zarr
import zarr.api.asynchronous
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
