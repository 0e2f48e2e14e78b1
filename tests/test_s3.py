"""Object storage for real: ingest, fit, apply and evaluate through s3:// URLs against an
S3-compatible server (moto) that the test starts on 127.0.0.1."""

import pytest

from helpers import run_workflow, s3_server

pytestmark = pytest.mark.slow  # starts an S3 server (moto)


@pytest.fixture
def s3_bucket(monkeypatch):
    with s3_server(monkeypatch) as fs:
        yield fs


def test_workflow_through_s3(s3_bucket, invoke, corpus):
    root, models = corpus
    base = "s3://ensir-test/run"
    assert run_workflow(invoke, root, base)["images"] == 3
    listing = s3_bucket.ls("ensir-test/run")
    assert sorted(p.rsplit("/", 1)[-1] for p in listing) == ["lut.zarr", "out.zarr", "png", "s.zarr"]
    assert len(s3_bucket.ls("ensir-test/run/png")) == 3
    again = invoke("apply", f"{base}/s.zarr", f"{base}/lut.zarr", f"{base}/out.zarr", "--no-progress")
    assert again.exit_code == 0 and "nothing to do" in again.stdout
