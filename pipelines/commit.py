"""How ensir-flow writes new outputs and replaces old ones: the protocols that keep every store
and folder either as it was before a command or as it is after it, whatever instant the command
is killed at.

- New outputs (fit, lut import and export, export, report) are written into a fixed staging location
  beside the target (`.NAME.partial`) and moved into place when complete (`staged_output`). On a
  local disk the move is a rename. Replacing an existing target (`--overwrite`) is one atomic
  exchange where the system has it, else two renames (target aside to `.NAME.replaced`, staging
  into place); a run killed between them is finished by the next writer of that target, and
  readers meanwhile refuse with a message saying so (`stores.open_store`). On object storage (no
  rename) the move copies every object, concurrently, with the root `zarr.json` last, so the
  target's root metadata appears only once everything else is there.
- Files added to an existing folder (an export updated after its store grew) appear in one step
  (`staged_update`).
- Every writer holds the target's lock while it works (`locks.exclusive_lock`).
- Resumable outputs (ingest, predict, apply) keep their staging location across runs and are
  moved into place by `commit` (see `resumable`); on object storage, where no store is there
  yet, they are written in place instead and committed by the one write of their root
  `zarr.json`, nothing moved (`resumable.resumable_location`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ensir_flow.errors import InputError

from . import targets
from .integrity import ROOT_METADATA
from .locks import exclusive_lock
from .targets import as_location, sibling
from .zarr_adapter import forget_listings


def exists(path: str) -> bool:
    """Whether there is a target at `path`: anything but the arrays of a resumable output being
    written there in place and not yet committed (`targets.staged_in_place`), which are that
    run's, not a target."""
    fs, root = fsspec.core.url_to_fs(str(path))
    return _present(fs, root)


def _present(fs, root: str) -> bool:
    return fs.exists(root) and not targets.staged_in_place(fs, root)


def refuse_existing(path: str, overwrite: bool, kind: str | None = None) -> None:
    """Fail before any work when the output exists and the user did not ask to replace it, or when
    `overwrite` would replace what is not ensir-flow's output of `kind` (None: of any kind; see
    `targets.refuse_replacing`). A symbolic link is never a target (`targets.refuse_link`)."""
    targets.refuse_link(path)
    if exists(path):
        if not overwrite:
            raise InputError(f"{path}: already exists (pass --overwrite to replace it)")
        targets.refuse_replacing(path, kind)


def _move_tree(fs, source: str, destination: str) -> None:
    """Move a directory tree: a rename where the file system has one; else copy every file (one
    batch of concurrent requests; on S3 server-side copies), then the root `zarr.json` (a Zarr
    store is complete once it is there), then delete the source, its root `zarr.json` first."""
    if isinstance(fs, LocalFileSystem):
        fs.mv(source, destination, recursive=True)
        return
    root_metadata = f"{source}/{ROOT_METADATA}"
    files = fs.find(source)
    rest = [path for path in files if path != root_metadata]
    if rest:
        fs.copy(rest, [destination + path[len(source) :] for path in rest])
    if root_metadata in files:
        fs.copy(root_metadata, f"{destination}/{ROOT_METADATA}")
    _remove_tree(fs, source)


def _remove_tree(fs, root: str) -> None:
    """Delete a directory tree, its root `zarr.json` first, so a half-deleted store is never read
    as one (on object storage the rest goes in concurrent batches of many objects a request)."""
    if fs.exists(f"{root}/{ROOT_METADATA}"):
        fs.rm(f"{root}/{ROOT_METADATA}")
    if fs.exists(root):
        fs.rm(root, recursive=True)
    _forget_listings(fs, root)


def _forget_listings(fs, root: str) -> None:
    """After deleting under `root` on object storage, drop zarr's cached listings there (`zarr_adapter.forget_listings`)."""
    if not isinstance(fs, LocalFileSystem):
        forget_listings(fs.unstrip_protocol(root))


def _finish_interrupted_replacement(fs, root: str) -> None:
    """A run killed between moving the old target aside and moving the new one into place left
    `.NAME.replaced` and no target: put the old one back (the command that was replacing it never
    completed). With both present, the retired copy is stale: remove it.

    On object storage a move is copies and deletions, so such a run can also leave part of a
    store at the target: the rest of the old one, whose root `zarr.json` goes first, or the start
    of the new one, whose root `zarr.json` comes last (`targets.replaced_half_way`). The retired
    copy is then the complete old store: the part at the target is removed and it is put back."""
    retired = sibling(root, "replaced")
    if not fs.exists(retired):
        return
    if targets.replaced_half_way(fs, root):
        _remove_tree(fs, root)
        _move_tree(fs, retired, root)
    elif _present(fs, root):
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
        retired = sibling(root, "replaced")
        _move_tree(fs, root, retired)
        _move_tree(fs, staging, root)
        _remove_tree(fs, retired)
    else:
        _move_tree(fs, staging, root)


@contextlib.contextmanager
def staged_output(path: str, overwrite: bool = False, kind: str | None = None):
    """Yield the staging location of `path`; move it to `path` only if the block succeeds.

    Holds the writer's lock throughout (`locks.exclusive_lock`); staging left by a killed run is
    removed. A target found at the move (with `overwrite`) is replaced only if it is ensir-flow's
    output of `kind`, by default the kind of what was staged (`targets.kind_of`): one that appeared
    or was swapped while the block ran is refused, not deleted.
    """
    with exclusive_lock(path):
        fs, root = fsspec.core.url_to_fs(str(path))
        _finish_interrupted_replacement(fs, root)
        refuse_existing(path, overwrite, kind)
        staging = sibling(root, "partial")
        if fs.exists(staging):
            _remove_tree(fs, staging)
        try:
            yield as_location(fs, staging, path)
            refuse_existing(path, overwrite, kind or targets.kind_of(as_location(fs, staging, path)))
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
        staging = sibling(root, "partial")
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
    _forget_listings(fs, staging)


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


def refuse_or_recover(path: str, overwrite: bool) -> None:
    """Under the lock of `path`, before a resumable run: finish an interrupted replacement, then
    refuse an existing target without `overwrite` (as `staged_output` does)."""
    fs, root = fsspec.core.url_to_fs(str(path))
    _finish_interrupted_replacement(fs, root)
    refuse_existing(path, overwrite)
