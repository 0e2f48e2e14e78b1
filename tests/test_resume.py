"""Production runs: a killed apply or ingest resumes where it stopped; a finished one is a no-op; one at a time."""

import collections
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from ensir_flow.pipelines import ingest
from ensir_flow.pipelines.locks import exclusive_lock
from ensir_flow.pipelines.resumable import resumable_location
from helpers import contents, make_corpus


@pytest.fixture
def fitted(tmp_path, invoke, request):
    """A reference store and its LUT; many small chunks where a test needs a long-running apply."""
    chunk_pixels = getattr(request, "param", 100_000)
    make_corpus(tmp_path / "corpus", sizes=((120, 100), (90, 110), (100, 100)))
    assert (
        invoke("ingest", tmp_path / "corpus", tmp_path / "s.zarr", "--chunk-pixels", chunk_pixels, "--no-progress").exit_code == 0
    )
    assert invoke("fit", tmp_path / "s.zarr", tmp_path / "lut.zarr", "--no-progress").exit_code == 0
    return tmp_path


@pytest.mark.slow
def test_killed_ingest_resumes_from_the_chunks_written(tmp_path):
    make_corpus(tmp_path / "corpus", sizes=((120, 100), (90, 110), (100, 100)))
    command, marks = _kill_ingest_part_way(tmp_path, 1000)
    assert len(marks) == 32  # 31,900 pixels in chunks of 1,000

    env = {**os.environ, "ENSIR_FLOW_SCHEDULER": "threads"}
    resumed = subprocess.run(
        [sys.executable, "-m", "ensir_flow.cli", *map(str, command)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed s.zarr: {len(marks) - marks.sum()} of {len(marks)} chunks were missing" in resumed.stdout
    xr.testing.assert_identical(contents(tmp_path / "s.zarr"), contents(tmp_path / "uninterrupted.zarr"))
    assert "chunk_complete" not in xr.open_zarr(tmp_path / "s.zarr")


@pytest.mark.slow
@pytest.mark.parametrize("fitted", [100], indirect=True)
def test_killed_apply_resumes_to_the_same_bytes(fitted, invoke):
    output = fitted / "out.zarr"
    staging = resumable_location(str(output))
    command = [
        sys.executable,
        "-m",
        "ensir_flow.cli",
        "apply",
        str(fitted / "s.zarr"),
        str(fitted / "lut.zarr"),
        str(output),
        "--scheduler",
        "threads",
        "--no-progress",
        "--device",
        "cpu",
    ]
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


@pytest.mark.parametrize(
    "command",
    [
        ["apply", "s.zarr", "lut.zarr", "out.zarr"],
        ["fit", "s.zarr", "out.zarr", "--overwrite"],  # two fits to one LUT: the second is refused
        ["ingest", "corpus", "out.zarr"],
        ["lut", "export", "lut.zarr", "out.json"],
    ],
)
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
    assert (
        invoke("apply", fitted / "s.zarr", fitted / "lut2.zarr", fitted / "out.zarr", "--overwrite", "--no-progress").exit_code
        == 0
    )
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


#: A run holding the lock of argv[1] for 0.3 s, from the instant argv[2]: prints when it held it, or "refused".
LOCK_HOLDER = """
import json, sys, time
from ensir_flow.errors import TransientError
from ensir_flow.pipelines.locks import exclusive_lock
start = float(sys.argv[2])
while time.time() < start:
    pass
try:
    with exclusive_lock(sys.argv[1]):
        held = time.time()
        time.sleep(0.3)
        print(json.dumps([held, time.time()]))
except TransientError:
    print("refused")
"""


@pytest.mark.slow  # many racing processes: about 14 s
def test_runs_finding_the_same_dead_holder_take_the_lock_over_one_at_a_time(tmp_path):
    """Four runs restarted at the same instant after a kill all find the dead run's lock: one takes
    it over, and no two ever hold it at once (each once removed the lock the other had just made),
    nor does one fail on a lock already removed."""
    target, lock = tmp_path / "out.zarr", tmp_path / ".out.zarr.lock"
    for _ in range(5):
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "since": "earlier"}))
        start = time.time() + 2.5  # once every interpreter has imported
        runs = [
            subprocess.Popen(
                [sys.executable, "-c", LOCK_HOLDER, str(target), str(start)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(4)
        ]
        outputs = [run.communicate() for run in runs]
        assert all(run.returncode == 0 for run in runs), [error for _, error in outputs]
        held = sorted(json.loads(out) for out, _ in outputs if out.strip() != "refused")
        assert held and all(first[1] <= then[0] for first, then in zip(held, held[1:])), held
        assert not lock.exists()


def test_a_dead_holder_is_taken_over_where_the_folder_cannot_be_locked(tmp_path, monkeypatch):
    """A network file system without flock (ENOLCK): the takeover goes ahead unserialised."""
    import errno
    import fcntl

    def no_flock(*_):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    (tmp_path / ".out.zarr.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    with exclusive_lock(str(tmp_path / "out.zarr")):
        assert json.loads((tmp_path / ".out.zarr.lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".out.zarr.lock").exists()


def _digests(root: Path, ds: xr.Dataset) -> list[list[str]]:
    """The SHA-256 of each source file of `ds` as found under `root` now, in `source_sha256`'s layout."""
    return [
        [hashlib.sha256((root / str(source) / str(name)).read_bytes()).hexdigest() for name in names]
        for source, names in zip(ds["source"].values, ds["source_file"].values)
    ]


def test_a_first_ingest_reads_each_source_file_once_and_records_its_bytes(tmp_path, invoke, monkeypatch):
    """No hashing pass before the decoding: each file is opened for its header (the probe) and once
    more, by the task that decodes it and hashes the same bytes. The digests are those of the files."""
    make_corpus(tmp_path / "corpus", sizes=((30, 20), (25, 41)))
    (tmp_path / "corpus" / "lq").mkdir()
    for stem in ("img0", "img1"):  # inputs at the outputs' size are stored too: five files per image
        shutil.copy(tmp_path / "corpus" / "model1" / f"{stem}.png", tmp_path / "corpus" / "lq")
    opened = collections.Counter()
    real_open = os.open

    def counting_open(file, *args, **kwargs):  # images.py opens source files with os.open (never blocking on a FIFO)
        if str(file).startswith(str(tmp_path / "corpus")):
            opened[Path(file).relative_to(tmp_path / "corpus").as_posix()] += 1
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", counting_open)
    result = invoke("ingest", tmp_path / "corpus", tmp_path / "s.zarr", "--chunk-pixels", 700, "--no-progress")
    monkeypatch.undo()
    assert result.exit_code == 0, result.output
    assert len(opened) == 10 and set(opened.values()) == {2}, opened
    ds = xr.open_zarr(tmp_path / "s.zarr")
    assert ds["source"].values.tolist() == ["model0", "model1", "model2", "gt", "lq"]
    assert ds["source_sha256"].values.tolist() == _digests(tmp_path / "corpus", ds)
    assert ds.attrs["source_digest"] == hashlib.sha256(" ".join(ds["source_sha256"].values.ravel()).encode()).hexdigest()
    assert "chunk_source_sha256" not in ds and "resume_protocol" not in ds.attrs


def _kill_ingest_part_way(tmp_path: Path, chunk_pixels: int) -> tuple[list, np.ndarray]:
    """Ingest tmp_path/corpus into s.zarr (kept as uninterrupted.zarr), then again, killed at two
    thirds of its writes; (the command, the completion marks the killed run left)."""
    command = ["ingest", "corpus", "s.zarr", "--chunk-pixels", chunk_pixels, "--no-progress"]
    hook = Path(__file__).with_name("kill_after_writes.py")
    count = tmp_path / "writes.count"
    env = {**os.environ, "ENSIR_FLOW_SCHEDULER": "threads"}
    subprocess.run([sys.executable, hook, "0", count, "--", *map(str, command)], cwd=tmp_path, env=env, check=True)
    os.rename(tmp_path / "s.zarr", tmp_path / "uninterrupted.zarr")
    killed = subprocess.run(
        [sys.executable, hook, str(int(count.read_text()) * 2 // 3), count, "--", *map(str, command)], cwd=tmp_path, env=env
    )
    assert killed.returncode == 137 and not (tmp_path / "s.zarr").exists()
    marks = zarr.open_array(store=resumable_location(str(tmp_path / "s.zarr")), path="chunk_complete", mode="r")[:]
    assert 0 < marks.sum() < len(marks)
    return command, marks.astype(bool)


def _images_of_chunks(sizes, chunk_pixels: int, n_chunks: int) -> list[set[int]]:
    ends = np.cumsum([h * w for h, w in sizes])
    starts = ends - [h * w for h, w in sizes]
    return [
        {i for i, (s, e) in enumerate(zip(starts, ends)) if s < (c + 1) * chunk_pixels and e > c * chunk_pixels}
        for c in range(n_chunks)
    ]


def _repaint(path: Path, seed: int) -> None:
    """New content for an image file, same size and channels."""
    import imageio.v3 as iio

    pixels = iio.imread(path)
    iio.imwrite(path, np.random.default_rng(seed).integers(0, 256, pixels.shape, dtype=np.uint8))


@pytest.mark.slow
def test_a_source_changed_between_kill_and_resume_redoes_only_the_chunks_of_its_old_bytes(tmp_path, invoke, monkeypatch):
    sizes = ((120, 100), (90, 110), (100, 100))
    make_corpus(tmp_path / "corpus", sizes=sizes)
    command, done = _kill_ingest_part_way(tmp_path, 1000)
    holding = _images_of_chunks(sizes, 1000, len(done))
    changed = next(i for i in range(len(sizes)) if any(i in holding[c] for c in np.flatnonzero(done)))
    _repaint(tmp_path / "corpus" / "model1" / f"img{changed}.png", seed=1)
    stale = sum(changed in holding[c] for c in np.flatnonzero(done))

    monkeypatch.chdir(tmp_path)  # the command as it was killed: its source path is part of what it resumes
    resumed = invoke(*command)
    assert resumed.exit_code == 0, resumed.output
    redone = int(resumed.stdout.split("resumed ")[1].split(": ")[1].split(" of")[0])
    assert redone == len(done) - done.sum() + stale < len(done)  # the missing chunks and those of the old bytes
    assert invoke("ingest", "corpus", "clean.zarr", "--chunk-pixels", 1000, "--no-progress").exit_code == 0
    resumed_store, clean = contents(tmp_path / "s.zarr"), contents(tmp_path / "clean.zarr")
    xr.testing.assert_identical(resumed_store, clean)  # the new bytes' pixels, with the new bytes' digests
    assert resumed_store["source_sha256"].values.tolist() == _digests(tmp_path / "corpus", resumed_store)


@pytest.mark.slow
def test_a_source_changed_during_a_resumed_ingest_is_refused_then_redone(tmp_path, invoke, monkeypatch):
    """A file changed after the resume checked the complete chunks but before its pixels were
    decoded for the missing ones: two chunks saw different bytes of it. The commit refuses (exit 75:
    run again) and the next run redoes the chunks of its old bytes."""
    sizes = ((120, 100), (90, 110), (100, 100))
    make_corpus(tmp_path / "corpus", sizes=sizes)
    command, done = _kill_ingest_part_way(tmp_path, 1000)
    holding = _images_of_chunks(sizes, 1000, len(done))
    spanning = next(i for i in range(len(sizes)) if {done[c] for c in range(len(done)) if i in holding[c]} == {True, False})
    changing = tmp_path / "corpus" / "gt" / f"img{spanning}.png"
    real_sha256 = ingest.file_sha256

    def hash_then_change(path):  # the resume's check of the complete chunks sees the old bytes
        digest = real_sha256(path)
        if Path(path).resolve() == changing:
            _repaint(changing, seed=2)
        return digest

    monkeypatch.chdir(tmp_path)  # the command as it was killed: its source path is part of what it resumes
    with monkeypatch.context() as patched:
        patched.setattr(ingest, "file_sha256", hash_then_change)
        refused = invoke(*command)
    assert refused.exit_code == 75 and f"gt/img{spanning}.png: changed while" in refused.stderr, refused.output
    assert not (tmp_path / "s.zarr").exists()

    again = invoke(*command)
    assert again.exit_code == 0 and "resumed" in again.stdout, again.output
    assert invoke("ingest", "corpus", "clean.zarr", "--chunk-pixels", 1000, "--no-progress").exit_code == 0
    xr.testing.assert_identical(contents(tmp_path / "s.zarr"), contents(tmp_path / "clean.zarr"))


def test_a_finished_fit_run_again_is_unchanged_until_its_store_or_options_change(tmp_path, invoke, corpus):
    """A fit killed after its commit, re-run as it was: nothing to do (not 'already exists')."""
    root, _ = corpus
    store, lut = tmp_path / "s.zarr", tmp_path / "lut.zarr"
    assert invoke("ingest", root, store, "--no-progress").exit_code == 0
    assert invoke("fit", store, lut, "--no-progress").exit_code == 0
    written = sorted((path.relative_to(lut), path.stat().st_mtime_ns) for path in lut.rglob("*"))
    again = invoke("fit", store, lut, "--json", "--no-progress")
    assert again.exit_code == 0 and json.loads(again.stdout)["status"] == "unchanged"
    assert sorted((path.relative_to(lut), path.stat().st_mtime_ns) for path in lut.rglob("*")) == written
    other = invoke("fit", store, lut, "--bin-width", 64, "--no-progress")
    assert other.exit_code == 1 and "already exists" in other.stderr
    assert invoke("ingest", root, store, "--overwrite", "--no-progress").exit_code == 0  # the same images, another store
    rewritten = invoke("fit", store, lut, "--no-progress")
    assert rewritten.exit_code == 1 and "already exists" in rewritten.stderr
