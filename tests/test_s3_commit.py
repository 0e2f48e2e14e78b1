"""Resumable outputs on object storage are written in place and committed by one write of their
root `zarr.json`: before it there is no store at the target for any reader (plain xarray too), a
run failed or killed before it leaves none and the next run resumes, and the commit costs a
number of requests that does not grow with the chunks. Replacing a store (`--overwrite`) still
goes through the staging, copied concurrently; what someone else put at the target is refused
and kept. On fsspec's `memory://` and on an S3 server on loopback (moto; slow)."""

import collections
import shutil
import uuid
from pathlib import Path

import dask.array as da
import fsspec
import numpy as np
import pytest
import xarray as xr
import zarr

import ensir_flow
from ensir_flow.errors import InputError
from ensir_flow.pipelines import commit as commit_module
from ensir_flow.pipelines import resumable
from ensir_flow.pipelines.commit import exists
from ensir_flow.pipelines.targets import sibling
from helpers import make_corpus


@pytest.fixture(params=["memory", pytest.param("s3", marks=pytest.mark.slow)])
def base(request):
    """A location on object storage to write outputs under."""
    if request.param == "memory":
        return f"memory://in-place-{uuid.uuid4().hex}"
    return f"{request.getfixturevalue('s3_bucket_url')}/{uuid.uuid4().hex}"


@pytest.fixture
def reference(tmp_path, corpus):
    """A local store and its LUT, with the local apply output every in-place output must equal."""
    root, _ = corpus
    store, lut = str(tmp_path / "s.zarr"), str(tmp_path / "lut.zarr")
    ensir_flow.ingest(root, store, chunk_pixels=700, progress=False)
    ensir_flow.fit(store, lut, progress=False)
    ensir_flow.apply(store, lut, str(tmp_path / "out.zarr"), progress=False)
    return store, lut, str(tmp_path / "out.zarr")


def objects(path: str) -> list[str]:
    """Every object under `path`, relative to it."""
    fs, root = fsspec.core.url_to_fs(path)
    fs.invalidate_cache()
    return sorted(name[len(root) + 1 :] for name in fs.find(root))


def no_store_at(path: str) -> None:
    """Assert that no reader finds a store at `path`: ensir-flow's, zarr's through xarray, or `exists`."""
    assert not exists(path)
    with pytest.raises(InputError, match="store not found"):
        ensir_flow.open_store(path)
    with pytest.raises(FileNotFoundError):
        xr.open_zarr(path)


def same_store(path: str, reference: str) -> None:
    """Assert that `path` holds the same variables, values and encoding as the store at `reference`."""
    written, expected = xr.open_zarr(path), xr.open_zarr(reference)
    xr.testing.assert_identical(written.drop_attrs(), expected.drop_attrs())
    for name, variable in expected.variables.items():
        assert written[name].encoding["chunks"] == variable.encoding["chunks"], name
        assert written[name].encoding["compressors"] == variable.encoding["compressors"], name


def test_an_output_written_in_place_is_no_store_until_its_commit(base, reference, monkeypatch):
    store, lut, local = reference
    output = f"{base}/out.zarr"
    seen = []
    real = resumable.commit_metadata

    def looked_at_before_the_commit(path, attrs, members=None, like=None):
        if like is not None:  # the commit of an output written in place
            no_store_at(output)
            seen.append(objects(output))
        real(path, attrs, members, like=like)

    monkeypatch.setattr(resumable, "commit_metadata", looked_at_before_the_commit)
    assert ensir_flow.apply(store, lut, output, progress=False).status == "written"
    (before,) = seen
    assert "zarr.json" not in before and "ensemble/c/0/0" in before  # the chunks were written in place
    same_store(output, local)
    assert objects(output) == sorted([*before, "zarr.json"])  # committed by that one write, nothing moved
    fs, root = fsspec.core.url_to_fs(output)
    assert objects(local) == objects(output)
    for name in before:  # every object but the root metadata (the store's identity and paths) byte for byte
        assert fs.cat_file(f"{root}/{name}") == Path(local, name).read_bytes(), name
    assert not exists(sibling(output, "partial"))


def test_an_ingest_in_place_drops_its_marks_and_records(base, corpus, tmp_path):
    root, _ = corpus
    ensir_flow.ingest(root, str(tmp_path / "s.zarr"), chunk_pixels=700, progress=False)
    ensir_flow.ingest(root, f"{base}/s.zarr", chunk_pixels=700, progress=False)
    same_store(f"{base}/s.zarr", str(tmp_path / "s.zarr"))
    assert objects(f"{base}/s.zarr") == objects(str(tmp_path / "s.zarr"))  # no mark or record left
    fs, root = fsspec.core.url_to_fs(f"{base}/s.zarr")
    for name in objects(str(tmp_path / "s.zarr")):
        if name != "zarr.json":
            assert fs.cat_file(f"{root}/{name}") == (tmp_path / "s.zarr" / name).read_bytes(), name
    assert not exists(sibling(f"{base}/s.zarr", "partial"))


