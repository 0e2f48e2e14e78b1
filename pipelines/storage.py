"""How ensir-flow writes: the protocols that keep every store and folder either as it was before a
command or as it is after it, whatever instant the command is killed at.

- New outputs (ingest, fit, lut import, export, report) are written into a fixed staging location
  beside the target (`.NAME.partial`) and moved into place when complete. On a local disk the move
  is a rename. Replacing an existing target (`--overwrite`) is two renames (target aside to
  `.NAME.replaced`, staging into place); a run killed between them is finished by the next writer
  of that target, and readers meanwhile refuse with a message saying so. On object storage (no
  rename) the move copies every object with the root `zarr.json` last, so the target's root
  metadata appears only once everything else is there.
- Every writer holds `.NAME.lock` (exclusive create) while it works: a second run to the same
  target is refused (TransientError: retry later); a lock left by a dead process on this host is
  taken over, and with it the stale staging that run left, which is removed.
- Appends (`ingest --append`) write past the store's committed extent and commit with a single
  write of the root `zarr.json` (attributes and the consolidated metadata every reader uses): see
  `committed_append`.
- Apply's output is resumable: its staging location stays across runs (see `resumable_location`).
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import dataclasses
import functools
import json
import os
import socket
import stat
import struct
import time
import warnings
from typing import TYPE_CHECKING

import dask.local
import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.group import ConsolidatedMetadata

from ensir_flow.errors import InputError, TransientError

from . import targets
from .integrity import CHECKSUM_TAIL, CHUNK_CHECKSUMS, chunk_checksum, new_identity, next_generation

if TYPE_CHECKING:
    import xarray as xr

    from ensir_flow.lut import Lut

# xarray (with pandas; dask.array comes with its first Variable: ~1.5 s of start-up together) and
# the LUT module are imported by the functions that use them: `evaluate` reads stores through
# `open_store_index`, with zarr alone, and needs neither.

ROOT_METADATA = "zarr.json"


def exists(path: str) -> bool:
    fs, root = fsspec.core.url_to_fs(str(path))
    return fs.exists(root)


def refuse_existing(path: str, overwrite: bool, kind: str | None = None) -> None:
    """Fail before any work when the output exists and the user did not ask to replace it, or when
    `overwrite` would replace what is not ensir-flow's output of `kind` (None: of any kind; see
    `targets.refuse_replacing`). A symbolic link is never a target (`targets.refuse_link`)."""
    targets.refuse_link(path)
    if exists(path):
        if not overwrite:
            raise InputError(f"{path}: already exists (pass --overwrite to replace it)")
        targets.refuse_replacing(path, kind)


def _sibling(root: str, tag: str) -> str:
    """`.NAME.tag` beside `root`: where a writer of `root` keeps its staging, lock or retired copy."""
    parent, _, name = root.rstrip("/").rpartition("/")
    return f"{parent}/.{name}.{tag}" if parent else f".{name}.{tag}"


def _as_location(fs, path: str, like: str) -> str:
    """`path` (as fsspec strips it) in the form of `like`: a URL if `like` is one."""
    return fs.unstrip_protocol(path) if "://" in str(like) else path


def _move_tree(fs, source: str, destination: str) -> None:
    """Move a directory tree: a rename where the file system has one; else copy every file, the
    root `zarr.json` last (a Zarr store is complete once it is there), then delete the source."""
    if isinstance(fs, LocalFileSystem):
        fs.mv(source, destination, recursive=True)
        return
    files = sorted(fs.find(source), key=lambda path: path == f"{source}/{ROOT_METADATA}")
    for path in files:
        fs.copy(path, destination + path[len(source):])
    fs.rm(source, recursive=True)


def _remove_tree(fs, root: str) -> None:
    """Delete a directory tree, its root `zarr.json` first, so a half-deleted store is never read as one."""
    if fs.exists(f"{root}/{ROOT_METADATA}"):
        fs.rm(f"{root}/{ROOT_METADATA}")
    fs.rm(root, recursive=True)


def _finish_interrupted_replacement(fs, root: str) -> None:
    """A run killed between moving the old target aside and moving the new one into place left
    `.NAME.replaced` and no target: put the old one back (the command that was replacing it never
    completed). With both present, the retired copy is stale: remove it."""
    retired = _sibling(root, "replaced")
    if fs.exists(retired):
        if fs.exists(root):
            _remove_tree(fs, retired)
        else:
            _move_tree(fs, retired, root)


def _exchange(first: str, second: str) -> bool:
    """Swap two local paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the
    system or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0
    except (AttributeError, OSError):
        return False


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _move_into_place(fs, staging: str, root: str) -> None:
    """Replace `root` by `staging`: on a local disk one atomic exchange where the system has it (the
    old target, left at the staging location, is then deleted), else two renames (see
    `_finish_interrupted_replacement`); on object storage copies (see `_move_tree`)."""
    if isinstance(fs, LocalFileSystem) and fs.exists(root) and _exchange(staging, root):
        _remove_tree(fs, staging)
        return
    if fs.exists(root):
        retired = _sibling(root, "replaced")
        _move_tree(fs, root, retired)
        _move_tree(fs, staging, root)
        _remove_tree(fs, retired)
    else:
        _move_tree(fs, staging, root)


