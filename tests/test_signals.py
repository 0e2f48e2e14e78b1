"""An interrupted command ends in one line and the exit code of its signal, keeps what it staged
and resumes when run again: Ctrl-C (SIGINT, sent to the whole process group as a terminal does,
local cluster workers included) exits 130, SIGTERM 143. Also pins what the cluster progress bar
uses of distributed's progress feed."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import make_corpus

INTERRUPTED = "interrupted: re-run the same command to resume"

#: Imported by every Python process started with its folder on PYTHONPATH (local cluster workers
#: included): chunk writes take SLOW_CHUNK_WRITES seconds, so a signal lands mid-run.
SLOW_WRITES = """
import asyncio, os

if os.environ.get("SLOW_CHUNK_WRITES"):
    import zarr.storage

    _set = zarr.storage.LocalStore.set

    async def _slow_set(self, key, value, *args, **kwargs):
        if "/c/" in f"/{key}":
            await asyncio.sleep(float(os.environ["SLOW_CHUNK_WRITES"]))
        return await _set(self, key, value, *args, **kwargs)

    zarr.storage.LocalStore.set = _slow_set
"""

COMMAND = ["ingest", "corpus", "s.zarr", "--chunk-pixels", "64", "--no-progress", "--dashboard-address", "none"]


def _interrupt_ingest(tmp_path: Path, scheduler: str, signum: int, to_group: bool) -> subprocess.CompletedProcess:
    """Run ingest (chunk writes slowed) and send `signum` once its first chunks are marked complete
    in its staging, to the process or (as Ctrl-C at a terminal) to its whole process group."""
    make_corpus(tmp_path / "corpus")
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow" / "sitecustomize.py").write_text(textwrap.dedent(SLOW_WRITES))
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "slow"), "SLOW_CHUNK_WRITES": "0.2", "ENSIR_FLOW_SCHEDULER": scheduler}
    marks = tmp_path / ".s.zarr.partial" / "chunk_complete" / "c"  # the resumable staging's completion marks
    run = subprocess.Popen(
        [sys.executable, "-m", "ensir_flow.cli", *COMMAND],
        cwd=tmp_path,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not (marks.is_dir() and any(marks.iterdir())) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert run.poll() is None, run.communicate()
    if to_group:
        os.killpg(run.pid, signum)
    else:
        run.send_signal(signum)
    stdout, stderr = run.communicate(timeout=120)
    return subprocess.CompletedProcess(run.args, run.returncode, stdout, stderr)


def _assert_interrupted_then_resumed(tmp_path: Path, interrupted: subprocess.CompletedProcess, code: int) -> None:
    assert (interrupted.returncode, interrupted.stderr, interrupted.stdout) == (code, INTERRUPTED + "\n", ""), interrupted.stderr
    assert not (tmp_path / "s.zarr").exists() and (tmp_path / ".s.zarr.partial").is_dir()
    env = {**os.environ, "ENSIR_FLOW_SCHEDULER": "threads"}
    again = subprocess.run(
        [sys.executable, "-m", "ensir_flow.cli", *COMMAND, "--json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    assert result["status"] == "resumed" and 0 < result["chunks_written"] < result["chunks_total"]


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_run_is_one_line_and_resumes_on_threads(tmp_path, signum, code):
    _assert_interrupted_then_resumed(tmp_path, _interrupt_ingest(tmp_path, "threads", signum, to_group=False), code)


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum, code, to_group", [(signal.SIGINT, 130, True), (signal.SIGTERM, 143, False)], ids=["Ctrl-C to the group", "SIGTERM"]
)
def test_an_interrupted_run_on_a_local_cluster_is_one_line_from_client_and_workers(tmp_path, signum, code, to_group):
    _assert_interrupted_then_resumed(tmp_path, _interrupt_ingest(tmp_path, "local", signum, to_group), code)


def test_the_cluster_progress_feed_reports_tasks_done_of_all_then_ends():
    """What `executor._scheduler_progress` takes from distributed's ProgressBar hooks: `_draw_bar`
    with `remaining` and `all` (tasks of the futures' graphs), `_draw_stop` once at the end."""
    import dask
    from distributed import Client, LocalCluster

    from ensir_flow.pipelines.executor import _scheduler_progress

    updates, ends = [], []
    with (
        LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        parts = [dask.delayed(time.sleep)(0.01, dask_key_name=f"part-{i}") for i in range(6)]
        futures = client.compute([dask.delayed(len)(parts)])
        feed = _scheduler_progress(client, futures, lambda done, total: updates.append((done, total)), lambda: ends.append(True))
        client.sync(feed.listen)
        assert client.gather(futures) == [6]
    assert ends == [True] and updates and updates[-1] == (7, 7)
    assert [done for done, _ in updates] == sorted(done for done, _ in updates) and {total for _, total in updates} == {7}


def sync():
    """Named as distributed.utils.sync, whose inner `cancel` tornado names in its log record."""

    def cancel():
        pass

    return cancel


def test_distributeds_failed_cancel_of_an_interrupted_call_is_not_logged_and_other_callback_errors_are(caplog):
    """An interrupt that lands while distributed's `sync` starts a call makes its `cancel` callback
    fail, which tornado logs with a traceback before the one line of the interrupt: that record is
    dropped (`executor.LIBRARY_LOG_NOISE`), any other failed callback still reaches the log."""
    import functools
    import logging

    from ensir_flow.pipelines.executor import quiet_libraries

    quiet_libraries()
    tornado_log = logging.getLogger("tornado.application")
    with caplog.at_level(logging.ERROR, logger="tornado.application"):
        tornado_log.error("Exception in callback %r", functools.partial(sync()))
        tornado_log.error("Exception in callback %r", functools.partial(print))
    assert [record.getMessage() for record in caplog.records] == [f"Exception in callback {functools.partial(print)!r}"]
