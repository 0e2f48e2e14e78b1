"""Writing outputs so that nothing is half-written: stage beside the target, then move into place.

Works through fsspec for any location. On a local disk the final move is an atomic rename; on
object storage it is a copy, so a crash during the move itself can leave a partial target (no
store on object storage offers an atomic directory rename).
"""

import contextlib
import uuid
import warnings

import fsspec
import xarray as xr

from ensir_flow.errors import InputError


def exists(path: str) -> bool:
    fs, root = fsspec.core.url_to_fs(str(path))
    return fs.exists(root)


def refuse_existing(path: str, overwrite: bool) -> None:
    """Fail before any work when the output exists and the user did not ask to replace it."""
    if exists(path) and not overwrite:
        raise InputError(f"{path}: already exists (pass --overwrite to replace it)")


def _sibling(fs, root: str, tag: str) -> str:
    parent, _, name = root.rstrip("/").rpartition("/")
    return f"{parent}/.{name}.{tag}-{uuid.uuid4().hex[:8]}" if parent else f".{name}.{tag}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def staged_output(path: str, overwrite: bool = False):
    """Yield a temporary location beside `path`; move it to `path` only if the block succeeds."""
    refuse_existing(path, overwrite)
    fs, root = fsspec.core.url_to_fs(str(path))
    staging = _sibling(fs, root, "partial")
    try:
        yield fs.unstrip_protocol(staging) if "://" in str(path) else staging
    except BaseException:
        if fs.exists(staging):
            fs.rm(staging, recursive=True)
        raise
    if fs.exists(root):
        retired = _sibling(fs, root, "replaced")
        fs.mv(root, retired, recursive=True)
        fs.mv(staging, root, recursive=True)
        fs.rm(retired, recursive=True)
    else:
        fs.mv(staging, root, recursive=True)


def open_store(path: str) -> xr.Dataset:
    """Open an ensir-flow Zarr store lazily, with a clear message when it is not one."""
    if not exists(path):
        raise InputError(f"{path}: store not found")
    try:
        return xr.open_zarr(str(path))
    except Exception as error:
        raise InputError(f"{path}: not a readable Zarr store ({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None


def write_dataset(ds: xr.Dataset, path: str, encoding: dict | None = None):
    """Lazy write of `ds` as a new Zarr v3 store; returns the delayed object to compute."""
    with warnings.catch_warnings():
        # Consolidated metadata is not in the v3 spec yet, but xarray reads it to open stores quickly.
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        return ds.to_zarr(str(path), mode="w-", zarr_format=3, encoding=encoding or {}, compute=False)
