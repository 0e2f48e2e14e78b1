"""Where the numba kernels are cached on disk, and the line a run prints while it compiles them.

Every kernel is compiled on its first call in a process and saved to numba's disk cache, which
later processes (runs, Dask workers) load from instead of compiling again (docs/first-run.md has
the figures). numba's own default puts that cache beside the installed package (`__pycache__`),
else in ~/.cache/numba, and a process that can write neither (a read-only install in a container
without a writable home) cannot import the kernels at all. So `use_writable_cache`, run when
`ensir_flow` is imported (before numba is), points numba at a directory of the user's: the
`NUMBA_CACHE_DIR` the user set, else the first usable of $XDG_CACHE_HOME/ensir-flow/numba
(~/.cache/ensir-flow/numba) and <temporary directory>/ensir-flow-<uid>/numba. It sets
`NUMBA_CACHE_DIR` in the environment, so that processes started from this one (local Dask
workers) use the same directory. With no usable directory at all, the kernels are compiled in
every process and not saved (`CACHE` is False).

A directory under the shared temporary directory is used only when this user owns it and no one
else can write to it: a cache file is native code, run as it is loaded.

A run says when it compiles: a line "compiling kernels (first run on this machine)" through the
command's progress (`say_when_compiling`, which `pipelines.executor.compute_function` calls; none
with --no-progress) when a kernel of ensir-flow starts compiling, again at most every
`NOTICE_INTERVAL` seconds while more of them do.
"""

import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

#: The environment variable naming numba's cache directory (numba reads it when imported).
CACHE_DIR_ENV = "NUMBA_CACHE_DIR"
#: Seconds between two "compiling kernels" lines while kernels keep compiling.
NOTICE_INTERVAL = 5.0
NOTICE = "compiling kernels (first run on this machine)"


def cache_directory(environ: Mapping[str, str] = os.environ) -> Path | None:
    """The directory numba should cache the kernels in, for the environment `environ`: the user's
    `NUMBA_CACHE_DIR`, else the first of $XDG_CACHE_HOME/ensir-flow/numba (default
    ~/.cache/ensir-flow/numba) and <temporary directory>/ensir-flow-<uid>/numba that is (or can be
    made) a directory this process can write and only this user can; None when neither is."""
    if environ.get(CACHE_DIR_ENV):
        return Path(environ[CACHE_DIR_ENV])
    user_cache = _user_cache(environ)
    if user_cache is not None and _private_directory(user_cache / "ensir-flow" / "numba"):
        return user_cache / "ensir-flow" / "numba"
    try:
        shared = Path(tempfile.gettempdir()) / f"ensir-flow-{os.getuid()}"
    except OSError:  # no usable temporary directory at all
        return None
    if _private_directory(shared) and _private_directory(shared / "numba"):
        return shared / "numba"
    return None


def _user_cache(environ: Mapping[str, str]) -> Path | None:
    """$XDG_CACHE_HOME, else ~/.cache; None when neither is an absolute path (a relative one is
    ignored, as the XDG specification says; a user without a home has none)."""
    if os.path.isabs(environ.get("XDG_CACHE_HOME", "")):
        return Path(environ["XDG_CACHE_HOME"])
    home = environ.get("HOME") or os.path.expanduser("~")
    return Path(home) / ".cache" if os.path.isabs(home) else None


def _private_directory(path: Path) -> bool:
    """Whether `path` is, or can be made, a directory (not a link to one) that this user owns, that
    no other user can write to, and that this process can write a file in."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        status = path.lstat()
        if not path.is_dir() or path.is_symlink() or status.st_uid != os.getuid() or status.st_mode & 0o022:
            return False
        tempfile.TemporaryFile(dir=path).close()  # a read-only mount passes the checks above
    except OSError:
        return False
    return True


def use_writable_cache() -> Path | None:
    """Point numba's cache at `cache_directory()` (through `NUMBA_CACHE_DIR`, also read by numba
    if it is imported already) and return it; None, and nothing changed, when there is none."""
    directory = cache_directory()
    if directory is None or os.environ.get(CACHE_DIR_ENV):
        return directory
    os.environ[CACHE_DIR_ENV] = str(directory)
    if "numba.core.config" in sys.modules:
        sys.modules["numba.core.config"].reload_config()
    return directory


#: Whether the kernels are cached on disk (`cache=CACHE` in their decorators).
CACHE = use_writable_cache() is not None

_say: Callable[[str], None] | None = None
_last_notice = -float("inf")
_listening = False


def notice() -> str:
    """What a run says when it compiles kernels: that it does, and where they are kept for later runs."""
    where = os.environ.get(CACHE_DIR_ENV)
    if CACHE and where:
        return f"{NOTICE}; cached for later runs in {where}"
    if CACHE:
        return NOTICE
    return f"{NOTICE}; not cached: no writable directory for them, set {CACHE_DIR_ENV} to one"


def say_when_compiling(say: Callable[[str], None] | None) -> None:
    """Have `say` receive `notice()` when a kernel of ensir-flow starts compiling in this process,
    again at most every `NOTICE_INTERVAL` seconds while more of them compile (None: say nothing).
    The first call with a `say` starts listening to numba's compile events."""
    global _say, _last_notice, _listening
    _say, _last_notice = say, -float("inf")
    if say is None or _listening:
        return
    from numba.core import event

    class CompileNotices(event.Listener):
        def on_start(self, event):
            global _last_notice
            function = getattr(event.data.get("dispatcher"), "py_func", None)
            if _say is None or not getattr(function, "__module__", "").startswith("ensir_flow."):
                return
            now = time.monotonic()
            if now - _last_notice >= NOTICE_INTERVAL:
                _last_notice = now
                _say(notice())

        def on_end(self, event):
            pass

    event.register("numba:compile", CompileNotices())
    _listening = True
