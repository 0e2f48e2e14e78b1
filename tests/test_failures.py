"""Every failure is one line and an exit code a scheduler can act on: disk full, permission denied,
a corrupt chunk, an unreachable scheduler, a cluster without workers, an existing report folder;
and no library warning on a normal run."""

import errno
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dask
import imageio.v3 as iio
import numpy as np
import pytest
import xarray as xr
import zarr.storage

from ensir_flow.pipelines.locks import exclusive_lock
from helpers import REFERENCE, make_corpus

EX_TEMPFAIL = 75


def one_line(result) -> str:
    """The single line a failed command printed on stderr."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Staging folders and lock files that commands leave beside their targets."""
    return sorted(
        p.name for p in folder.iterdir() if p.name.startswith(".") and (".partial" in p.name or p.name.endswith(".lock"))
    )


@pytest.fixture
def failing_writes(monkeypatch):
    """failing_writes(error, where): every write of a Zarr key containing `where` raises `error`
    (a callable of the key's path); returns a function that ends the failures ("space is freed")."""
    real = zarr.storage.LocalStore.set

    def install(error, where: str = "/c/"):
        async def set_or_fail(self, key, value, *args, **kwargs):
            if where in f"/{key}":
                raise error(str(Path(self.root) / key))
            return await real(self, key, value, *args, **kwargs)

        monkeypatch.setattr(zarr.storage.LocalStore, "set", set_or_fail)
        return lambda: monkeypatch.setattr(zarr.storage.LocalStore, "set", real)

    return install


def disk_full(path):  # write() reports no file name
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def fitted(corpus, tmp_path, invoke):
    """A store of 5 chunks (500 px each) and its LUT, written without failures."""
    root, _ = corpus
    assert invoke("ingest", root, tmp_path / "s.zarr", "--chunk-pixels", 500, "--no-progress").exit_code == 0
    assert invoke("fit", tmp_path / "s.zarr", tmp_path / "lut.zarr", "--no-progress").exit_code == 0
    return tmp_path


def test_disk_full_during_ingest_is_one_line_and_the_same_command_completes_once_space_is_freed(
    corpus, tmp_path, invoke, failing_writes
):
    root, _ = corpus
    target = tmp_path / "out" / "s.zarr"
    target.parent.mkdir()
    free = failing_writes(disk_full, where="/prediction/c/")  # in the tasks
    result = invoke("ingest", root, target, "--chunk-pixels", 500, "--no-progress")
    assert result.exit_code == 1
    line = one_line(result)
    assert f"{target}: No space left on device" in line and "free space and re-run the same command" in line
    assert not target.exists()
    free()
    assert invoke("ingest", root, target, "--chunk-pixels", 500, "--no-progress").exit_code == 0
    assert leftovers(target.parent) == []
    assert invoke("ingest", root, tmp_path / "clean.zarr", "--chunk-pixels", 500, "--no-progress").exit_code == 0
    np.testing.assert_array_equal(
        xr.open_zarr(target)["prediction"].values, xr.open_zarr(tmp_path / "clean.zarr")["prediction"].values
    )


def test_disk_full_during_apply_is_one_line_and_the_same_command_completes_once_space_is_freed(fitted, invoke, failing_writes):
    output = fitted / "out.zarr"
    free = failing_writes(disk_full, where="/ensemble/c/")
    result = invoke("apply", fitted / "s.zarr", fitted / "lut.zarr", output, "--no-progress")
    assert result.exit_code == 1
    line = one_line(result)
    assert f"{output}: No space left on device" in line and "free space and re-run the same command" in line
    assert not output.exists()
    free()
    assert invoke("apply", fitted / "s.zarr", fitted / "lut.zarr", output, "--no-progress").exit_code == 0
    assert leftovers(fitted) == []
    assert invoke("apply", fitted / "s.zarr", fitted / "lut.zarr", fitted / "clean.zarr", "--no-progress").exit_code == 0
    np.testing.assert_array_equal(xr.open_zarr(output)["ensemble"].values, xr.open_zarr(fitted / "clean.zarr")["ensemble"].values)


