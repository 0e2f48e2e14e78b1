"""Where plans run: dask's threads, a local cluster, or an existing Dask cluster, with progress.

Pipelines build graphs and call a `Compute` function; this module makes that function. The CLI,
the benchmark and the tests all get their schedulers here:

    with session("local", progress=True) as compute:
        plan.run(compute)

`scheduler` is 'threads' (dask's threads in this process), 'local' (a LocalCluster sized to this
machine), a scheduler address (tcp://host:port) or a scheduler file written by
`dask scheduler --scheduler-file`. The commands (`ensir_flow.api`) run 'local' on one cluster per
process instead (`local_client`), which the CLI closes when its command ends.

On an existing cluster every worker must run the same ensir-flow code as this process
(`check_workers`: its version and a fingerprint of its installed code), or the run is refused.

Failures that a retry may not meet are `TransientError`s: a scheduler that cannot be reached, a
cluster that has had no worker for `worker_timeout` seconds while a computation waits for one,
workers that died running a task. A computation that fails has no task of its own still running
when the exception leaves `compute` (so the caller can remove what the tasks were writing).
"""

import atexit
import contextlib
import ctypes
import functools
import json
import logging
import math
import signal
import socket
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ensir_flow
from ensir_flow.errors import InputError, TransientError, first_line

#: compute(*collections, label=...) -> tuple of results, on the session's scheduler.
Compute = Callable[..., tuple]

#: The environment variable that sets the CLI's default scheduler.
SCHEDULER_ENV = "ENSIR_FLOW_SCHEDULER"

#: How long a computation on a cluster waits with no worker connected before it gives up (seconds),
#: and the environment variable that sets the CLI's default.
DEFAULT_WORKER_TIMEOUT = 600.0
WORKER_TIMEOUT_ENV = "ENSIR_FLOW_WORKER_TIMEOUT"

#: How often (seconds, at most) a computation on a cluster checks that the cluster still has workers.
WORKER_POLL = 1.0

#: Where a local cluster serves its Dask dashboard, and the environment variable that sets the CLI's
#: default. Dask's usual port, on this host's loopback only: on a shared machine the dashboard is
#: not offered to the network (reach it through an SSH tunnel, or pass ':8787' for every
#: interface). A port already taken (another user's cluster) is not an error: distributed serves the
#: dashboard on a free port instead, and the address printed is the one it got.
DEFAULT_DASHBOARD_ADDRESS = "127.0.0.1:8787"
DASHBOARD_ADDRESS_ENV = "ENSIR_FLOW_DASHBOARD_ADDRESS"

#: Library warnings that a normal run raises and that tell a user nothing they can act on:
#: (start of the message, a regular expression; category). Silenced by `quiet_libraries`.
LIBRARY_WARNINGS = (
    # zarr, whenever consolidated metadata is written: xarray reads it to open stores quickly.
    (r"Consolidated metadata is currently not part in the Zarr format 3 specification", UserWarning),
    # torch.load(weights_only=True) on the paper's LUT files, saved with pickle protocol 4.
    (r"Detected pickle protocol \d+ in the checkpoint", UserWarning),
    # distributed, when another cluster holds the dashboard's port: ours takes another one.
    (r"Port \d+ is already in use", UserWarning),
    # distributed, when a plan's graph pickles to over 10 MB (many chunks): it is sent once.
    (r"Sending large graph of size", UserWarning),
)

#: Log records of libraries that tell a user nothing more than ensir-flow's own message: logger ->
#: starts of messages. A local cluster's nanny says the first when a worker process takes over 4 s
#: to exit at the end of a run (a loaded host; the process is then killed, as it should be); a
#: worker logs a task's exception with its traceback, which the client reports in one line anyway;
#: an interrupt that lands while distributed's `sync` is starting a call makes its cancel callback
#: fail (it reads the call's future before it exists), which tornado logs with a traceback, while
#: the interrupt itself ends the command as it should.
LIBRARY_LOG_NOISE = {
    "distributed.nanny": ("Worker process still alive after",),
    "distributed.worker": ("Compute Failed",),
    "tornado.application": ("Exception in callback functools.partial(<function sync.<locals>.cancel at",),
}


