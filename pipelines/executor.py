"""Where plans run: dask's threads, a local cluster, or an existing Dask cluster, with progress.

Pipelines build graphs and call a `Compute` function; this module makes that function. The CLI,
the benchmark and the tests all get their schedulers here:

    with session("local", progress=True) as compute:
        plan.run(compute)

`scheduler` is 'threads' (dask's threads in this process), 'local' (a LocalCluster sized to this
machine), a scheduler address (tcp://host:port) or a scheduler file written by
`dask scheduler --scheduler-file`.
"""

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import dask

from ensir_flow import __version__
from ensir_flow.errors import InputError

#: compute(*collections, label=...) -> tuple of results, on the session's scheduler.
Compute = Callable[..., tuple]

#: The environment variable that sets the CLI's default scheduler.
SCHEDULER_ENV = "ENSIR_FLOW_SCHEDULER"


def threaded_compute(*collections, label: str = "") -> tuple:
    """The simplest `Compute`: dask's local threaded scheduler, no progress display."""
    return dask.compute(*collections, scheduler="threads")


def local_cluster(**options):
    """A distributed LocalCluster sized to this machine, tuned for chunk-at-a-time work.

    Distributed sets MALLOC_TRIM_THRESHOLD_ in its workers, which also freezes glibc's mmap
    threshold: every chunk buffer is then mapped and unmapped afresh, and workers read Zarr 2-3x
    slower. Our tasks hold one chunk at a time, so we leave glibc's adaptive default instead.
    """
    from distributed import LocalCluster

    environment = dict(dask.config.get("distributed.nanny.pre-spawn-environ"))
    environment.pop("MALLOC_TRIM_THRESHOLD_", None)
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environment}):
        return LocalCluster(**options)


@contextlib.contextmanager
def client_for(scheduler: str):
    """A distributed Client for `scheduler` (None for 'threads'), closed (with its cluster) on exit.

    On an existing cluster the workers are checked first (`check_workers`). A malformed address,
    an unreachable scheduler or a bad scheduler file is an InputError.
    """
    if scheduler == "threads":
        yield None
        return
    from distributed import Client

    if scheduler == "local":
        with local_cluster() as cluster, Client(cluster) as client:
            yield client
        return
    from distributed.comm.addressing import resolve_address

    address = scheduler if "://" in scheduler else _address_in_scheduler_file(scheduler)
    try:
        resolve_address(address)  # first: a Client that fails on a malformed address is never closed
        client = Client(address)
    except ValueError as error:
        raise InputError(f"{scheduler}: not a dask scheduler address ({error})") from None
    except OSError as error:
        raise InputError(f"{scheduler}: cannot reach the dask scheduler ({error})") from None
    with client:
        check_workers(client, scheduler)
        yield client


def _address_in_scheduler_file(path: str) -> str:
    """The scheduler address a `dask scheduler --scheduler-file` wrote into `path`."""
    if not Path(path).is_file():
        raise InputError(f"{path}: not 'threads', 'local', a scheduler address (tcp://host:port) or a scheduler file")
    try:
        return json.loads(Path(path).read_text())["address"]
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"{path}: not a dask scheduler file (JSON with the scheduler's 'address')") from None


def check_workers(client, scheduler: str) -> None:
    """Refuse a cluster with a worker that cannot import ensir-flow or has another version of it:
    its tasks would fail, or run other code than this run planned with. It compares version
    strings, so two checkouts of one version pass. With no worker yet (batch jobs still queued)
    it waits for the first one, saying so on stderr; workers that join after this check are not
    checked."""

    def installed_version():  # nested, so sent by value: workers need not import this module
        try:
            import ensir_flow
        except Exception as error:
            return f"none importable ({type(error).__name__}: {error})"
        return ensir_flow.__version__

    if not client.nthreads():
        print(f"{scheduler}: no workers yet; waiting for the first one to join", file=sys.stderr)
        client.wait_for_workers(1)
    for worker, version in sorted(client.run(installed_version).items()):
        if version != __version__:
            raise InputError(f"{scheduler}: worker {worker} has ensir-flow {version}, this client "
                             f"{__version__}; install the same version on every worker")


def compute_function(client, progress: bool) -> Compute:
    """The `Compute` of a session: on `client` (dask's threads when None), with progress on stderr."""

    def compute(*collections, label: str = ""):
        if progress and label:
            print(f"{label} ...", file=sys.stderr)
        if client is None:
            if not progress:
                return threaded_compute(*collections)
            from dask.diagnostics import ProgressBar

            with ProgressBar(minimum=1.0, out=sys.stderr):
                return threaded_compute(*collections)
        futures = client.compute(list(collections))
        if progress:
            from distributed import progress as distributed_progress

            with contextlib.redirect_stdout(sys.stderr):  # stdout stays clean for --json
                distributed_progress(futures)
        return tuple(client.gather(futures))

    return compute


@contextlib.contextmanager
def session(scheduler: str = "threads", progress: bool = False) -> Iterator[Compute]:
    """A `Compute` on `scheduler` for the duration of the block (see the module docstring)."""
    with client_for(scheduler) as client:
        yield compute_function(client, progress)
