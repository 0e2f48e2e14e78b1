"""The storage guarantees, one suite on every kind of location a store may live in: a local
folder, fsspec's `memory://` and an S3 server on loopback (moto; slow). Each writer holds its
target's lock, commits all or nothing, resumes what a failed run left staged, and a reader
refuses a store replaced under it."""

import threading
import time
import uuid

import fsspec
import numpy as np
import pytest

import ensir_flow
from ensir_flow.errors import InputError, TransientError
from ensir_flow.pipelines import apply as apply_pipeline
from ensir_flow.pipelines.commit import exists
from ensir_flow.pipelines.locks import exclusive_lock
from ensir_flow.pipelines.targets import sibling


@pytest.fixture(params=["folder", "memory", pytest.param("s3", marks=pytest.mark.slow)])
def base(request, tmp_path):
    """A location to write stores under, of each kind."""
    if request.param == "folder":
        return str(tmp_path / "stores")
    if request.param == "memory":
        return f"memory://conformance-{uuid.uuid4().hex}"
    return f"{request.getfixturevalue('s3_bucket_url')}/{uuid.uuid4().hex}"


def staging_of(path: str) -> str:
    """The staging `.NAME.partial` beside `path`: the whole run, or the record of one written in place."""
    fs, root = fsspec.core.url_to_fs(path)
    return fs.unstrip_protocol(sibling(root, "partial"))


def anything_at(path: str) -> bool:
    """Whether any file or object is at `path`, a store or not."""
    fs, root = fsspec.core.url_to_fs(path)
    return fs.exists(root)


@pytest.fixture
def reference(base, corpus):
    root, _ = corpus
    ensir_flow.ingest(root, f"{base}/s.zarr", chunk_pixels=700, progress=False)
    ensir_flow.fit(f"{base}/s.zarr", f"{base}/lut.zarr", progress=False)
    return f"{base}/s.zarr", f"{base}/lut.zarr"


def test_a_held_lock_refuses_a_second_writer_and_leaves_nothing(base, reference):
    store, lut = reference
    with exclusive_lock(f"{base}/out.zarr"):
        with pytest.raises(TransientError, match="in use by another run"):
            ensir_flow.apply(store, lut, f"{base}/out.zarr", progress=False)
    assert not anything_at(f"{base}/out.zarr") and not anything_at(staging_of(f"{base}/out.zarr"))
    assert ensir_flow.apply(store, lut, f"{base}/out.zarr", progress=False).status == "written"


def test_a_failed_run_commits_nothing_and_the_next_resumes_to_the_same_bytes(base, reference, monkeypatch):
    store, lut = reference
    ensir_flow.apply(store, lut, f"{base}/whole.zarr", progress=False)
    real, written, lock = apply_pipeline.write_chunk_then_mark, [], threading.Lock()

    def last_chunk_fails(arrays, marks, index, *args, **kwargs):
        """The last chunk's write fails once the others are written (or after 10 s)."""
        if index == 3:
            deadline = time.monotonic() + 10
            while len(written) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            raise OSError("disk full (injected)")
        real(arrays, marks, index, *args, **kwargs)
        with lock:
            written.append(index)

    monkeypatch.setattr(apply_pipeline, "write_chunk_then_mark", last_chunk_fails)
    with pytest.raises(OSError, match="injected"):
        ensir_flow.apply(store, lut, f"{base}/out.zarr", progress=False)
    assert not exists(f"{base}/out.zarr") and exists(staging_of(f"{base}/out.zarr"))
    with pytest.raises(InputError, match="store not found"):
        ensir_flow.open_store(f"{base}/out.zarr")
    monkeypatch.setattr(apply_pipeline, "write_chunk_then_mark", real)
    resumed = ensir_flow.apply(store, lut, f"{base}/out.zarr", progress=False)
    assert (resumed.status, resumed.chunks_total, resumed.chunks_computed) == ("resumed", 4, 4 - len(written))
    assert sorted(written) == [0, 1, 2]
    assert not anything_at(staging_of(f"{base}/out.zarr"))
    same = [ensir_flow.open_store(path)["ensemble"].values for path in (f"{base}/out.zarr", f"{base}/whole.zarr")]
    assert np.array_equal(*same)


def test_a_store_replaced_after_planning_is_refused(base, reference, corpus, monkeypatch):
    store, lut = reference
    root, _ = corpus
    plan = apply_pipeline.plan_apply(store, lut, f"{base}/out.zarr")
    ensir_flow.ingest(root, store, chunk_pixels=700, overwrite=True, progress=False)  # same images, a new store
    with pytest.raises(TransientError, match="not the store this run planned on|replaced|changed"):
        plan.run()
    assert not exists(f"{base}/out.zarr")


def test_overwrite_refuses_what_is_not_ensir_flows(base, reference):
    store, lut = reference
    with pytest.raises(InputError, match="not"):
        ensir_flow.fit(store, store, overwrite=True, progress=False)
    assert ensir_flow.open_store(store).sizes["image"] == 3
