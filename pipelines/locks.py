"""Writers' locks: every writer holds `.NAME.lock` beside its target (exclusive create) while it
works. A second run to the same target is refused (TransientError: retry later); a lock left by a
dead process on this host is taken over, and with it the stale staging that run left, which the
new writer removes (`commit.staged_output`, `resumable.resumable_marks`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import time

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ensir_flow.errors import InputError, TransientError

from .targets import as_location, sibling


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
    lock = sibling(root, "lock")
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
                where = as_location(fs, lock, path)
                if not holder:
                    raise TransientError(
                        f"{path}: in use by another run (its lock {where} names no owner yet; one left by a "
                        f"run killed as it started is taken over once {UNWRITTEN_LOCK_SECONDS:.0f} s old); "
                        f"if no run is writing it, remove {where}"
                    )
                raise TransientError(
                    f"{path}: in use by another run ({holder.get('host')} pid {holder.get('pid')} since "
                    f"{holder.get('since')}); if that run is dead, remove {where}"
                )
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
    what = {
        stat.S_ISDIR: "a folder",
        stat.S_ISLNK: "a symbolic link",
        stat.S_ISFIFO: "a FIFO (named pipe)",
        stat.S_ISSOCK: "a socket",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
    }
    kind = next((name for test, name in what.items() if test(mode)), "not a regular file")
    raise InputError(
        f"{path}: its lock path {as_location(fs, lock, path)} is {kind}, not a lock file; "
        f"remove it (no run of ensir-flow made it) and run again"
    )


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
