"""An ingest written in place on object storage, killed (SIGKILL) while its chunks are being
written, leaves no store for any reader, and the same command run again exits 0 with the arrays
of an uninterrupted local ingest, touching nothing else under the bucket. The S3 server (moto) is
a process of its own, so that it outlives the killed writer, as a real one would."""

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import xarray as xr

import ensir_flow
from ensir_flow.errors import InputError
from helpers import make_corpus

pytestmark = pytest.mark.slow

CLI = str(Path(sys.executable).with_name("ensir-flow"))


@pytest.fixture
def s3_process(monkeypatch):
    """A moto S3 server in a process of its own on loopback, with a bucket; the environment points s3fs at it."""
    pytest.importorskip("moto.server", reason="moto[server] is a test dependency (pip install -e '.[test]')")
    s3fs = pytest.importorskip("s3fs", reason="s3fs is a test dependency (pip install -e '.[test]')")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the moto server did not start"
                time.sleep(0.2)
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("killed")
        yield fs
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.terminate()
        server.wait(timeout=30)


def test_an_ingest_killed_while_writing_in_place_is_no_store_and_its_rerun_is_the_local_one(s3_process, tmp_path):
    fs = s3_process
    make_corpus(tmp_path / "corpus", sizes=((120, 160), (90, 140), (130, 110)))
    local = tmp_path / "local.zarr"
    ensir_flow.ingest(tmp_path / "corpus", local, chunk_pixels=2048, progress=False)
    base = f"killed/{uuid.uuid4().hex}"
    neighbours = {f"{base}/s.zarr2/data.bin": b"a neighbour sharing the prefix", f"{base}/notes.txt": b"a user's file"}
    for name, content in neighbours.items():
        fs.pipe_file(name, content)
    target = f"s3://{base}/s.zarr"
    command = [
        CLI,
        "ingest",
        str(tmp_path / "corpus"),
        target,
        "--chunk-pixels",
        "2048",
        "--scheduler",
        "threads",
        "--no-progress",
    ]

    writer = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 60
    while not fs.find(f"{base}/s.zarr/prediction/c"):  # the first chunks written in place
        assert writer.poll() is None, writer.communicate()
        assert time.monotonic() < deadline, "no chunk written in place within 60 s"
        time.sleep(0.05)
        fs.invalidate_cache()
    os.killpg(writer.pid, signal.SIGKILL)
    writer.communicate()
    assert writer.returncode == -signal.SIGKILL

    fs.invalidate_cache()
    assert fs.find(f"{base}/s.zarr") and not fs.exists(f"{base}/s.zarr/zarr.json")  # chunks, no store
    with pytest.raises(FileNotFoundError):
        xr.open_zarr(target)
    with pytest.raises(InputError, match="store not found"):
        ensir_flow.open_store(target)
    info = subprocess.run([CLI, "info", target], capture_output=True, text=True)
    assert info.returncode == 1 and "store not found" in info.stderr

    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    xr.testing.assert_identical(xr.open_zarr(target).drop_attrs(), xr.open_zarr(local).drop_attrs())
    fs.invalidate_cache()
    written = {name.split("/s.zarr/", 1)[1] for name in fs.find(f"{base}/s.zarr")}
    assert written == {str(path.relative_to(local)) for path in local.rglob("*") if path.is_file()}
    assert sorted(name.rpartition("/")[2] for name in fs.ls(base)) == ["notes.txt", "s.zarr", "s.zarr2"]
    for name, content in neighbours.items():
        assert fs.cat_file(name) == content
