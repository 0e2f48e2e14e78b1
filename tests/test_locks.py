"""Writers' locks (`locks.exclusive_lock`) whatever stands at the lock's path: a FIFO, a folder
or a link is refused in one line naming it, without blocking; a lock naming no owner is taken over
once old by any measure, even with a modification time set in the future."""

import json
import os
import socket
import threading
import time

import pytest

from ensir_flow.errors import InputError, TransientError
from ensir_flow.pipelines import locks
from ensir_flow.pipelines.locks import exclusive_lock


def _hold(target) -> bool:
    """Take and release the lock of `target` in a thread; False if that did not end within 10 s."""
    outcome = {}

    def take():
        try:
            with exclusive_lock(str(target)):
                outcome["held"] = True
        except Exception as error:  # noqa: BLE001 - reported to the test below
            outcome["error"] = error

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():
        return False
    if "error" in outcome:
        raise outcome["error"]
    return True


@pytest.mark.parametrize(
    "make, what",
    [
        (os.mkfifo, "a FIFO (named pipe)"),
        (os.mkdir, "a folder"),
        (lambda path: os.symlink("elsewhere", path), "a symbolic link"),
    ],
)
def test_a_lock_path_that_is_not_a_file_is_refused_without_blocking(tmp_path, make, what):
    target, lock = tmp_path / "out.zarr", tmp_path / ".out.zarr.lock"
    make(lock)
    with pytest.raises(InputError) as raised:
        assert _hold(target), "the lock blocked"
    message = str(raised.value)
    assert (
        message
        == f"{target}: its lock path {lock} is {what}, not a lock file; remove it (no run of ensir-flow made it) and run again"
    )
    assert os.path.lexists(lock)  # nothing removed
    os.rmdir(lock) if lock.is_dir() and not lock.is_symlink() else os.remove(lock)
    assert _hold(target) and not os.path.lexists(lock)


def test_an_ownerless_lock_with_a_future_time_is_taken_over_once_old(tmp_path, monkeypatch):
    target, lock = tmp_path / "out.zarr", tmp_path / ".out.zarr.lock"
    lock.write_bytes(b"")
    future = time.time() + 365 * 86400
    os.utime(lock, (future, future))
    with pytest.raises(TransientError) as raised:
        _hold(target)
    assert "names no owner yet" in str(raised.value) and "None" not in str(raised.value)
    monkeypatch.setattr(locks, "UNWRITTEN_LOCK_SECONDS", 0.2)
    time.sleep(0.3)  # old by its status-change time, which cannot be set
    assert _hold(target) and not lock.exists()


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b"[1, 2]",
        json.dumps({"pid": 0, "host": socket.gethostname()}).encode(),
        json.dumps({"pid": -1, "host": socket.gethostname()}).encode(),
    ],
)
def test_a_lock_naming_no_live_process_here_is_taken_over(tmp_path, monkeypatch, content):
    target, lock = tmp_path / "out.zarr", tmp_path / ".out.zarr.lock"
    lock.write_bytes(content)
    os.utime(lock, (time.time() - 60, time.time() - 60))
    monkeypatch.setattr(locks, "UNWRITTEN_LOCK_SECONDS", 0.2)
    time.sleep(0.3)
    assert _hold(target) and not lock.exists()


def test_a_live_holder_is_named(tmp_path):
    target = tmp_path / "out.zarr"
    with exclusive_lock(str(target)):
        with pytest.raises(TransientError, match=f"in use by another run \\({socket.gethostname()} pid {os.getpid()} since"):
            _hold(target)
