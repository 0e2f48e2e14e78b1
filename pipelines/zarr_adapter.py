"""The one write ensir-flow needs that zarr's public API lacks, built on zarr internals kept here.

Committing a store (`resumable.committed_append`, `resumable.commit_resumable`,
`lut_io.write_lut`) is ONE write of the root `zarr.json` holding both the group's attributes and
the consolidated metadata of its arrays: readers open a store by that document
(`stores.open_store`), so its attributes (generation, identity, checksums of the last chunk) and
its arrays' shapes must change together. zarr 3.1's `consolidate_metadata` writes the
consolidated metadata with the attributes already stored, so new attributes would need a second
write, and a reader between the two would see one without the other. The zarr internals used
(`zarr.core.group.ConsolidatedMetadata`, `zarr.core.sync.sync`, a group's `store_path` and its
metadata's `to_buffer_dict`) are used nowhere else; tests/test_zarr_adapter.py pins what is
relied on, so a zarr release that changes it fails there.
"""

from __future__ import annotations

import dataclasses

import zarr
import zarr.api.asynchronous
from zarr.buffer import default_buffer_prototype
from zarr.core.group import ConsolidatedMetadata
from zarr.core.sync import sync

from .integrity import ROOT_METADATA


def commit_metadata(path: str, attrs: dict) -> None:
    """Commit a store's current arrays: ONE write of the root `zarr.json` holding `attrs` and the
    consolidated metadata of every array as their own metadata now says (zarr's own
    `consolidate_metadata` would need a second write for the attributes)."""

    async def commit():
        group = await zarr.api.asynchronous.open_group(str(path), mode="r+", use_consolidated=False)
        members = {name: member.metadata async for name, member in group.members(use_consolidated_for_children=False)}
        metadata = dataclasses.replace(
            group.metadata, attributes=attrs, consolidated_metadata=ConsolidatedMetadata(metadata=members)
        )
        (document,) = metadata.to_buffer_dict(default_buffer_prototype()).values()
        await group.store_path.store.set(f"{group.store_path.path}/{ROOT_METADATA}".lstrip("/"), document)

    sync(commit())
