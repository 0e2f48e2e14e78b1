"""Production runs: a killed apply or ingest resumes where it stopped; a finished one is a no-op; one at a time."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from helpers import make_corpus
from ensir_flow.pipelines.storage import exclusive_lock, resumable_location


@pytest.fixture
def fitted(tmp_path, invoke, request):
    """A reference store and its LUT; many small chunks where a test needs a long-running apply."""
    chunk_pixels = getattr(request, "param", 100_000)
    make_corpus(tmp_path / "corpus", sizes=((120, 100), (90, 110), (100, 100)))
    assert invoke("ingest", tmp_path / "corpus", tmp_path / "s.zarr", "--chunk-pixels", chunk_pixels, "--no-progress").exit_code == 0
    assert invoke("fit", tmp_path / "s.zarr", tmp_path / "lut.zarr", "--no-progress").exit_code == 0
    return tmp_path


@pytest.mark.slow
def test_killed_ingest_resumes_from_the_chunks_written(tmp_path, invoke):
    make_corpus(tmp_path / "corpus", sizes=((120, 100), (90, 110), (100, 100)))
    command = ["ingest", "corpus", "s.zarr", "--chunk-pixels", 1000, "--no-progress"]
    hook = Path(__file__).with_name("kill_after_writes.py")
    count = tmp_path / "writes.count"
    env = {**os.environ, "ENSIR_FLOW_SCHEDULER": "threads"}
    total = subprocess.run([sys.executable, hook, "0", count, "--", *map(str, command)], cwd=tmp_path, env=env, check=True)
    assert total.returncode == 0
    writes = int(count.read_text())
    os.rename(tmp_path / "s.zarr", tmp_path / "clean.zarr")
    killed = subprocess.run([sys.executable, hook, str(writes * 2 // 3), count, "--", *map(str, command)], cwd=tmp_path, env=env)
    assert killed.returncode == 137 and not (tmp_path / "s.zarr").exists()
    marks = zarr.open_array(store=resumable_location(str(tmp_path / "s.zarr")), path="chunk_complete", mode="r")[:]
    assert 0 < marks.sum() < len(marks) == 32  # 31,900 pixels in chunks of 1,000

    resumed = subprocess.run([sys.executable, "-m", "ensir_flow.cli", *map(str, command)], cwd=tmp_path, env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed s.zarr: {len(marks) - marks.sum()} of {len(marks)} chunks were missing" in resumed.stdout
    xr.testing.assert_identical(xr.open_zarr(tmp_path / "s.zarr").load(), xr.open_zarr(tmp_path / "clean.zarr").load())
    assert "chunk_complete" not in xr.open_zarr(tmp_path / "s.zarr")


@pytest.mark.slow
@pytest.mark.parametrize("fitted", [100], indirect=True)
def test_killed_apply_resumes_to_the_same_bytes(fitted, invoke):
    output = fitted / "out.zarr"
    staging = resumable_location(str(output))
    command = [sys.executable, "-m", "ensir_flow.cli", "apply", str(fitted / "s.zarr"), str(fitted / "lut.zarr"), str(output),
               "--scheduler", "threads", "--no-progress", "--device", "cpu"]
    process = subprocess.Popen(command, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    deadline = time.monotonic() + 120
    completed = 0
    while time.monotonic() < deadline and process.poll() is None:
        try:
            completed = int(zarr.open_group(staging, mode="r")["chunk_complete"][:].sum())
        except Exception:  # the staging store is not there yet, or its metadata is being written
            completed = 0
        if completed >= 5:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    process.wait()
    assert completed >= 5 and process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not output.exists()
    marks = zarr.open_group(staging, mode="r")["chunk_complete"][:]
    assert 0 < marks.sum() < len(marks)

    resumed = invoke("apply", fitted / "s.zarr", fitted / "lut.zarr", output, "--no-progress")
    assert resumed.exit_code == 0, resumed.output
    assert "chunks were missing" in resumed.stdout and f"of {len(marks)} chunks" in resumed.stdout
    missing = int(resumed.stdout.split("resumed ")[1].split(": ")[1].split(" of")[0])
    assert missing <= len(marks) - marks.sum()
    invoke("apply", fitted / "s.zarr", fitted / "lut.zarr", fitted / "clean.zarr", "--no-progress")
    np.testing.assert_array_equal(xr.open_zarr(output)["ensemble"].values, xr.open_zarr(fitted / "clean.zarr")["ensemble"].values)
    assert not os.path.exists(staging)

    again = invoke("apply", fitted / "s.zarr", fitted / "lut.zarr", output, "--no-progress")
    assert again.exit_code == 0 and "already complete: nothing to do" in again.stdout


@pytest.mark.parametrize("command", [
    ["apply", "s.zarr", "lut.zarr", "out.zarr"],
    ["fit", "s.zarr", "out.zarr", "--overwrite"],  # two fits to one LUT: the second is refused
    ["ingest", "corpus", "out.zarr"],
    ["lut", "export", "lut.zarr", "out.json"],
])
def test_second_run_on_a_locked_output_is_refused(fitted, invoke, command):
    arguments = [fitted / word if word.endswith((".zarr", ".json", "corpus")) else word for word in command]
    target = arguments[-1] if command[-1] != "--overwrite" else arguments[-2]
    with exclusive_lock(str(target)):
        result = invoke(*arguments, "--no-progress")
    assert result.exit_code == 75 and "in use by another run" in result.stderr, result.output
    assert not target.exists()
    assert invoke(*arguments, "--no-progress").exit_code == 0


def test_output_of_other_inputs_is_not_overwritten_silently(fitted, invoke):
    assert invoke("apply", fitted / "s.zarr", fitted / "lut.zarr", fitted / "out.zarr", "--no-progress").exit_code == 0
    assert invoke("fit", fitted / "s.zarr", fitted / "lut2.zarr", "--solver", "average", "--no-progress").exit_code == 0
    other = invoke("apply", fitted / "s.zarr", fitted / "lut2.zarr", fitted / "out.zarr", "--no-progress")
    assert other.exit_code != 0 and "already exists (pass --overwrite" in other.stderr
    assert invoke("apply", fitted / "s.zarr", fitted / "lut2.zarr", fitted / "out.zarr", "--overwrite", "--no-progress").exit_code == 0
    assert xr.open_zarr(fitted / "out.zarr").attrs["solver"] == "average"


def test_an_empty_lock_left_by_a_killed_run_is_taken_over_once_old(fitted, invoke):
    lock = fitted / ".out.zarr.lock"
    lock.write_bytes(b"")  # a run killed between creating its lock and writing its owner into it
    fresh = invoke("apply", fitted / "s.zarr", fitted / "lut.zarr", fitted / "out.zarr", "--no-progress")
    assert fresh.exit_code == 75 and "in use by another run" in fresh.stderr  # it might be a live run's
    old = time.time() - 60
    os.utime(lock, (old, old))
    assert invoke("apply", fitted / "s.zarr", fitted / "lut.zarr", fitted / "out.zarr", "--no-progress").exit_code == 0
    assert not lock.exists()