def test_disk_full_while_writing_a_lut_removes_its_staging(fitted, invoke, failing_writes):
    failing_writes(disk_full, where="/weights/c/")
    result = invoke("fit", fitted / "s.zarr", fitted / "lut2.zarr", "--no-progress")
    assert result.exit_code == 1 and "lut2.zarr: No space left on device" in one_line(result)
    assert not (fitted / "lut2.zarr").exists() and leftovers(fitted) == []


@pytest.mark.parametrize("code, reason", [(errno.EACCES, "Permission denied"), (errno.EROFS, "Read-only file system")])
def test_permission_denied_or_a_read_only_file_system_names_the_file(corpus, tmp_path, invoke, failing_writes, code, reason):
    # Tests run as root, where a read-only folder still takes writes: the write fails as it would.
    root, _ = corpus
    failing_writes(lambda path: OSError(code, os.strerror(code), path), where="/prediction/c/")
    result = invoke("ingest", root, tmp_path / "s.zarr", "--no-progress")
    assert result.exit_code == 1
    line = one_line(result)
    assert line.startswith(f"Error: {tmp_path}") and line.endswith(f": {reason}") and "/prediction/c/" in line
    assert not (tmp_path / "s.zarr").exists()


@pytest.fixture
def small_file_system(tmp_path):
    """A 256 KiB tmpfs at tmp_path/small, and a function that grows it (skipped where mount is not allowed)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mount_point, lambda: subprocess.run(["mount", "-o", "remount,size=16m", str(mount_point)], check=True)
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_a_real_full_disk_during_ingest(tmp_path, invoke, small_file_system):
    mount_point, grow = small_file_system
    rng = np.random.default_rng(0)
    for folder in ("gt", "model0", "model1"):
        (tmp_path / "noise" / folder).mkdir(parents=True)
        for i in range(3):  # incompressible: 3 x 3 x 48 KiB of pixels do not fit in 256 KiB
            iio.imwrite(tmp_path / "noise" / folder / f"img{i}.png", rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))
    target = mount_point / "s.zarr"
    result = invoke("ingest", tmp_path / "noise", target, "--chunk-pixels", 8192, "--no-progress")
    assert result.exit_code == 1
    line = one_line(result)
    assert "No space left on device" in line and "free space and re-run the same command" in line
    assert not target.exists()
    grow()
    assert invoke("ingest", tmp_path / "noise", target, "--chunk-pixels", 8192, "--no-progress").exit_code == 0
    assert leftovers(mount_point) == []
    assert xr.open_zarr(target).sizes["pixel"] == 3 * 128 * 128


def corrupt_chunk(store: Path, index: int) -> None:
    (store / "prediction" / "c" / "0" / str(index) / "0").write_bytes(b"not a chunk: corrupt bytes " * 4)


def test_a_corrupt_chunk_is_named_by_fit_and_apply(fitted, invoke):
    corrupt_chunk(fitted / "s.zarr", 1)
    expected = f"{fitted / 's.zarr'}/prediction: chunk 1 (pixels 500:1000) is unreadable (error during blosc decompression"
    for args, target in [
        (["fit", fitted / "s.zarr", fitted / "lut2.zarr"], "lut2.zarr"),
        (["fit", fitted / "s.zarr", fitted / "lut3.zarr", "--solver", "lsq"], "lut3.zarr"),
        (["apply", fitted / "s.zarr", fitted / "lut.zarr", fitted / "out.zarr"], "out.zarr"),
    ]:
        result = invoke(*args, "--no-progress")
        assert result.exit_code == 1 and expected in one_line(result), args
        assert not (fitted / target).exists()


def test_an_unreachable_scheduler_is_transient_and_a_malformed_address_is_not(corpus, tmp_path, invoke):
    root, _ = corpus
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        unreachable = invoke("ingest", root, tmp_path / "a.zarr", "--scheduler", "tcp://127.0.0.1:9", "--no-progress")
    malformed = invoke("ingest", root, tmp_path / "b.zarr", "--scheduler", "tcp://127.0.0.1", "--no-progress")
    assert unreachable.exit_code == EX_TEMPFAIL and "tcp://127.0.0.1:9: cannot reach the dask scheduler" in one_line(unreachable)
    assert malformed.exit_code == 1 and "not a dask scheduler address" in one_line(malformed)
    assert not any(tmp_path.glob("*.zarr"))


def test_a_cluster_where_no_worker_joins_in_time_is_transient(corpus, tmp_path, invoke):
    from distributed import LocalCluster

    root, _ = corpus
    with LocalCluster(n_workers=0, processes=True, dashboard_address=None) as empty:
        started = time.monotonic()
        result = invoke(
            "ingest", root, tmp_path / "s.zarr", "--scheduler", empty.scheduler_address, "--worker-timeout", 1, "--no-progress"
        )
        elapsed = time.monotonic() - started
    assert result.exit_code == EX_TEMPFAIL and elapsed < 30
    assert "no worker has been connected for 1 s" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "s.zarr").exists()


def test_a_held_lock_is_transient(fitted, invoke):
    with exclusive_lock(str(fitted / "out.zarr")):
        result = invoke("apply", fitted / "s.zarr", fitted / "lut.zarr", fitted / "out.zarr", "--no-progress")
    assert result.exit_code == EX_TEMPFAIL and "in use by another run" in one_line(result)


KILL_ON_READ = """
import os
import zarr

