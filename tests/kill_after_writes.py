"""Test-only: run the ensir-flow CLI, killing the process at its n-th write, as SIGKILL would.

    python kill_after_writes.py N COUNT_FILE -- ensir-flow arguments...

Every operation that changes the file system goes through one of the functions patched here:
Zarr's object writes and deletes (chunks, metadata), fsspec's moves, deletes, directory creation
and file opens for writing (staging, commits, locks, LUT exports), image writes (export, report
figures), and the temporary files of a fit in passes (`StoredBins.append`). The n-th call ends the process with
os._exit before it runs: no exception
handler, `finally` or atexit hook of the CLI runs, exactly as after a SIGKILL between two
writes. N = 0 runs to the end; every run writes how many writes it made to COUNT_FILE.
"""

import functools
import os
import sys
import threading

KILLED = 137  # the exit status of a process killed by SIGKILL


def main() -> None:
    kill_at, count_file = int(sys.argv[1]), sys.argv[2]
    arguments = sys.argv[sys.argv.index("--") + 1 :]
    writes = 0

    counting = threading.Lock()  # tasks write from several threads: no two may take the same number

    def counted(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            nonlocal writes
            with counting:
                writes += 1
                with open(count_file, "w") as file:  # written through the builtin: not counted
                    file.write(str(writes))
                if writes == kill_at:
                    os._exit(KILLED)
            return function(*args, **kwargs)

        return wrapper

    def counted_async(function):
        check = counted(lambda: None)

        @functools.wraps(function)
        async def wrapper(*args, **kwargs):
            check()
            return await function(*args, **kwargs)

        return wrapper

    import imageio.v3
    import zarr.storage
    from fsspec.implementations.local import LocalFileSystem

    for name in ("set", "delete", "set_if_not_exists"):
        setattr(zarr.storage.LocalStore, name, counted_async(getattr(zarr.storage.LocalStore, name)))
    for name in ("mv", "rm", "rm_file", "makedirs", "mkdir", "copy", "cp_file"):
        setattr(LocalFileSystem, name, counted(getattr(LocalFileSystem, name)))
    opened = LocalFileSystem._open

    @functools.wraps(opened)
    def open_file(self, path, mode="rb", *args, **kwargs):
        if any(flag in mode for flag in "wxa+"):
            return counted(opened)(self, path, mode, *args, **kwargs)
        return opened(self, path, mode, *args, **kwargs)

    LocalFileSystem._open = open_file
    imageio.v3.imwrite = counted(imageio.v3.imwrite)
    from ensir_flow.pipelines.fit import StoredBins  # a fit in passes: each range's LUT bins to its temporary files

    StoredBins.append = counted(StoredBins.append)

    from ensir_flow.cli import main as cli

    try:
        cli(arguments, prog_name="ensir-flow", standalone_mode=True)
    finally:
        with counting, open(count_file, "w") as file:
            file.write(str(writes))


if __name__ == "__main__":
    main()
