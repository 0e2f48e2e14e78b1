"""Test-only: run the ensir-flow CLI, killing the process at its n-th write, as SIGKILL would.

    python kill_after_writes.py N COUNT_FILE -- ensir-flow arguments...
    python kill_after_writes.py --serve [PROGRAM...]

Every operation that changes the file system goes through one of the functions patched here:
Zarr's object writes and deletes (chunks, metadata), fsspec's moves, deletes, directory creation
and file opens for writing (staging, commits, locks, LUT exports), image writes (export, report
figures), and the temporary files of a fit in passes (`StoredBins.append`). The n-th call ends the process with
os._exit before it runs: no exception
handler, `finally` or atexit hook of the CLI runs, exactly as after a SIGKILL between two
writes. N = 0 runs to the end; every run writes how many writes it made to COUNT_FILE.

With --serve, the process imports the CLI and the modules its commands use once, then runs one
command per line of JSON on its stdin (`Writer.run` writes them) in a fork of itself: a process of
its own, killed as above or by SIGKILL after some seconds, that starts without the ~2 s of imports
a fresh interpreter spends before its first write. Each answer is a line of JSON on its stdout.
It loads the `torch.export` programs named once, for the ~3 s of imports of a first load.
"""

import atexit
import functools
import gc
import importlib
import json
import os
import pkgutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

KILLED = 137  # the exit status of a process killed by SIGKILL

#: Seconds a command may run before it is killed as hung.
TIMEOUT = 300

_kill_at = 0
_count_file = ""
_writes = 0
_counting = threading.Lock()  # tasks write from several threads: no two may take the same number


def _record() -> None:
    with open(_count_file, "w") as file:  # written through the builtin: not counted
        file.write(str(_writes))


def counted(function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        global _writes
        with _counting:
            _writes += 1
            _record()
            if _writes == _kill_at:
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


def install() -> None:
    """Count (and kill at) every write of this process from now on."""
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


def run_cli(arguments: list[str], kill_at: int, count_file: str) -> None:
    """Run the CLI on `arguments`, killed at write `kill_at` (0: never); ends in SystemExit."""
    global _kill_at, _count_file, _writes
    _kill_at, _count_file, _writes = kill_at, count_file, 0
    from ensir_flow.cli import main as cli

    try:
        cli(arguments, prog_name="ensir-flow", standalone_mode=True)
    finally:
        with _counting:
            _record()


def _preload() -> None:
    """Import what the commands import (the CLI, every module of ensir_flow, dask's threads) and
    load the kernels numba has compiled to its cache: else each fork loads those it calls again."""
    import dask.threaded  # noqa: F401
    from numba.core.registry import CPUDispatcher

    import ensir_flow.cli
    import ensir_flow.pipelines

    for package in (ensir_flow, ensir_flow.pipelines):
        for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if not module.name.endswith(".__main__"):
                for kernel in vars(importlib.import_module(module.name)).values():
                    cached = getattr(getattr(kernel, "_cache", None), "_cache_file", None)  # None: not cache=True
                    if isinstance(kernel, CPUDispatcher) and cached is not None:
                        for signature, *_ in cached._load_index():
                            kernel.compile(signature)


def _run_forked(request: dict) -> None:
    """In the fork: the command in its own folder, its output to its files; then the end of a
    process as the interpreter makes it (threads joined, atexit run, output flushed) but for the
    teardown of every module, which in a fork copies the pages of all the server imported (~1 s)."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    os.chdir(request["cwd"])
    try:
        run_cli(request["arguments"], request["kill_at"], request["count"])
        code = 0
    except SystemExit as ended:
        code = ended.code
    except BaseException:
        traceback.print_exc()
        code = 1
    threading._shutdown()  # what the interpreter's end runs first: executors told to stop, threads joined
    atexit._run_exitfuncs()
    if not isinstance(code, int):  # as sys.exit takes it
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _wait(pid: int, kill_after: float | None) -> int:
    """The exit status of `pid` (negative: the signal that ended it), after a SIGKILL at
    `kill_after` seconds, or at TIMEOUT if it runs that long."""
    deadline = time.monotonic() + (TIMEOUT if kill_after is None else kill_after)
    while not (ended := os.waitpid(pid, os.WNOHANG))[0]:
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            ended = os.waitpid(pid, 0)
            break
        time.sleep(0.005)
    return os.waitstatus_to_exitcode(ended[1])


def serve(programs: list[str]) -> None:
    install()
    _preload()
    if programs:
        import torch

        for program in programs:
            torch.export.load(program)
    gc.freeze()  # the forks' collections skip what the imports made (else they copy its pages: ~1 s a run)
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _run_forked(request)
        print(json.dumps({"returncode": _wait(pid, request.get("kill_after"))}), flush=True)


class Writer:
    """A `--serve` process started from the tests: `run` is a CLI run in a fresh process."""

    def __init__(self, env: dict, programs: tuple[Path, ...] = ()):
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", *map(str, programs)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.process.stdout.readline() == "ready\n", f"the writer process ended ({self.process.wait()})"

    def run(self, work: Path, arguments: list, kill_at: int = 0, kill_after: float | None = None):
        """Run the command in `work`, killed at write `kill_at` (0: never) or by SIGKILL after
        `kill_after` seconds; returns the process (its exit status and output) and how many writes
        it made (None after a SIGKILL, which may land while it records them)."""
        count = work / "writes.count"
        stdout, stderr = (work.with_name(f"{work.name}.{name}") for name in ("stdout", "stderr"))
        count.write_text("0")
        arguments = [*map(str, arguments), "--no-progress"]
        request = {"cwd": str(work), "arguments": arguments, "kill_at": kill_at, "kill_after": kill_after}
        request.update(count=str(count), stdout=str(stdout), stderr=str(stderr))
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        assert answer, f"the writer process ended ({self.process.wait()})"
        process = subprocess.CompletedProcess(arguments, json.loads(answer)["returncode"], stdout.read_text(), stderr.read_text())
        return process, None if kill_after is not None else int(count.read_text())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def main() -> None:
    if sys.argv[1] == "--serve":
        serve(sys.argv[2:])
        return
    install()
    arguments = sys.argv[sys.argv.index("--") + 1 :]
    run_cli(arguments, int(sys.argv[1]), sys.argv[2])


if __name__ == "__main__":
    main()