@pytest.mark.parametrize("command", ["apply", "ingest"])
def test_a_run_killed_before_its_commit_leaves_no_store_and_the_next_finishes_it(base, reference, corpus, command, monkeypatch):
    store, lut, local = reference
    root, _ = corpus
    output = f"{base}/out.zarr"

    def run():
        if command == "apply":
            return ensir_flow.apply(store, lut, output, progress=False)
        return ensir_flow.ingest(root, output, chunk_pixels=700, progress=False)

    real = resumable.commit_metadata

    def killed(path, attrs, members=None, like=None):
        if like is not None:
            raise KeyboardInterrupt("killed between the last chunk and the commit")
        real(path, attrs, members, like=like)

    monkeypatch.setattr(resumable, "commit_metadata", killed)
    with pytest.raises(KeyboardInterrupt):
        run()
    no_store_at(output)
    monkeypatch.setattr(resumable, "commit_metadata", real)
    again = run()
    # apply keeps its marks, so the next run finds every chunk done; ingest's were being dropped: it starts over
    if command == "apply":
        assert (again.status, again.chunks_computed) == ("resumed", 0)
    else:
        assert (again.status, again.chunks_written) == ("written", again.chunks_total)
    same_store(output, local if command == "apply" else store)
    assert not exists(sibling(output, "partial"))


def test_objects_of_someone_else_at_the_target_are_refused_and_kept(base, reference):
    store, lut, _ = reference
    output = f"{base}/out.zarr"
    fs, root = fsspec.core.url_to_fs(output)
    fs.pipe_file(f"{root}/notes.txt", b"mine")
    for overwrite in (False, True):
        with pytest.raises(InputError, match="notes.txt|already exists"):
            ensir_flow.apply(store, lut, output, overwrite=overwrite, progress=False)
    assert objects(output) == ["notes.txt"] and fs.cat_file(f"{root}/notes.txt") == b"mine"


@pytest.mark.parametrize("base", ["memory"], indirect=True)  # its S3 paths: the tests above
def test_an_overwrite_is_staged_and_readers_see_the_old_store_or_the_new(base, reference, corpus, monkeypatch):
    store, _, _ = reference
    root, _ = corpus
    target = f"{base}/s.zarr"
    ensir_flow.ingest(root, target, chunk_pixels=700, progress=False)
    old = ensir_flow.open_store(target).attrs["store_id"]
    seen, real = [], commit_module._move_tree

    def looked_at(fs, source, destination):
        try:
            seen.append(ensir_flow.open_store(target).attrs["store_id"])
        except InputError as error:
            seen.append(str(error))
        real(fs, source, destination)

    monkeypatch.setattr(commit_module, "_move_tree", looked_at)
    ensir_flow.ingest(root, target, chunk_pixels=500, overwrite=True, progress=False)
    new = ensir_flow.open_store(target).attrs["store_id"]
    assert new != old and seen[0] == old  # the new store was staged beside, the old one read meanwhile
    assert all(item in (old, new) or "a run replacing it was interrupted" in item for item in seen)
    assert ensir_flow.open_store(target)["prediction"].encoding["chunks"][1] == 500
    assert not exists(sibling(target, "partial")) and not exists(sibling(target, "replaced"))


class _Killed(BaseException):
    """A kill, as far as the commit can tell: nothing after it runs."""