class _DropMessages(logging.Filter):
    """Drops the log records whose message (arguments filled in) starts with one of `starts`."""

    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def quiet_libraries() -> None:
    """Silence, in this process, exactly the library warnings and log records listed in
    `LIBRARY_WARNINGS` and `LIBRARY_LOG_NOISE`. The CLI calls it at start-up; the workers of a
    local cluster get it through a worker plugin (`client_for`). Calling it again adds nothing."""
    for message, category in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, starts in LIBRARY_LOG_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) and f.starts == starts for f in logger.filters):
            logger.addFilter(_DropMessages(starts))


def _quiet_libraries_plugin():
    """A worker plugin that runs `quiet_libraries` on every worker, present and future. For local
    clusters only: their worker processes print warnings and logs on our stderr (the workers of
    an existing cluster print them in their own logs, which are left as they are)."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class QuietLibraries(WorkerPlugin):
        name = "ensir-flow-quiet-libraries"
        idempotent = True

        def setup(self, worker):
            quiet_libraries()

    return QuietLibraries()


def release_freed_memory() -> None:
    """Give back to the system the memory this process freed but its C library kept (glibc's
    `malloc_trim`; elsewhere nothing is done). A fit in passes frees one pass's statistics before
    the next: glibc's arenas kept them, and the resident memory crept from 0.5 to 0.9 GB over
    14 passes. (distributed trims its workers' memory by itself.)"""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def threaded_compute(*collections, label: str = "") -> tuple:
    """The simplest `Compute`: dask's local threaded scheduler, no progress display.

    Its threads are this call's own: when a task fails, the tasks already running finish and the
    queued ones are dropped before the exception is raised, so no task writes after it."""
    import dask.threaded  # here, not at the top: the CLI imports this module for its option defaults alone

    pool = ThreadPoolExecutor(dask.system.CPU_COUNT)
    try:
        # the scheduler function itself: the name 'threads' would make dask import distributed (~0.5 s)
        result = dask.compute(*collections, scheduler=dask.threaded.get, pool=pool)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return result


def local_cluster(**options):
    """A distributed LocalCluster sized to this machine, tuned for chunk-at-a-time work.

    Distributed sets MALLOC_TRIM_THRESHOLD_ in its workers, which also freezes glibc's mmap
    threshold: every chunk buffer is then mapped and unmapped afresh, and workers read Zarr 2-3x
    slower. Our tasks hold one chunk at a time, so we leave glibc's adaptive default instead.

    Its worker processes ignore SIGINT (`_interrupts_ignored`): Ctrl-C at a terminal signals every
    process of the foreground group, and each worker printed a traceback; this process alone
    stops the run, then closes the cluster.
    """
    import dask.config
    from distributed import LocalCluster

    environment = dict(dask.config.get("distributed.nanny.pre-spawn-environ"))
    environment.pop("MALLOC_TRIM_THRESHOLD_", None)
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environment}), _interrupts_ignored():
        return LocalCluster(**options)


