"""Object storage for real: ingest, fit, apply and evaluate through s3:// URLs against an
S3-compatible server (moto) that the test starts on 127.0.0.1."""

import pytest

from helpers import run_workflow

moto_server = pytest.importorskip("moto.server", reason="moto[server] is a test dependency (pip install -e '.[test]')")
s3fs = pytest.importorskip("s3fs", reason="s3fs is a test dependency (pip install -e '.[test]')")


pytestmark = pytest.mark.slow  # starts an S3 server (moto)


@pytest.fixture
def s3_bucket(monkeypatch):
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for name, value in {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir("ensir-test")
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def test_workflow_through_s3(s3_bucket, invoke, corpus):
    root, models = corpus
    base = "s3://ensir-test/run"
    assert run_workflow(invoke, root, base)["images"] == 3
    listing = s3_bucket.ls("ensir-test/run")
    assert sorted(p.rsplit("/", 1)[-1] for p in listing) == ["lut.zarr", "out.zarr", "png", "s.zarr"]
    assert len(s3_bucket.ls("ensir-test/run/png")) == 3
    again = invoke("apply", f"{base}/s.zarr", f"{base}/lut.zarr", f"{base}/out.zarr", "--no-progress")
    assert again.exit_code == 0 and "nothing to do" in again.stdout
