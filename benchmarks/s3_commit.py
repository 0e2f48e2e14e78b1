"""What committing a resumable output costs on object storage: requests and seconds, on an S3
server (moto) on 127.0.0.1, for outputs of about 10^2, 10^3 and 10^4 objects.

    python benchmarks/s3_commit.py [--objects 100 1000 10000] [--sequential-up-to 1000]

Each output is an apply output in miniature (an `ensemble` array, its per-chunk checksums and
completion marks: three objects per chunk), written as a run writes it, then committed three ways:

- one copy per object, sequentially from the client, then the staging deleted (how outputs were
  committed on object storage before they were written in place; measured up to
  --sequential-up-to objects, it takes about as long per object at any size);
- `commit._move_tree`: the same copies, concurrent, then the staging deleted in batches (what an
  `--overwrite` of an existing store still does, and the LUT, export and report folders);
- in place (`resumable.commit_resumable` of an output written under its target): the completion
  marks read, the one write of the root `zarr.json`, the staging's record removed.

Requests are counted by S3 operation as s3fs sends them (zarr's and ensir-flow's alike); seconds
are wall time on this host (a shared one: read the ratios).
"""

import argparse
import collections
import contextlib
import os
import time
import uuid

import dask.array as da
import fsspec
import numpy as np
import s3fs
import xarray as xr
import zarr
from moto.server import ThreadedMotoServer

from ensir_flow.pipelines import commit, resumable
from ensir_flow.pipelines.integrity import CHUNK_CHECKSUMS, ROOT_METADATA
from ensir_flow.pipelines.resumable import COMPLETE, start_resumable
from ensir_flow.pipelines.targets import sibling
from ensir_flow.pipelines.zarr_adapter import commit_metadata

BUCKET = "ensir-bench"
CHUNK_PIXELS = 64


@contextlib.contextmanager
def s3_server():
    """An S3 server on 127.0.0.1 with BUCKET, the environment pointing s3fs at it."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir(BUCKET)
    try:
        yield fs
    finally:
        server.stop()


REQUESTS = collections.Counter()
_call_s3 = s3fs.S3FileSystem._call_s3


async def _counted_call_s3(self, method, *args, **kwargs):
    REQUESTS[method] += 1
    return await _call_s3(self, method, *args, **kwargs)


s3fs.S3FileSystem._call_s3 = _counted_call_s3


def template(n_chunks: int) -> tuple[xr.Dataset, dict]:
    """An apply output's template of `n_chunks` chunks, and its encoding."""
    ds = xr.Dataset(
        {
            "ensemble": (("pixel", "channel"), da.zeros((n_chunks * CHUNK_PIXELS, 1), dtype=np.uint8, chunks=-1)),
            CHUNK_CHECKSUMS: (("chunk", "array"), da.zeros((n_chunks, 1), dtype=np.uint64, chunks=-1)),
        },
        attrs={"created_by": "ensir-flow 0 apply"},
    )
    return ds, {"ensemble": {"chunks": (CHUNK_PIXELS, 1)}, CHUNK_CHECKSUMS: {"chunks": (1, 1)}}


def write_chunks(location: str, n_chunks: int) -> None:
    """Every chunk, checksum row and completion mark, as the tasks write them."""
    values = np.arange(n_chunks * CHUNK_PIXELS, dtype=np.uint8).reshape(-1, 1)
    zarr.open_array(store=location, path="ensemble", mode="r+")[...] = values
    zarr.open_array(store=location, path=CHUNK_CHECKSUMS, mode="r+")[...] = np.arange(n_chunks, dtype=np.uint64)[:, None]
    zarr.open_array(store=location, path=COMPLETE, mode="r+")[...] = 1


def staged(path: str, n_chunks: int) -> str:
    """A complete output of `n_chunks` chunks in the staging beside `path` (root `zarr.json` committed)."""
    ds, encoding = template(n_chunks)
    attrs, ds.attrs = ds.attrs, {}
    staging = fsspec.core.url_to_fs(path)[0].unstrip_protocol(sibling(fsspec.core.url_to_fs(path)[1], "partial"))
    ds = ds.assign({COMPLETE: ("chunk", da.zeros(n_chunks, dtype=np.uint8, chunks=-1))})
    resumable.write_dataset(ds, staging, {**encoding, COMPLETE: {"chunks": (1,)}})
    write_chunks(staging, n_chunks)
    commit_metadata(staging, attrs)
    return staging


def sequential_copy(fs, source: str, destination: str) -> None:
    """One copy per object from the client, the root `zarr.json` last, then the source deleted."""
    for path in sorted(fs.find(source), key=lambda path: path == f"{source}/{ROOT_METADATA}"):
        fs.copy(path, destination + path[len(source) :])
    fs.rm(source, recursive=True)


def measured(step) -> tuple[float, collections.Counter]:
    REQUESTS.clear()
    start = time.perf_counter()
    step()
    return time.perf_counter() - start, collections.Counter(REQUESTS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--sequential-up-to", type=int, default=1000)
    options = parser.parse_args()
    rows = []
    with s3_server() as fs:
        for n_objects in options.objects:
            n_chunks = max(1, n_objects // 3)
            ways = ["copy, concurrent (--overwrite)", "in place"]
            if n_objects <= options.sequential_up_to:
                ways.insert(0, "copy, one by one (before)")
            for way in ways:
                path = f"s3://{BUCKET}/{uuid.uuid4().hex}/out.zarr"
                root = fsspec.core.url_to_fs(path)[1]
                if way == "in place":
                    ds, encoding = template(n_chunks)
                    location = start_resumable(path, ds, encoding, n_chunks)
                    assert location == path, location
                    write_chunks(location, n_chunks)
                    step = lambda path=path: resumable.commit_resumable(path)  # noqa: E731
                else:
                    staging = fsspec.core.url_to_fs(staged(path, n_chunks))[1]
                    move = sequential_copy if way.endswith("(before)") else commit._move_tree
                    step = lambda move=move, staging=staging, root=root: move(fs, staging, root)  # noqa: E731
                fs.invalidate_cache()
                objects = len(fs.find(root)) + len(fs.find(sibling(root, "partial")))
                seconds, requests = measured(step)
                fs.invalidate_cache()
                assert fs.exists(f"{root}/{ROOT_METADATA}") and not fs.exists(sibling(root, "partial"))
                rows.append((objects, way, seconds, requests))
                print(f"{objects:>7,} objects  {way:<32} {seconds:8.2f} s  {sum(requests.values()):>6,} requests", flush=True)
    print()
    print("| objects | commit | seconds | requests | by operation |")
    print("|--:|---|--:|--:|---|")
    for objects, way, seconds, requests in rows:
        detail = ", ".join(f"{method} {count:,}" for method, count in requests.most_common())
        print(f"| {objects:,} | {way} | {seconds:.2f} | {sum(requests.values()):,} | {detail} |")


if __name__ == "__main__":
    main()