@pytest.mark.parametrize(
    "base, where",
    [
        ("memory", "old store half deleted"),
        ("memory", "new store half copied"),
        pytest.param("s3", "old store half deleted", marks=pytest.mark.slow),
    ],
    indirect=["base"],
)
def test_an_overwrite_killed_half_way_through_its_move_is_finished_by_the_next_run(base, corpus, monkeypatch, where):
    root, _ = corpus
    target = f"{base}/s.zarr"
    ensir_flow.ingest(root, target, chunk_pixels=700, progress=False)
    old = ensir_flow.open_store(target).attrs["store_id"]
    real_move, real_remove = commit_module._move_tree, commit_module._remove_tree
    fs, path = fsspec.core.url_to_fs(target)

    def killed_in_move(fs, source, destination):
        if destination != path:  # the old store moved aside: whole
            return real_move(fs, source, destination)
        files = [name for name in fs.find(source) if not name.endswith("/zarr.json")]
        fs.copy(files[: len(files) // 2], [destination + name[len(source) :] for name in files[: len(files) // 2]])
        raise _Killed

    def killed_in_removal(fs, tree):
        if tree != path:
            return real_remove(fs, tree)
        fs.rm(f"{tree}/zarr.json")  # as the removal goes: its root metadata first
        fs.rm(sorted(fs.find(tree))[:3])
        raise _Killed

    if where == "new store half copied":
        monkeypatch.setattr(commit_module, "_move_tree", killed_in_move)
    else:
        monkeypatch.setattr(commit_module, "_remove_tree", killed_in_removal)
    with pytest.raises(_Killed):
        ensir_flow.ingest(root, target, chunk_pixels=500, overwrite=True, progress=False)
    monkeypatch.setattr(commit_module, "_move_tree", real_move)
    monkeypatch.setattr(commit_module, "_remove_tree", real_remove)
    fs.invalidate_cache()
    with pytest.raises(InputError, match="a run replacing it was interrupted"):
        ensir_flow.open_store(target)
    assert exists(sibling(target, "replaced"))  # the old store, whole, beside
    assert ensir_flow.ingest(root, target, chunk_pixels=500, overwrite=True, progress=False).status in ("written", "resumed")
    written = ensir_flow.open_store(target)
    assert written.attrs["store_id"] != old and written["prediction"].encoding["chunks"][1] == 500
    assert not exists(sibling(target, "partial")) and not exists(sibling(target, "replaced"))


def test_an_append_is_committed_by_one_write_readers_seeing_the_store_as_before_until_then(base, tmp_path, monkeypatch):
    full, first = tmp_path / "full", tmp_path / "first"
    models = make_corpus(full, sizes=((24, 32), (17, 29), (40, 21)))
    for folder in ("gt", *models):
        (first / folder).mkdir(parents=True)
        for stem in ("img0", "img1"):
            shutil.copy(full / folder / f"{stem}.png", first / folder / f"{stem}.png")
    target = f"{base}/s.zarr"
    ensir_flow.ingest(full, str(tmp_path / "whole.zarr"), chunk_pixels=500, progress=False)
    ensir_flow.ingest(first, target, chunk_pixels=500, progress=False)
    seen, real = [], resumable.commit_metadata

    def looked_at(path, attrs, members=None, like=None):
        seen.append(ensir_flow.open_store(target).sizes["image"])
        real(path, attrs, members, like=like)

    monkeypatch.setattr(resumable, "commit_metadata", looked_at)
    ensir_flow.ingest(full, target, append=True, progress=False)
    assert seen == [2] and ensir_flow.open_store(target).sizes["image"] == 3
    xr.testing.assert_identical(xr.open_zarr(target).drop_attrs(), xr.open_zarr(tmp_path / "whole.zarr").drop_attrs())


@pytest.mark.slow
def test_the_commit_costs_requests_bounded_by_the_arrays_not_the_chunks(s3_bucket_url, monkeypatch):
    """Outputs of 10 and of 150 chunks (about 30 and 450 objects) cost the same requests to commit, no copy."""
    import s3fs

    requests, real_call = collections.Counter(), s3fs.S3FileSystem._call_s3

    async def counted(self, method, *args, **kwargs):
        requests[method] += 1
        return await real_call(self, method, *args, **kwargs)

    costs = {}
    for n_chunks in (10, 150):
        path = f"{s3_bucket_url}/{uuid.uuid4().hex}/out.zarr"
        template = xr.Dataset(
            {
                "ensemble": (("pixel", "channel"), da.zeros((n_chunks * 8, 1), dtype=np.uint8, chunks=-1)),
                "chunk_xxh3": (("chunk", "array"), da.zeros((n_chunks, 1), dtype=np.uint64, chunks=-1)),
            },
            attrs={"created_by": "ensir-flow 0 apply"},
        )
        location = resumable.start_resumable(
            path, template, {"ensemble": {"chunks": (8, 1)}, "chunk_xxh3": {"chunks": (1, 1)}}, n_chunks
        )
        assert location == path
        for name, values in (("ensemble", 7), ("chunk_xxh3", 3), (resumable.COMPLETE, 1)):
            zarr.open_array(store=location, path=name, mode="r+")[...] = values
        requests.clear()
        with monkeypatch.context() as patched:
            patched.setattr(s3fs.S3FileSystem, "_call_s3", counted)
            resumable.commit_resumable(path)
        costs[n_chunks] = collections.Counter(requests)
        assert int(xr.open_zarr(path)["ensemble"].values.sum()) == 7 * n_chunks * 8
    assert costs[10] == costs[150] and costs[10]["copy_object"] == 0 and costs[10]["put_object"] == 1, costs


@pytest.mark.parametrize("base", ["memory"], indirect=True)  # its S3 paths: the tests above
def test_a_plan_made_in_place_writes_beside_a_store_that_appeared_before_it_ran(base, reference, tmp_path):
    from ensir_flow.pipelines.apply import plan_apply

    store, lut, local = reference
    ensir_flow.fit(store, str(tmp_path / "average.zarr"), solver="average", progress=False)
    planned = plan_apply(store, lut, f"{base}/out.zarr", overwrite=True)  # no store there yet: planned in place
    ensir_flow.apply(store, str(tmp_path / "average.zarr"), f"{base}/out.zarr", progress=False)  # another run commits one
    assert planned.run().status == "written"
    same_store(f"{base}/out.zarr", local)
