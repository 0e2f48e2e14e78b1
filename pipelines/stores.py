"""Opening ensir-flow's Zarr stores as last committed, with a clear message when there is none.

The consolidated metadata in a store's root `zarr.json` is its committed state: an append in
progress (or killed) has grown the arrays' own metadata but not it (`resumable.committed_append`),
so every reader opens a store by it. A store being replaced by a run that was interrupted, or one
whose root metadata is missing, is refused, saying what to do (see `commit`); so is one being
written in place on object storage, which has no root metadata until its commit
(`resumable.resumable_location`): there is no store there yet, for plain xarray either. Stores open with
xarray (`open_store`) or, for readers that need only the arrays and the index of images, with
zarr alone (`open_store_index`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings
from typing import TYPE_CHECKING

import dask.local
import fsspec
import numpy as np
import zarr

from ensir_flow.errors import InputError, first_line

from .integrity import ROOT_METADATA
from .targets import as_location, replaced_half_way, sibling, staged_in_place

if TYPE_CHECKING:
    import xarray as xr

# xarray (with pandas; dask.array comes with its first Variable: ~1.5 s of start-up together) is
# imported by the functions that use it: `evaluate` reads stores through `open_store_index`, with
# zarr alone, and needs neither.


def open_store(path: str, in_memory: bool = False, read_later: tuple[str, ...] = ()) -> xr.Dataset:
    """Open an ensir-flow Zarr store lazily (dask arrays), as last committed, with a clear message
    when it is not one; or, `in_memory`, read every array now into one numpy array each (a small
    store: through dask, each array's chunks would be read, then copied into one), except those
    named in `read_later`, left unread for the caller (`lut_io.read_lut` reads its weights
    itself).

    The consolidated metadata in the root `zarr.json` is the committed state: an append in
    progress (or killed) has grown the arrays' own metadata but not it (see
    `resumable.committed_append`).
    """
    import xarray as xr

    fs, root = _openable(path)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            ds = xr.open_zarr(str(path), consolidated=_has_consolidated_metadata(fs, root), chunks=None if in_memory else {})
            if in_memory:
                for name, variable in ds.variables.items():
                    if name not in read_later:
                        variable.load()
                return ds
    except Exception as error:
        raise unreadable_store(path, error) from None
    return _with_image_index_read(ds)


def _openable(path: str):
    """(file system, root) of the store at `path`; an InputError saying why when there is none."""
    fs, root = fsspec.core.url_to_fs(str(path))
    if not fs.exists(root) or replaced_half_way(fs, root):
        if fs.exists(sibling(root, "replaced")):
            raise InputError(
                f"{path}: missing: a run replacing it was interrupted; re-run that command (or "
                f"rename {as_location(fs, sibling(root, 'replaced'), path)} back)"
            )
        raise InputError(f"{path}: store not found")
    if staged_in_place(fs, root):
        raise InputError(
            f"{path}: store not found (a run writing it in place has not committed it; re-run that command to finish it)"
        )
    if not fs.exists(f"{root}/{ROOT_METADATA}"):
        raise InputError(
            f"{path}: not a Zarr store (no {ROOT_METADATA}; an interrupted write? re-run the command "
            "that writes it with --overwrite)"
        )
    return fs, root


def unreadable_store(path: str, error: Exception) -> InputError:
    """The one-line refusal of the store at `path` that zarr or xarray failed to read with `error`."""
    return InputError(f"{path}: not a readable Zarr store ({first_line(error)})")


def _with_image_index_read(ds: xr.Dataset) -> xr.Dataset:
    """`ds` with its per-image variables (dimension 'image', not 'pixel': sizes, offsets, file
    names, digests) read into memory now, on this thread. Every command reads them at once; read
    lazily, through dask's default scheduler, the first read imports distributed (~0.5 s of every
    command's start-up, even with --scheduler threads) to look for a client."""
    names = [name for name, variable in ds.data_vars.items() if "image" in variable.dims and "pixel" not in variable.dims]
    return ds.assign(ds[names].compute(scheduler=dask.local.get_sync)) if names else ds


@dataclasses.dataclass(frozen=True)
class StoredVariable:
    """One array of a store as `open_store_index` gives it: its dimensions, and its values read
    on first use (what `schema.check_store` and `ImageIndex.from_dataset` use of a variable)."""

    array: zarr.Array
    dims: tuple[str, ...]

    @property
    def sizes(self) -> dict[str, int]:
        return dict(zip(self.dims, self.array.shape))

    @property
    def chunks(self) -> tuple[tuple[int, ...], ...]:
        """Length of each chunk along each axis, as xarray gives them for a store it opened."""
        return tuple(
            (size,) * (length // size) + ((length % size,) if length % size else ())
            for length, size in zip(self.array.shape, self.array.chunks)
        )

    @functools.cached_property
    def values(self) -> np.ndarray:
        return self.array[...]


@dataclasses.dataclass(frozen=True)
class StoreIndex:
    """A store's attributes and variables, as last committed, read with zarr alone: enough to check
    it (`schema.check_store`) and find its images (`schema.ImageIndex.from_dataset`), which take it
    as they take an xarray Dataset, for commands whose tasks read their pixels straight from the
    arrays (`chunks.pixel_array`). No xarray, pandas or dask.array (~1.5 s of start-up)."""

    attrs: dict
    variables: dict[str, StoredVariable]

    def __contains__(self, name: str) -> bool:
        return name in self.variables

    def __getitem__(self, name: str) -> StoredVariable:
        return self.variables[name]

    @property
    def sizes(self) -> dict[str, int]:
        return {dim: size for variable in self.variables.values() for dim, size in variable.sizes.items()}


def open_group_as_committed(store: str) -> zarr.Group:
    """The Zarr group at `store` opened by its consolidated metadata when it has some (the
    committed state: an append in progress has grown the arrays' own metadata only)."""
    try:
        return zarr.open_group(store, mode="r", use_consolidated=True)
    except ValueError:
        return zarr.open_group(store, mode="r", use_consolidated=False)


def open_store_index(path: str) -> StoreIndex:
    """The `StoreIndex` of the ensir-flow store at `path`, refused as `open_store` refuses it. The
    arrays' shapes are those of the consolidated metadata when the store has it (the committed
    state, see `open_store`)."""
    fs, root = _openable(path)
    try:
        group = zarr.open_group(str(path), mode="r", use_consolidated=_has_consolidated_metadata(fs, root))
        variables = {
            name: StoredVariable(array, tuple(array.metadata.dimension_names or array.attrs.get("_ARRAY_DIMENSIONS") or ()))
            for name, array in group.arrays()
        }
        attrs = dict(group.attrs)
    except Exception as error:
        raise unreadable_store(path, error) from None
    return StoreIndex(attrs, variables)


def _has_consolidated_metadata(fs, root: str) -> bool:
    try:
        return json.loads(fs.cat_file(f"{root}/{ROOT_METADATA}")).get("consolidated_metadata") is not None
    except (OSError, ValueError, AttributeError):
        return False