@contextlib.contextmanager
def _interrupts_ignored():
    """SIGINT ignored (in the main thread, the only one that can set it) while the block starts
    processes, which inherit that: a process started with SIGINT ignored keeps ignoring it, Python
    included. A Ctrl-C meanwhile (the few seconds a cluster takes to start) is lost."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def announce_dashboard(client) -> None:
    """Say on stderr where the dashboard of a cluster this run started is (the first thing a Dask
    user looks for on a long job), or how to get one: distributed serves it only with bokeh."""
    import importlib.util

    if importlib.util.find_spec("bokeh") is None:
        print("dask dashboard: none (bokeh is not installed: pip install 'bokeh>=3.1')", file=sys.stderr, flush=True)
        return
    print(f"dask dashboard: {client.dashboard_link}", file=sys.stderr, flush=True)


def check_dashboard_address(address: str | None) -> None:
    """Refuse (ValueError, saying why) a dashboard address that a local cluster cannot serve at:
    not [HOST]:PORT (or a bare PORT) with a port from 0 to 65535, or a HOST that is not an address
    of this machine. distributed would fail to start the cluster, in a traceback of 80 lines.
    None (no dashboard) is accepted."""
    if address is None:
        return
    host, colon, port = address.rpartition(":")
    if not (port.isascii() and port.isdigit() and int(port) <= 65535) or ":" in host or host != host.strip():
        raise ValueError("not [HOST]:PORT with a port from 0 to 65535")
    if not host:
        return
    try:
        family, kind, protocol, _, where = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, protocol) as probe:
            probe.bind(where)
    except OSError as error:
        raise ValueError(f"{host} is not an address of this machine ({error.strerror or error})") from None


def _refuse_bad_seconds(seconds, option: str) -> None:
    """A number of seconds given through the API that is negative, NaN or infinite is a UsageError
    naming the CLI `option` (whose own checks refuse them before): distributed's timeouts fail
    on them with a traceback."""
    if seconds is not None and not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds >= 0):
        from ensir_flow.api import UsageError

        raise UsageError(f"{seconds!r} is not a finite number of seconds (0 or more)", option=option)


@contextlib.contextmanager
def client_for(scheduler: str, worker_timeout: float | None = None, dashboard_address: str | None = DEFAULT_DASHBOARD_ADDRESS):
    """A distributed Client for `scheduler` (None for 'threads'), closed (with its cluster) on exit.

    A local cluster serves its dashboard at `dashboard_address` (None: no dashboard), whose link
    is printed on stderr (`announce_dashboard`); one it cannot be served at is a UsageError
    (`check_dashboard_address`). On an existing cluster the workers are checked first
    (`check_workers`, which waits up to `worker_timeout` seconds for a first worker). A malformed
    address or a bad scheduler file is an InputError; an unreachable scheduler a TransientError.
    """
    _refuse_bad_seconds(worker_timeout, "--worker-timeout")
    if scheduler == "threads":
        yield None
        return
    from distributed import Client

    if scheduler == "local":
        try:
            check_dashboard_address(dashboard_address)
        except ValueError as error:
            from ensir_flow.api import UsageError

            raise UsageError(f"{dashboard_address}: {error}", option="--dashboard-address") from None
        with local_cluster(dashboard_address=dashboard_address) as cluster, Client(cluster) as client:
            client.register_plugin(_quiet_libraries_plugin())
            if dashboard_address is not None:
                announce_dashboard(client)
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
        raise TransientError(f"{scheduler}: cannot reach the dask scheduler ({first_line(error)})") from None
    with client:
        check_workers(client, scheduler, worker_timeout)
        yield client


#: The local cluster `local_client` started in this process, and its client.
_LOCAL_CLUSTER: dict = {}
_LOCAL_CLUSTER_LOCK = threading.Lock()


def local_client(dashboard_address: str | None = DEFAULT_DASHBOARD_ADDRESS):
    """The client of this process's local cluster, started on first use and then kept for every
    later run (the Python API's scheduler='local': a notebook or script calling several commands
    starts one cluster, not one per call), until `close_local_cluster` or the end of the process.
    When it starts, its dashboard is served at `dashboard_address` (None: none; one it cannot be
    served at is a UsageError) and its link printed once (`announce_dashboard`). Worker processes
    re-import a script without a main guard and would run its calls again: refused first
    (`refuse_unguarded_main`)."""
    from distributed import Client

    with _LOCAL_CLUSTER_LOCK:
        client = _LOCAL_CLUSTER.get("client")
        if client is not None and client.status == "running":
            return client
        close_local_cluster()
        try:
            check_dashboard_address(dashboard_address)
        except ValueError as error:
            from ensir_flow.api import UsageError

            raise UsageError(f"{dashboard_address}: {error}", option="--dashboard-address") from None
        refuse_unguarded_main()
        cluster = local_cluster(dashboard_address=dashboard_address)
        # not the default client: later runs with no scheduler named stay on threads, and other
        # Dask code of the process keeps its own scheduler
        client = Client(cluster, set_as_default=False)
        _LOCAL_CLUSTER.update(cluster=cluster, client=client)
        if not _LOCAL_CLUSTER.get("registered"):
            atexit.register(close_local_cluster)
            _LOCAL_CLUSTER["registered"] = True
        client.register_plugin(_quiet_libraries_plugin())
        if dashboard_address is not None:
            announce_dashboard(client)
        return client


def close_local_cluster() -> None:
    """Close the local cluster `local_client` started, if any (its workers stop)."""
    client, cluster = _LOCAL_CLUSTER.pop("client", None), _LOCAL_CLUSTER.pop("cluster", None)
    for closing in (client, cluster):
        if closing is not None:
            with contextlib.suppress(Exception):
                closing.close()


def refuse_unguarded_main() -> None:
    """Refuse (UsageError, one line) to start worker processes from the top level of a script
    that they would run again: distributed starts them with multiprocessing's 'spawn' method
    (`distributed.worker.multiprocessing-method`; 'forkserver' alike), which imports the
    script's `__main__` module in each of them, so a call outside `if __name__ == "__main__":`
    starts clusters within clusters, each failing in pages of tracebacks. An interactive session,
    a notebook or `python -c` has no script to import and passes, as does a call under the guard."""
    import dask

    if dask.config.get("distributed.worker.multiprocessing-method") not in ("spawn", "forkserver"):
        return
    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None)
    if not script:
        return
    line, frame = None, sys._getframe(1)
    while frame is not None:  # the outermost line of the script's own top-level code on the stack
        if frame.f_globals is vars(main) and frame.f_code.co_name == "<module>":
            line = frame.f_lineno
        frame = frame.f_back
    if line is None or _under_main_guard(script, line):
        return
    from ensir_flow.api import UsageError

    raise UsageError(
        f"{script}, line {line}: scheduler='local' starts worker processes, which import this script "
        'and would run it again: put its calls under `if __name__ == "__main__":` (or run on '
        "scheduler='threads')",
        option="--scheduler",
    )


def _under_main_guard(script: str, line: int) -> bool:
    """Whether `line` of the Python file `script` lies in the body of an `if __name__ ==
    "__main__":` (either side of the comparison); a file that cannot be read or parsed counts as
    guarded (nothing is refused on a guess)."""
    import ast

    try:
        tree = ast.parse(Path(script).read_bytes())
    except (OSError, SyntaxError, ValueError):
        return True

    def is_guard(test) -> bool:
        if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
            return False
        sides = [test.left, *test.comparators]
        return any(isinstance(side, ast.Name) and side.id == "__name__" for side in sides) and any(
            isinstance(side, ast.Constant) and side.value == "__main__" for side in sides
        )

    return any(
        isinstance(node, ast.If)
        and is_guard(node.test)
        and node.body[0].lineno <= line <= max(child.end_lineno for child in node.body)
        for node in ast.walk(tree)
    )


def _address_in_scheduler_file(path: str) -> str:
    """The scheduler address a `dask scheduler --scheduler-file` wrote into `path`."""
    if not Path(path).is_file():
        raise InputError(f"{path}: not 'threads', 'local', a scheduler address (tcp://host:port) or a scheduler file")
    try:
        return json.loads(Path(path).read_text())["address"]
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"{path}: not a dask scheduler file (JSON with the scheduler's 'address')") from None


#: The packages whose .py files make the fingerprint of an ensir-flow install: ensir_flow and those
#: of its packages that the repository keeps in folders of their own (an installed wheel has them
#: under ensir_flow/; a file found twice counts once, so both layouts of one code agree).
FINGERPRINTED_PACKAGES = ("ensir_flow", "ensir_flow.pipelines", "ensir_flow.configs")


def _installed_ensir_flow():
    """A function saying which ensir-flow the process that calls it imports: (version, fingerprint),
    the fingerprint being the SHA-256 of the installed .py files of `FINGERPRINTED_PACKAGES` (their
    names and bytes); or (why not, None) where none can be imported or read. Made nested here so
    that it is sent to workers by value: a worker runs this code, not its own copy of it (it may
    have an older one, or none)."""

    def installed(packages=FINGERPRINTED_PACKAGES):
        import hashlib
        import importlib.util
        from pathlib import Path

        try:
            import ensir_flow
        except Exception as error:
            return f"none importable ({type(error).__name__}: {error})", None
        try:
            files = {}
            for package in packages:
                spec = importlib.util.find_spec(package)
                for folder in (spec.submodule_search_locations or ()) if spec is not None else ():
                    for path in Path(folder).rglob("*.py"):
                        files.setdefault("/".join((*package.split("."), *path.relative_to(folder).parts)), path)
            digest = hashlib.sha256()
            for name in sorted(files):
                content = files[name].read_bytes()
                digest.update(f"{name}\0{len(content)}\0".encode())
                digest.update(content)
        except Exception as error:
            return f"{ensir_flow.__version__} (its code unreadable: {type(error).__name__}: {error})", None
        return ensir_flow.__version__, digest.hexdigest()

    return installed


@functools.cache
def code_fingerprint() -> str | None:
    """The fingerprint of the ensir-flow code this process imports (`_installed_ensir_flow`),
    computed once (a few milliseconds: it reads every .py file of the package)."""
    return _installed_ensir_flow()()[1]


#: The clients whose workers `check_workers` checked, with the addresses it has checked: workers
#: that join such a cluster later are checked while it computes (`_check_joined_workers`).
_CHECKED_WORKERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_workers(client, scheduler: str, worker_timeout: float | None = None) -> None:
    """Refuse (InputError) a cluster with a worker that cannot import ensir-flow, has another
    version of it, or another install of the same version (another code fingerprint,
    `code_fingerprint`: an older checkout, a half-updated image): its tasks would fail, or
    compute with other code than this run planned with. Two installs of the same code pass.

    With no worker yet (batch jobs still queued) it waits for the first one, saying so on stderr,
    for `worker_timeout` seconds at most (None or 0: for ever; then a TransientError). Workers
    that join later are checked as the cluster computes: within `WORKER_POLL` seconds of being
    seen, and when a computation ends, before its results are used (one that joins and leaves in
    between is not)."""
    _refuse_bad_seconds(worker_timeout, "--worker-timeout")
    if not client.nthreads():
        print(f"{scheduler}: no workers yet; waiting for the first one to join", file=sys.stderr)
        try:
            client.wait_for_workers(1, timeout=worker_timeout or None)
        except TimeoutError:
            raise TransientError(
                f"{scheduler}: no worker has been connected for {worker_timeout:g} s "
                "(--worker-timeout); start workers and run the same command again"
            ) from None
    found = client.run(_installed_ensir_flow())
    _refuse_other_code(found, scheduler)
    _CHECKED_WORKERS[client] = set(found)


def _check_joined_workers(client, scheduler: str, workers) -> None:
    """Check (as `check_workers`) the `workers` (addresses) that joined the cluster of `client`
    since it was checked; nothing for a client that `check_workers` never checked (a local cluster
    this process started, whose workers run its own code). A worker that left meanwhile is passed."""
    checked = _CHECKED_WORKERS.get(client)
    joined = sorted(set(workers) - checked) if checked is not None else []
    if not joined:
        return
    found = client.run(_installed_ensir_flow(), workers=joined, on_error="return")
    _refuse_other_code({worker: answer for worker, answer in found.items() if isinstance(answer, tuple)}, scheduler)
    checked.update(joined)


def _refuse_other_code(found: dict, scheduler: str) -> None:
    """An InputError naming the workers of `found` ({address: (version, fingerprint)}) whose
    ensir-flow is not this process's: another version, or the same version with other code."""
    for worker, (version, _) in sorted(found.items()):
        if version != ensir_flow.__version__:
            raise InputError(
                f"{scheduler}: worker {worker} has ensir-flow {version}, this client "
                f"{ensir_flow.__version__}; install the same version on every worker"
            )
    ours = code_fingerprint()
    other = sorted(worker for worker, (_, fingerprint) in found.items() if fingerprint != ours)
    if other:
        named = ", ".join(other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
        raise InputError(
            f"{scheduler}: worker{'s' if len(other) > 1 else ''} {named} run{'' if len(other) > 1 else 's'} "
            f"other ensir-flow code than this client (code fingerprint {found[other[0]][1][:12]}, this "
            f"client {str(ours)[:12]}): different installs of ensir-flow {ensir_flow.__version__}; "
            "install the same one on every worker"
        )


class ProgressLog:
    """Progress for logs (stderr not a terminal): plain lines, each with a timestamp and the stage,
    at most one every `interval` seconds while a stage runs, plus its start and its end."""

    def __init__(self, interval: float):
        self.interval = interval
        self.label, self.started, self.last = "", 0.0, 0.0

    @staticmethod
    def _say(text: str) -> None:
        print(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} {text}", file=sys.stderr, flush=True)

    def start(self, label: str) -> None:
        self.label, self.started = label or "compute", time.monotonic()
        self.last = self.started
        self._say(f"{self.label}: started")

    def update(self, done: int, total: int) -> None:
        now = time.monotonic()
        if total and now - self.last >= self.interval:
            self.last = now
            self._say(f"{self.label}: {100 * done // total}% ({done}/{total} tasks), {now - self.started:.0f} s")

    def finish(self) -> None:
        self._say(f"{self.label}: done in {time.monotonic() - self.started:.1f} s")


def _task_counter(log: ProgressLog):
    """A dask callback (threaded scheduler) that reports finished tasks to `log`."""
    from dask.callbacks import Callback

    class TaskCounter(Callback):
        def _posttask(self, key, result, dsk, state, worker_id):
            total = sum(len(state[name]) for name in ("ready", "waiting", "running", "finished"))
            log.update(len(state["finished"]), total)

    return TaskCounter()


#: How often (seconds, at most) progress lines are printed when stderr is not a terminal.
DEFAULT_PROGRESS_INTERVAL = 30.0


def progress_on_stderr(progress: bool | float) -> bool | float:
    """What `compute_function` shows for the progress a user asked for: False nothing; True, or a
    number of seconds, a bar when stderr is a terminal, else timestamped lines (for logs) at most
    every that many seconds (True: `DEFAULT_PROGRESS_INTERVAL`). A negative, NaN or infinite
    number of seconds is a UsageError."""
    if progress is False or progress is None:
        return False
    if progress is not True:
        _refuse_bad_seconds(progress, "--progress-interval")
    if getattr(sys.stderr, "isatty", lambda: False)():
        return True
    return DEFAULT_PROGRESS_INTERVAL if progress is True else float(progress)


def compute_function(
    client, progress: bool | float, worker_timeout: float | None = DEFAULT_WORKER_TIMEOUT, scheduler: str = "the cluster"
) -> Compute:
    """The `Compute` of a session: on `client` (dask's threads when None), with progress on stderr:
    `True` a progress bar (for a terminal), a number of seconds plain timestamped lines at most
    that often (`ProgressLog`, for logs), `False` none.

    On a cluster, a computation that has had no worker connected for `worker_timeout` seconds
    (None or 0: no limit) is cancelled with a TransientError naming `scheduler`. A negative,
    NaN or infinite number of seconds is a UsageError.
    """
    _refuse_bad_seconds(worker_timeout, "--worker-timeout")
    if not isinstance(progress, bool):
        _refuse_bad_seconds(progress, "--progress-interval")
    log = None if isinstance(progress, bool) else ProgressLog(float(progress))
    ensir_flow.kernel_cache.say_when_compiling(None if progress is False else ProgressLog._say)  # first run: kernels compiling

    def compute(*collections, label: str = ""):
        if log is not None:
            log.start(label)
            with _task_counter(log) if client is None else contextlib.nullcontext():
                result = (
                    threaded_compute(*collections)
                    if client is None
                    else _cluster_compute(client, collections, log, worker_timeout, scheduler)
                )
            log.finish()
            return result
        if progress and label:
            print(f"{label} ...", file=sys.stderr)
        if client is None:
            if not progress:
                return threaded_compute(*collections)
            from dask.diagnostics import ProgressBar

            with ProgressBar(minimum=1.0, out=sys.stderr):
                return threaded_compute(*collections)
        return _cluster_compute(client, collections, progress, worker_timeout, scheduler)

    return compute


def _cluster_compute(client, collections, progress, worker_timeout: float | None, scheduler: str) -> tuple:
    """Compute `collections` on `client`'s cluster (see `compute_function`; `progress`: a bool or
    a `ProgressLog`)."""
    from distributed import CancelledError, KilledWorker

    futures = client.compute(list(collections))
    bar = _ProgressLine.start(client, futures, progress if isinstance(progress, ProgressLog) else None) if progress else None
    succeeded = False
    try:
        with client.as_current():  # distributed's `wait` waits through the current client, which `client` may not be
            _wait_while_workers(client, futures, worker_timeout, scheduler)
        if client in _CHECKED_WORKERS:  # before the results are used: a worker that joined late computed some
            _check_joined_workers(client, scheduler, _workers_now(client, scheduler))
        result = tuple(client.gather(futures))
        succeeded = True
        return result
    except KilledWorker as error:
        task = error.args[0] if error.args else "a task"
        raise TransientError(
            f"{scheduler}: workers died while running task {task!r} (lost, killed or out of "
            "memory); run the same command again, with more memory per worker if it repeats"
        ) from None
    except CancelledError:
        raise TransientError(
            f"{scheduler}: the computation was cancelled by the cluster (scheduler restarted or "
            "connection lost); run the same command again"
        ) from None
    finally:
        if bar is not None:
            bar.stop(disconnect=not succeeded)  # after success the bar ends by itself: every key is done
        if not succeeded:
            _cancel_and_settle(client, futures, collections)


def _wait_while_workers(client, futures, worker_timeout: float | None, scheduler: str) -> None:
    """Wait until every future is done or one has failed, giving up with a TransientError when the
    cluster has had no worker for `worker_timeout` seconds. Every `poll` seconds at most it looks
    at the workers, if it has a reason to: that timeout, or a cluster whose workers joining later
    must be checked (`_check_joined_workers`)."""
    from distributed import CancelledError, wait
    from distributed.client import FIRST_COMPLETED

    poll = min(WORKER_POLL, worker_timeout / 4) if worker_timeout else WORKER_POLL
    watching = bool(worker_timeout) or client in _CHECKED_WORKERS
    last_seen = last_looked = time.monotonic()
    while True:
        pending = [f for f in futures if f.status == "pending"]
        if not pending or any(f.status not in ("pending", "finished") for f in futures):
            return  # all done, or one failed: gather raises its exception
        timed_out = False
        try:
            wait(pending, timeout=poll, return_when=FIRST_COMPLETED)
        except TimeoutError:
            timed_out = True
        except CancelledError:
            return
        if not watching or not (timed_out or time.monotonic() - last_looked >= poll):
            continue
        last_looked = time.monotonic()
        workers = _workers_now(client, scheduler)
        _check_joined_workers(client, scheduler, workers)
        if workers:
            last_seen = time.monotonic()
        elif worker_timeout and time.monotonic() - last_seen >= worker_timeout:
            raise TransientError(
                f"{scheduler}: no worker has been connected for {worker_timeout:g} s "
                "(--worker-timeout); computation cancelled: start workers and run the same command again"
            )


def _workers_now(client, scheduler: str) -> dict:
    """The workers of `client`'s cluster now ({address: threads}); a lost scheduler is a TransientError."""
    try:
        return client.nthreads()
    except OSError as error:
        raise TransientError(
            f"{scheduler}: lost the connection to the dask scheduler ({first_line(error)}); run the same command again"
        ) from None


def _cancel_and_settle(client, futures, collections, timeout: float = 30.0) -> None:
    """Cancel a failed computation and wait (up to `timeout` s) until no task of it still runs on a
    worker: a cancelled task that is running finishes, and what it writes must not land after the
    caller has cleaned up. Best effort: a cluster that cannot answer is not waited for."""
    try:
        client.cancel(futures)
        keys = {key for collection in collections for key in dict(collection.__dask_graph__())}
    except Exception:
        return

    def executing(dask_worker):  # nested, so sent by value
        state = getattr(dask_worker, "state", None)
        return [ts.key for ts in getattr(state, "executing", ())]

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            running = client.run(executing, on_error="return")
        except Exception:
            return
        if not any(key in keys for found in running.values() if isinstance(found, list) for key in found):
            return
        time.sleep(0.1)


def _scheduler_progress(client, futures, on_update: Callable[[int, int], None], on_end: Callable[[], None]):
    """The scheduler's progress feed for `futures`, as distributed's progress bars get it: an
    object whose coroutine `listen()` calls `on_update(done, total)` (tasks of the futures' graphs
    done, of all) at each report, every 100 ms, then `on_end()` once every task is done or one
    has failed; its connection is `comm` once connected. The one place that relies on
    distributed's internals: the hooks `_draw_bar(remaining, all)` and `_draw_stop()` of its
    `ProgressBar` (tests/test_signals.py pins what is used of them)."""
    from distributed.diagnostics.progressbar import ProgressBar

    class Feed(ProgressBar):
        def _draw_bar(self, remaining, all, **kwargs):
            on_update(all - remaining, all)

        def _draw_stop(self, **kwargs):
            on_end()

    return Feed(futures, scheduler=client.scheduler.address)


class _ProgressLine:
    """A progress bar (or, with a `ProgressLog`, its lines) on stderr for a computation on a
    cluster, fed by the scheduler (`_scheduler_progress`) on the client's event loop while the
    caller waits (distributed's own `progress` blocks, and the wait must be able to give up)."""

    def __init__(self, client, futures, log: ProgressLog | None = None):
        self.lock, self.active, self.drawn, self.loop = threading.Lock(), True, False, client.loop
        self.log, self.started = log, time.monotonic()
        self.futures = futures
        self.feed = _scheduler_progress(client, futures, self._draw, lambda: self.stop(disconnect=False))

    def _draw(self, done: int, total: int) -> None:
        if self.log is not None:
            self.log.update(done, total)
            return
        from distributed.diagnostics.progress import format_time

        fraction = done / total if total else 1.0
        with self.lock:
            if self.active:
                self.drawn = True
                sys.stderr.write(
                    f"\r[{'#' * int(40 * fraction):<40}] | {int(100 * fraction)}% Completed | "
                    f"{format_time(time.monotonic() - self.started)}"
                )
                sys.stderr.flush()

    @classmethod
    def start(cls, client, futures, log: ProgressLog | None = None) -> "_ProgressLine":
        line = cls(client, futures, log)
        client.loop.add_callback(line._listen)
        return line

    async def _listen(self) -> None:
        """Listen to the scheduler unless stopped before the event loop got here. While listening,
        the line (so its futures) stays alive: the scheduler's side waits until the futures' keys
        exist, and a listener that connected after they were released would wait for them until the
        cluster shut down, which logs that wait's cancellation as an error."""
        if self.active:
            await self.feed.listen()

    def stop(self, disconnect: bool = True) -> None:
        """Stop drawing, clear the line if something was drawn and, unless the feed got to its end,
        disconnect it from the scheduler (whose feed then ends quietly)."""
        with self.lock:
            if self.active and self.drawn:
                sys.stderr.write("\33[2K\r")
                sys.stderr.flush()
            self.active = False
        comm = getattr(self.feed, "comm", None)
        if disconnect and comm is not None and not comm.closed():
            self.loop.add_callback(comm.close)


@contextlib.contextmanager
def session(
    scheduler: str = "threads",
    progress: bool | float = False,
    worker_timeout: float | None = DEFAULT_WORKER_TIMEOUT,
    dashboard_address: str | None = DEFAULT_DASHBOARD_ADDRESS,
) -> Iterator[Compute]:
    """A `Compute` on `scheduler` for the duration of the block (see the module docstring); a local
    cluster serves its dashboard at `dashboard_address` (`client_for`)."""
    with client_for(scheduler, worker_timeout, dashboard_address) as client:
        yield compute_function(client, progress, worker_timeout, scheduler)