def _die(self, *args, **kwargs):  # the worker process dies at its first chunk read
    os._exit(1)

zarr.Array.__getitem__ = _die
"""


@pytest.mark.slow
def test_losing_every_worker_mid_run_ends_the_command_after_the_worker_timeout(fitted, invoke, tmp_path):
    from distributed import Client, LocalCluster

    preload = tmp_path / "kill_on_read.py"
    preload.write_text(KILL_ON_READ)
    with (
        LocalCluster(n_workers=0, processes=True, dashboard_address=None) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):  # the CLI plans with dask threads, as it does alone
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dask",
                "worker",
                cluster.scheduler_address,
                "--no-nanny",
                "--nthreads",
                "1",
                "--no-dashboard",
                "--preload",
                str(preload),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            client.wait_for_workers(1, timeout=60)
            started = time.monotonic()
            result = invoke(
                "fit",
                fitted / "s.zarr",
                fitted / "lut2.zarr",
                "--scheduler",
                cluster.scheduler_address,
                "--worker-timeout",
                3,
                "--no-progress",
            )
            elapsed = time.monotonic() - started
            assert worker.wait(timeout=10) == 1  # it died mid-run, at its first read
        finally:
            worker.kill()
            worker.wait()
    assert result.exit_code == EX_TEMPFAIL and 3 <= elapsed < 60
    assert "no worker has been connected for 3 s" in one_line(result)
    assert not (fitted / "lut2.zarr").exists() and leftovers(fitted) == []


@pytest.mark.slow
def test_a_corrupt_chunk_read_by_a_worker_process_is_named_too(fitted, invoke):
    from distributed import LocalCluster

    corrupt_chunk(fitted / "s.zarr", 2)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        result = invoke(
            "apply",
            fitted / "s.zarr",
            fitted / "lut.zarr",
            fitted / "out.zarr",
            "--scheduler",
            cluster.scheduler_address,
            "--no-progress",
        )
    assert result.exit_code == 1
    assert f"{fitted / 's.zarr'}/prediction: chunk 2 (pixels 1000:1500) is unreadable" in one_line(result)


@pytest.fixture
def no_evaluation(monkeypatch):
    """Evaluations fail the test if they start."""
    import ensir_flow.pipelines.evaluate as evaluate

    def refuse(*args, **kwargs):
        raise AssertionError("the evaluation started")

    monkeypatch.setattr(evaluate, "plan_evaluate", refuse)
    monkeypatch.setattr(evaluate, "plan_cross_validation", refuse)


def test_an_existing_report_folder_or_one_under_a_file_is_refused_before_any_work(tmp_path, invoke, no_evaluation):
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "mine.txt").write_text("not ensir-flow's")
    (tmp_path / "a-file").write_text("")
    for report, message in [
        (tmp_path / "report", f"{tmp_path / 'report'}: already exists"),
        (tmp_path / "a-file" / "report", f"{tmp_path / 'a-file'} is a file, not a folder"),
    ]:
        for extra in ([], ["--cv", 2]):
            result = invoke("evaluate", tmp_path / "s.zarr", "--report", report, *extra, "--no-progress")
            assert result.exit_code == 1 and message in one_line(result) and result.stdout == ""
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["mine.txt"]


def test_the_exit_codes_are_documented(invoke):
    text = invoke("--help").stdout
    assert "Exit codes" in text and "75" in text and "EX_TEMPFAIL" in text
    assert "--worker-timeout SECONDS" in invoke("apply", "--help").stdout


def paper_lut_with_protocol_4(path: Path) -> None:
    """A paper-format LUT (K = 2, bin width 128) pickled with protocol 4: torch's safe loader warns
    about the protocol, then refuses the file."""
    import torch

    edges = [(a, b) for a in (0, 128) for b in (0, 128)]
    torch.save({key: [torch.tensor([0.25, 0.75])] * 3 for key in edges}, path, pickle_protocol=4)


DRIVER = """
import sys
from ensir_flow.cli import main