@contextlib.contextmanager
def staged_output(path: str, overwrite: bool = False, kind: str | None = None):
    """Yield the staging location of `path`; move it to `path` only if the block succeeds.

    Holds the writer's lock throughout (`exclusive_lock`); staging left by a killed run is removed.
    A target found at the move (with `overwrite`) is replaced only if it is ensir-flow's output of
    `kind`, by default the kind of what was staged (`targets.kind_of`): one that appeared or was
    swapped while the block ran is refused, not deleted.
    """
    with exclusive_lock(path):
        fs, root = fsspec.core.url_to_fs(str(path))
        _finish_interrupted_replacement(fs, root)
        refuse_existing(path, overwrite, kind)
        staging = _sibling(root, "partial")
        if fs.exists(staging):
            fs.rm(staging, recursive=True)
        try:
            yield _as_location(fs, staging, path)
            refuse_existing(path, overwrite, kind or targets.kind_of(_as_location(fs, staging, path)))
        except BaseException:
            _remove_staging(fs, staging)
            raise
        _move_into_place(fs, staging, root)


@contextlib.contextmanager
def staged_update(path: str):
    """Yield a location where files are added to the existing folder `path`, which then changes in
    one step. On a local disk: a staging folder holding hard links to every file of `path` (existing
    files are neither copied nor rewritten), exchanged with `path` atomically when the block
    succeeds (two renames where the system has no exchange). Elsewhere (object storage, where each
    object write is atomic but a set of them is not) `path` itself: a run killed half-way leaves
    some of the new files there, which the re-run writes again. Holds the lock of `path`."""
    with exclusive_lock(path):
        fs, root = fsspec.core.url_to_fs(str(path))
        if not isinstance(fs, LocalFileSystem):
            yield path
            return
        staging = _sibling(root, "partial")
        if fs.exists(staging):
            fs.rm(staging, recursive=True)
        os.makedirs(staging)
        try:
            for entry in os.scandir(root):
                os.link(entry.path, os.path.join(staging, entry.name))
            yield staging
        except BaseException:
            _remove_staging(fs, staging)
            raise
        _move_into_place(fs, staging, root)


def _remove_staging(fs, staging: str, attempts: int = 5) -> None:
    """Remove staging after a failure. Writes of the failed run may still be settling (Zarr writes
    a store's metadata concurrently, each to a temporary file then renamed), so files can vanish
    under the removal: retry until nothing is left."""
    for attempt in range(attempts):
        try:
            if fs.exists(staging):
                fs.rm(staging, recursive=True)
            return
        except FileNotFoundError:
            time.sleep(0.1 * (attempt + 1))
    if fs.exists(staging):
        fs.rm(staging, recursive=True)


