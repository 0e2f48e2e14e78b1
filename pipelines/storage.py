"""Writing outputs so that nothing is half-written: stage beside the target, then move into place.

Works through fsspec for any location. On a local disk the final move is an atomic rename; on
object storage it is a copy, so a crash during the move itself can leave a partial target (no
store on object storage offers an atomic directory rename).
"""

import contextlib
import json
import os
import socket
import time
import uuid
import warnings

import fsspec
from fsspec.implementations.local import LocalFileSystem
import xarray as xr
import zarr

from ensir_flow.errors import InputError
from ensir_flow.lut import Lut


def exists(path: str) -> bool:
    fs, root = fsspec.core.url_to_fs(str(path))
    return fs.exists(root)


def refuse_existing(path: str, overwrite: bool) -> None:
    """Fail before any work when the output exists and the user did not ask to replace it."""
    if exists(path) and not overwrite:
        raise InputError(f"{path}: already exists (pass --overwrite to replace it)")


def _sibling(fs, root: str, tag: str, unique: bool = True) -> str:
    parent, _, name = root.rstrip("/").rpartition("/")
    suffix = f"{tag}-{uuid.uuid4().hex[:8]}" if unique else tag
    return f"{parent}/.{name}.{suffix}" if parent else f".{name}.{suffix}"


def _as_location(fs, path: str, like: str) -> str:
    """`path` (as fsspec strips it) in the form of `like`: a URL if `like` is one."""
    return fs.unstrip_protocol(path) if "://" in str(like) else path


def _move_tree(fs, source: str, destination: str) -> None:
    """Move a directory tree: a rename where the file system has one, else copy every file, then delete."""
    if isinstance(fs, LocalFileSystem):
        fs.mv(source, destination, recursive=True)
        return
    files = fs.find(source)
    fs.copy(files, [destination + path[len(source):] for path in files])
    fs.rm(source, recursive=True)


def _move_into_place(fs, staging: str, root: str) -> None:
    """Replace `root` by `staging` (an atomic rename on local disks)."""
    if fs.exists(root):
        retired = _sibling(fs, root, "replaced")
        _move_tree(fs, root, retired)
        _move_tree(fs, staging, root)
        fs.rm(retired, recursive=True)
    else:
        _move_tree(fs, staging, root)


@contextlib.contextmanager
def staged_output(path: str, overwrite: bool = False):
    """Yield a temporary location beside `path`; move it to `path` only if the block succeeds."""
    refuse_existing(path, overwrite)
    fs, root = fsspec.core.url_to_fs(str(path))
    staging = _sibling(fs, root, "partial")
    try:
        yield _as_location(fs, staging, path)
    except BaseException:
        if fs.exists(staging):
            fs.rm(staging, recursive=True)
        raise
    _move_into_place(fs, staging, root)


def resumable_location(path: str) -> str:
    """The fixed staging location of `path` that an interrupted run leaves for the next one."""
    fs, root = fsspec.core.url_to_fs(str(path))
    return _as_location(fs, _sibling(fs, root, "partial", unique=False), path)


def commit(staging: str, path: str) -> None:
    """Move a completed resumable staging location into place."""
    fs, root = fsspec.core.url_to_fs(str(path))
    _move_into_place(fs, fsspec.core.url_to_fs(str(staging))[1], root)


@contextlib.contextmanager
def exclusive_lock(path: str):
    """Hold `.NAME.lock` beside `path` for the duration of a run, or refuse with a clear message.

    The lock file is created with exclusive-create semantics ('xb'): O_EXCL on local disks, a
    conditional put (If-None-Match) on object stores whose fsspec driver supports it. A lock left
    by a killed process on this host is taken over when that process is gone.
    """
    fs, root = fsspec.core.url_to_fs(str(path))
    lock = _sibling(fs, root, "lock", unique=False)
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for attempt in range(2):
        try:
            with fs.open(lock, "xb") as file:
                file.write(json.dumps(owner).encode())
            break
        except FileExistsError:
            holder = _read_lock(fs, lock)
            if attempt == 0 and holder.get("host") == owner["host"] and not _alive(holder.get("pid")):
                fs.rm(lock)
                continue
            raise InputError(f"{path}: in use by another run ({holder.get('host')} pid {holder.get('pid')} since "
                             f"{holder.get('since')}); if that run is dead, remove {_as_location(fs, lock, path)}") from None
    try:
        yield
    finally:
        fs.rm(lock)


def _read_lock(fs, lock: str) -> dict:
    try:
        with fs.open(lock, "rb") as file:
            return json.loads(file.read() or b"{}")
    except (OSError, ValueError):
        return {}


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def open_store(path: str) -> xr.Dataset:
    """Open an ensir-flow Zarr store lazily, with a clear message when it is not one."""
    if not exists(path):
        raise InputError(f"{path}: store not found")
    try:
        return xr.open_zarr(str(path))
    except Exception as error:
        raise InputError(f"{path}: not a readable Zarr store ({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None


def read_lut(path: str) -> Lut:
    """Read a LUT store fully (it is small) and check it."""
    return Lut.from_dataset(open_store(path).load(), source=str(path))


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


def open_array_for_writing(store: str, name: str):
    """Array `name` of the Zarr group at `store`, opened to write whole chunks (see WRITE_CONFIG)."""
    return zarr.open_array(store=str(store), path=name, mode="r+").with_config(WRITE_CONFIG)