for args, expected in {commands}:
    print("$", " ".join(args), file=sys.stderr, flush=True)
    try:
        main(args)
    except SystemExit as stop:
        if (stop.code or 0) != expected:
            sys.exit(f"exit {{stop.code}}, expected {{expected}}")
"""


def run_commands(commands: list[tuple[list, int]], cwd: Path, scheduler: str) -> str:
    """Run CLI commands [(arguments, expected exit code)] in one fresh Python process with the
    default warning filters; its stderr."""
    commands = [([str(a) for a in args], expected) for args, expected in commands]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["ENSIR_FLOW_SCHEDULER"] = scheduler
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(DRIVER).format(commands=json.dumps(commands))],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr
    return run.stderr


@pytest.mark.slow
def test_no_library_warning_reaches_the_user_on_a_normal_run(tmp_path):
    make_corpus(tmp_path / "corpus")
    paper_lut_with_protocol_4(tmp_path / "protocol4.pth")
    commands = [
        (["ingest", "corpus", "s.zarr"], 0),
        (["fit", "s.zarr", "lut.zarr"], 0),
        (["fit", "s.zarr", "zzpm.zarr", "--solver", "zzpm"], 0),
        (["apply", "s.zarr", "lut.zarr", "out.zarr", "--export-dir", "png"], 0),
        (["apply", "s.zarr", "zzpm.zarr", "out-zzpm.zarr"], 0),
        (["evaluate", "s.zarr", "--ensemble", "out.zarr", "--report", "report"], 0),
        (["evaluate", "s.zarr", "--cv", "3", "--json"], 0),
        (["info", "out.zarr"], 0),
        (["lut", "export", "lut.zarr", "lut.json"], 0),
        (["lut", "import", "protocol4.pth", "refused.zarr", "--models", "a,b", "--bin-width", "128"], 1),
    ]
    paper = REFERENCE / "luts" / "weight_GoPro_MPRNet_Restormer_DGUNet_b32_rgb.pth"
    if paper.exists():
        commands.append((["lut", "import", paper, "paper.zarr", "--models", "MPRNet,Restormer,DGUNet", "--bin-width", "32"], 0))
    stderr = run_commands(commands, tmp_path, "threads")
    assert (tmp_path / "report" / "index.html").exists() and not (tmp_path / "refused.zarr").exists()
    assert "not a loadable weights-only EnsIR LUT" in stderr
    assert "Warning" not in stderr and "WARNING" not in stderr, stderr


@pytest.mark.slow
def test_no_library_warning_reaches_the_user_with_a_local_cluster(tmp_path):
    make_corpus(tmp_path / "corpus")
    with socket.socket() as dashboard:  # the dashboard's default port taken, as by another cluster
        try:
            dashboard.bind(("", 8787))
        except OSError:
            pass  # taken already
        stderr = run_commands(
            [
                (["ingest", "corpus", "s.zarr"], 0),
                (["fit", "s.zarr", "lut.zarr"], 0),
                (["apply", "s.zarr", "lut.zarr", "out.zarr"], 0),
            ],
            tmp_path,
            "local",
        )
    assert (tmp_path / "out.zarr").exists()
    assert "Warning" not in stderr and "WARNING" not in stderr, stderr