def resumable_location(path: str) -> str:
    """The fixed staging location of `path` that an interrupted run leaves for the next one."""
    fs, root = fsspec.core.url_to_fs(str(path))
    return _as_location(fs, _sibling(root, "partial"), path)


def commit(staging: str, path: str) -> None:
    """Move a completed resumable staging location into place (the caller holds the lock). A
    target found there is replaced only if it is ensir-flow's output of the kind staged: one that
    appeared or was swapped while the run computed is refused, not deleted."""
    fs, root = fsspec.core.url_to_fs(str(path))
    _finish_interrupted_replacement(fs, root)
    targets.refuse_link(path)
    targets.refuse_replacing(path, targets.kind_of(staging))
    _move_into_place(fs, fsspec.core.url_to_fs(str(staging))[1], root)


def remove(path: str) -> None:
    """Delete the store or folder at `path` if it exists (the caller holds its lock)."""
    fs, root = fsspec.core.url_to_fs(str(path))
    if fs.exists(root):
        _remove_tree(fs, root)


@contextlib.contextmanager
def exclusive_lock(path: str):
    """Hold `.NAME.lock` beside `path` for the duration of a run, or refuse with a clear message.

    The lock file is created with exclusive-create semantics ('xb'): O_EXCL on local disks, a
    conditional put (If-None-Match) on object stores whose fsspec driver supports it. A lock left
    by a killed process on this host is taken over when that process is gone, and so is a lock
    file with no owner in it (empty, or unreadable) older than UNWRITTEN_LOCK_SECONDS by its
    modification or its status-change time, whichever is older (its writer was killed between
    creating it and writing it: a live one writes at once; a modification time set in the future
    does not keep it for ever). Takeovers happen one at a time (`_takeover_guard`), so runs
    restarted together after a kill never both hold the lock. Whatever stands at the lock's path
    that is not a regular file (a folder, a FIFO, a link, ...) is refused, naming it, without
    being opened: reading a FIFO would block for ever.
    """
    fs, root = fsspec.core.url_to_fs(str(path))
    lock = _sibling(root, "lock")
    parent = root.rstrip("/").rpartition("/")[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if not _create_lock(fs, lock, owner, path):
        with _takeover_guard(fs, parent):
            holder = _read_lock(fs, lock, path)
            dead_here = holder.get("host") == owner["host"] and not _alive(holder.get("pid"))
            if dead_here or (not holder and _age(fs, lock) > UNWRITTEN_LOCK_SECONDS):
                with contextlib.suppress(FileNotFoundError):
                    fs.rm(lock)
            if not _create_lock(fs, lock, owner, path):
                holder = _read_lock(fs, lock, path)
                where = _as_location(fs, lock, path)
                if not holder:
                    raise TransientError(f"{path}: in use by another run (its lock {where} names no owner yet; one left by a "
                                         f"run killed as it started is taken over once {UNWRITTEN_LOCK_SECONDS:.0f} s old); "
                                         f"if no run is writing it, remove {where}")
                raise TransientError(f"{path}: in use by another run ({holder.get('host')} pid {holder.get('pid')} since "
                                     f"{holder.get('since')}); if that run is dead, remove {where}")
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            fs.rm(lock)


def _create_lock(fs, lock: str, owner: dict, path: str) -> bool:
    """Create the lock file `lock` holding `owner`, if no file is there (exclusive create); an
    InputError when what is there is not a regular file (`_refuse_odd_lock`)."""
    try:
        with fs.open(lock, "xb") as file:
            file.write(json.dumps(owner).encode())
        return True
    except FileExistsError:
        _refuse_odd_lock(fs, lock, path)
        return False


def _refuse_odd_lock(fs, lock: str, path: str) -> None:
    """Refuse, naming it, a local lock path that is not a regular file (looked at with lstat:
    neither followed nor opened)."""
    if not isinstance(fs, LocalFileSystem):
        return
    try:
        mode = os.lstat(lock).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISREG(mode):
        return
    what = {stat.S_ISDIR: "a folder", stat.S_ISLNK: "a symbolic link", stat.S_ISFIFO: "a FIFO (named pipe)",
            stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device"}
    kind = next((name for test, name in what.items() if test(mode)), "not a regular file")
    raise InputError(f"{path}: its lock path {_as_location(fs, lock, path)} is {kind}, not a lock file; "
                     f"remove it (no run of ensir-flow made it) and run again")


@contextlib.contextmanager
def _takeover_guard(fs, parent: str):
    """Serialise the takeovers of locks in the local folder `parent` between processes (flock on
    the folder, released by the kernel if the holder dies), so that two runs finding the same dead
    holder cannot both remove the lock and each create its own: the second one finds the first's
    lock, alive. On other file systems (object stores have no such lock), or where the folder
    cannot be locked (a network file system without flock), takeovers are not serialised: two runs
    restarted at the same instant after a kill may both take over."""
    descriptor = None
    if isinstance(fs, LocalFileSystem):
        import fcntl  # here: a POSIX module, needed only for local folders

        try:
            descriptor = os.open(parent or ".", os.O_RDONLY)
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        except OSError:
            if descriptor is not None:
                os.close(descriptor)
            descriptor = None
    try:
        yield
    finally:
        if descriptor is not None:
            os.close(descriptor)


UNWRITTEN_LOCK_SECONDS = 10.0
#: The most of a lock file read: an owner is a line of JSON.
LOCK_BYTES = 4096


def _age(fs, path: str) -> float:
    """Seconds since `path` was last modified (0 when the file system does not say); on a local
    disk by the older of its modification and status-change times, so that a modification time
    set in the future still ages (the status-change time cannot be set)."""
    if isinstance(fs, LocalFileSystem):
        try:
            status = os.lstat(path)
        except OSError:
            return 0.0
        return time.time() - min(status.st_mtime, status.st_ctime)
    try:
        modified = fs.modified(path)
    except (NotImplementedError, OSError, AttributeError):
        return 0.0
    return time.time() - modified.timestamp()


def _read_lock(fs, lock: str, path: str) -> dict:
    """The owner written in `lock` ({} when it names none: empty, unreadable or not JSON). A local
    lock is checked (`_refuse_odd_lock`), then opened without following a link or blocking."""
    _refuse_odd_lock(fs, lock, path)
    try:
        if isinstance(fs, LocalFileSystem):
            with os.fdopen(os.open(lock, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW), "rb") as file:
                text = file.read(LOCK_BYTES)
        else:
            with fs.open(lock, "rb") as file:
                text = file.read(LOCK_BYTES)
        holder = json.loads(text or b"{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _alive(pid) -> bool:
    """Whether process `pid` (as a lock records it) runs on this host; never for what is not a
    process number (0 and negative numbers name process groups to `kill`)."""
    try:
        if isinstance(pid, bool) or int(pid) <= 0:
            return False
        os.kill(int(pid), 0)
    except (TypeError, ValueError, OverflowError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def open_store(path: str, in_memory: bool = False, read_later: tuple[str, ...] = ()) -> xr.Dataset:
    """Open an ensir-flow Zarr store lazily (dask arrays), as last committed, with a clear message
    when it is not one; or, `in_memory`, read every array now into one numpy array each (a small
    store: through dask, each array's chunks would be read, then copied into one), except those
    named in `read_later`, left unread for the caller (`read_lut` reads its weights itself).

    The consolidated metadata in the root `zarr.json` is the committed state: an append in
    progress (or killed) has grown the arrays' own metadata but not it (see `committed_append`).
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
        raise _unreadable_store(path, error) from None
    return _with_image_index_read(ds)


def _openable(path: str):
    """(file system, root) of the store at `path`; an InputError saying why when there is none."""
    fs, root = fsspec.core.url_to_fs(str(path))
    if not fs.exists(root):
        if fs.exists(_sibling(root, "replaced")):
            raise InputError(f"{path}: missing: a run replacing it was interrupted; re-run that command (or "
                             f"rename {_as_location(fs, _sibling(root, 'replaced'), path)} back)")
        raise InputError(f"{path}: store not found")
    if not fs.exists(f"{root}/{ROOT_METADATA}"):
        raise InputError(f"{path}: not a Zarr store (no {ROOT_METADATA}; an interrupted write? re-run the command "
                         "that writes it with --overwrite)")
    return fs, root


def _unreadable_store(path: str, error: Exception) -> InputError:
    return InputError(f"{path}: not a readable Zarr store ({str(error).splitlines()[0] if str(error) else type(error).__name__})")


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
        return tuple((size,) * (length // size) + ((length % size,) if length % size else ())
                     for length, size in zip(self.array.shape, self.array.chunks))

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
        variables = {name: StoredVariable(array, tuple(array.metadata.dimension_names or array.attrs.get("_ARRAY_DIMENSIONS") or ()))
                     for name, array in group.arrays()}
        attrs = dict(group.attrs)
    except Exception as error:
        raise _unreadable_store(path, error) from None
    return StoreIndex(attrs, variables)


def _has_consolidated_metadata(fs, root: str) -> bool:
    try:
        return json.loads(fs.cat_file(f"{root}/{ROOT_METADATA}")).get("consolidated_metadata") is not None
    except (OSError, ValueError, AttributeError):
        return False


def read_lut(path: str) -> Lut:
    """Read a LUT store fully and check it. Its weights (bin, channel, model), nearly all of a
    many-model LUT, are read straight into the leading rows of an array with one spare row, where
    `blend.weights_with_fallback` puts the fallback for apply's lookup table instead of copying
    them (at K = 16, w = 16 on 10 Mpx: 505 MB). Weights stored with a scale, an offset or a fill
    value other than NaN (not written by ensir-flow) are decoded by xarray instead."""
    from ensir_flow.blend import rows_with_spare_row
    from ensir_flow.lut import WEIGHT_DIMS, Lut

    ds = open_store(path, in_memory=True, read_later=("weights",))
    if "weights" in ds:
        variable = ds["weights"].variable
        fill = variable.encoding.get("_FillValue")
        if (variable.dims == WEIGHT_DIMS and variable.dtype == np.float32
                and (fill is None or (isinstance(fill, (float, np.floating)) and np.isnan(fill)))
                and not {"scale_factor", "add_offset"} & set(variable.encoding)):
            rows = rows_with_spare_row(*variable.shape)
            try:
                zarr.open_array(store=str(path), path="weights", mode="r").get_basic_selection(
                    ..., out=default_buffer_prototype().nd_buffer.from_numpy_array(rows[:-1]))
            except Exception as error:
                raise _unreadable_store(path, error) from None
            ds["weights"] = ds["weights"].copy(data=rows[:-1])
        else:
            variable.load()
    return Lut.from_dataset(ds, source=str(path))


#: xarray's attribute for a float array's missing value in Zarr v3: the float64 bytes of NaN in base64.
NAN_FILL_VALUE_ATTRIBUTE = base64.standard_b64encode(struct.pack("<d", float("nan"))).decode()


def write_lut(lut: Lut, path: str) -> None:
    """Write `lut` as a new Zarr v3 store at `path` (a staging location: see `staged_output`) with
    zarr alone, as xarray's `to_zarr` writes `lut.to_dataset()`: the same arrays, chunks, codecs
    and metadata (tested), so xarray and every reader of LUT stores read it as before. Importing
    xarray and dask.array for that write took 1.3 s of every `fit`.

    xarray's encoding, made explicit: each array's dimension names; a float array's fill value
    NaN, also as its `_FillValue` attribute; each data variable's CF `coordinates` attribute,
    naming the coordinates (other than dimensions) whose dimensions it spans. The attributes and
    the consolidated metadata go in the one final write of the root `zarr.json` (`commit_metadata`).
    """
    data_vars, coords, attrs = lut.layout()
    group = zarr.open_group(str(path), mode="w-", zarr_format=3)
    for name, (dims, values, var_attrs) in {**coords, **data_vars}.items():
        attributes = {key: value.tolist() if isinstance(value, np.ndarray) else value for key, value in var_attrs.items()}
        linked = [coord for coord, (coord_dims, _, _) in coords.items()
                  if name in data_vars and coord not in dims and set(coord_dims) <= set(dims)]
        if linked:
            attributes["coordinates"] = " ".join(linked)
        fill_value, dtype = None, values.dtype
        if dtype.kind == "f":
            fill_value, attributes["_FillValue"] = np.nan, NAN_FILL_VALUE_ATTRIBUTE
        elif dtype.kind == "O":  # names: zarr's variable-length strings
            values, dtype = values.astype(str), str
        array = group.create_array(name, shape=values.shape, dtype=dtype, fill_value=fill_value, attributes=attributes,
                                   dimension_names=dims)
        array[...] = values
    commit_metadata(path, attrs)


#: Zarr's array configuration for our writes. By default Zarr compares every chunk with the fill
#: value before writing it, to skip "empty" ones: that costs as much as encoding it with lz4, and our
#: chunks are never empty in that sense (a zero pixel is data).
WRITE_CONFIG = {"write_empty_chunks": True}


def write_dataset(ds: xr.Dataset, path: str, encoding: dict | None = None):
    """Lazy write of `ds` as a new Zarr v3 store; returns the delayed object to compute."""
    with warnings.catch_warnings():
        # Consolidated metadata is not in the v3 spec yet, but xarray reads it to open stores quickly.
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        return ds.to_zarr(str(path), mode="w-", zarr_format=3, encoding=encoding or {}, compute=False,
                          write_empty_chunks=WRITE_CONFIG["write_empty_chunks"])


def commit_metadata(path: str, attrs: dict) -> None:
    """Commit a store's current arrays: ONE write of the root `zarr.json` holding `attrs` and the
    consolidated metadata of every array as their own metadata now says (zarr's own
    `consolidate_metadata` would need a second write for the attributes)."""

    async def commit():
        group = await zarr.api.asynchronous.open_group(str(path), mode="r+", use_consolidated=False)
        members = {name: member.metadata async for name, member in group.members(use_consolidated_for_children=False)}
        metadata = dataclasses.replace(group.metadata, attributes=attrs,
                                       consolidated_metadata=ConsolidatedMetadata(metadata=members))
        (document,) = metadata.to_buffer_dict(default_buffer_prototype()).values()
        await group.store_path.store.set(f"{group.store_path.path}/{ROOT_METADATA}".lstrip("/"), document)

    zarr.core.sync.sync(commit())


def array_lengths(path: str) -> dict[str, tuple[int, ...]]:
    """Each array's shape as its own metadata says (past the committed extent during an append)."""
    group = zarr.open_group(str(path), mode="r", use_consolidated=False)
    return {name: array.shape for name, array in group.arrays()}


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


def committed_append(path: str, committed: dict[str, int], grown: dict[str, int], write_arrays,
                     image_values: dict, attrs: dict) -> None:
    """Append to the store at `path` so that every reader sees it as before or as after, never between.

    1. Cut every array back to the `committed` lengths (what a killed append left past them).
    2. Grow the arrays to the `grown` lengths: their own metadata only; the root `zarr.json`,
       which readers open the store by (`open_store`), still holds the committed shapes.
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


def resumable_marks(path: str, provenance: dict, variables: dict | None = None) -> np.ndarray | None:
    """Which chunks the staging of `path` holds complete, if it holds a run with the same inputs
    (`provenance`, among its attributes, and the values of `variables`: name -> values, e.g. the
    image names and sizes); else None, after removing whatever staging is there (a run of other
    inputs, or anything unreadable). The caller holds the lock of `path`."""
    staging = resumable_location(path)
    if not exists(staging):
        return None
    try:
        group = zarr.open_group(staging, mode="r", use_consolidated=False)
        if (all(group.attrs.get(key) == value for key, value in provenance.items())
                and all(group[name][...].tolist() == np.asarray(values).tolist() for name, values in (variables or {}).items())):
            return group[COMPLETE][:].astype(bool)
    except Exception:  # noqa: BLE001 - anything unreadable is stale staging, removed below
        pass
    remove(staging)
    return None


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
    template = template.assign({COMPLETE: ("chunk", dask.array.zeros(n_chunks, dtype=np.uint8, chunks=1),
                                           {"long_name": "chunk of pixels written", "flag_values": [0, 1],
                                            "flag_meanings": "not_written written",
                                            "description": "1 once the chunk of pixels with this index is written"})})
    template.attrs = {}
    write_dataset(template, staging, {**encoding, COMPLETE: {"chunks": (1,)}})
    commit_metadata(staging, attrs)
    return staging


def write_chunk_then_mark(writes: list[tuple], marks, index: int, start: int, stop: int, records: list[tuple] = (),
                          checksums=None) -> None:
    """In a task: write pixels start:stop (one whole chunk along `pixel`, the second-last axis) of
    each array of `writes` [(array, values)], then row `index` of `checksums` (the XXH3-64 checksum of each
    array's chunk as written, in the order of `writes`; see `integrity`) and of each per-chunk
    array of `records` [(array, values)] (what the chunk was made from), then mark chunk `index`
    complete."""
    written = []
    for array, values in writes:
        values = np.asarray(values, dtype=array.dtype)
        array[(slice(None),) * (array.ndim - 2) + (slice(start, stop),)] = values
        written.append(values)
    if checksums is not None:
        checksums[index] = np.array([chunk_checksum(values) for values in written], dtype=np.uint64)
    for array, values in records:
        array[index] = values
    marks[index] = 1


def record_checksums(arrays: list, checksums, index: int, start: int, stop: int) -> None:
    """In a task: row `index` of `checksums` from chunk `index` (pixels start:stop) of each of
    `arrays` as it is stored now (for writes that do not hold the chunk's values: `da.store`)."""
    checksums[index] = np.array([chunk_checksum(array[(slice(None),) * (array.ndim - 2) + (slice(start, stop),)])
                                 for array in arrays], dtype=np.uint64)


def with_checksum_tail(path: str, attrs: dict, n_chunks: int) -> dict:
    """`attrs` with the checksums of chunk `n_chunks - 1` of the store at `path` copied into
    `CHECKSUM_TAIL`, where readers take the last chunk's checksums from (`integrity.checksums_of`):
    an append rewrites the store's last chunk, if partial, and its row of checksums before its
    commit, so a committed reader must not depend on that row (unchanged where the store has no
    checksums)."""
    group = zarr.open_group(str(path), mode="r", use_consolidated=False)
    if CHUNK_CHECKSUMS not in group or not n_chunks:
        return attrs
    return {**attrs, CHECKSUM_TAIL: {"chunk": int(n_chunks - 1),
                                     "xxh3": [int(value) for value in group[CHUNK_CHECKSUMS][n_chunks - 1]]}}


def commit_resumable(path: str, keep_marks: bool = True, values: dict | None = None, drop: tuple[str, ...] = (),
                     attrs: dict | None = None) -> None:
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


def refuse_or_recover(path: str, overwrite: bool) -> None:
    """Under the lock of `path`, before a resumable run: finish an interrupted replacement, then
    refuse an existing target without `overwrite` (as `staged_output` does)."""
    fs, root = fsspec.core.url_to_fs(str(path))
    _finish_interrupted_replacement(fs, root)
    refuse_existing(path, overwrite)
