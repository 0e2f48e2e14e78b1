"""What checking every chunk costs: fit and apply of one store with the chunk checks on, and with
them off (each chunk read as Zarr reads it, nothing compared), in turns, in this process.

    python benchmarks/integrity.py [STORE] [--runs 5] [--megapixels 16]

STORE (default: a synthetic store of --megapixels of three models and ground truth, ingested into
a temporary folder at the default chunk size) is read by `fit` (a LUT of em at bin width 32) and
`apply` as the Python API runs them on dask's threads. The checks are what `chunks.read_pixels`
adds to a plain read (`CHECKS`): the store's identity checked, the recorded checksums read, and
the XXH3-64 hash of each chunk read compared with its recorded value. The unchecked runs skip them
all; apply still hashes the chunks it writes (what later reads check), in both.
The difference of two medians of whole runs is as noisy as the runs (a few per cent on a shared
host), so the time of hashing alone every byte the command hashes (read and written, on one core, at
the rate measured here) is printed beside, as a share of the checked run. Every run figure is the
median of --runs runs.
"""

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import xxhash

import ensir_flow
from ensir_flow.pipelines import chunks
from ensir_flow.pipelines.integrity import ChunkChecksums

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import make_corpus  # noqa: E402


def unchecked_read(source, index: int, start: int, stop: int) -> np.ndarray:
    """A chunk read as Zarr reads it: no checksum, no presence check."""
    return source.array[chunks.pixel_slice(source.array, start, stop)]


def nothing(*args) -> None:
    """What the unchecked runs do instead of each step of the check."""


#: What `chunks.read_pixels` does to check the chunks it reads, by (owner, name): the store's
#: identity checked before its checksums are read, the checksums of the chunks read, each chunk
#: hashed and compared (or looked for, in a store without checksums). The unchecked runs swap
#: each for a step that does nothing (no checksums: each chunk compared with none).
CHECKS = {
    (chunks, "_refuse_if_another_store"): nothing,
    (ChunkChecksums, "rows"): nothing,
    (chunks, "_read_chunk"): unchecked_read,
    (chunks, "_check_chunk"): nothing,
}


CHECKED = {(owner, name): getattr(owner, name) for owner, name in CHECKS}


def checks_on(on: bool) -> None:
    """Run `chunks.read_pixels` with its checks (`on`), or without any (`CHECKS`)."""
    for (owner, name), unchecked in CHECKS.items():
        setattr(owner, name, CHECKED[owner, name] if on else unchecked)


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", nargs="?")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--megapixels", type=float, default=16)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ensir-integrity-") as folder:
        measure(options, Path(folder))


def measure(options, work: Path) -> None:
    """Time the runs of `options` (stores and LUTs in `work`) and print the table."""
    store = options.store
    if store is None:
        side = 1000
        n_images = max(1, round(options.megapixels * 1e6 / side**2))
        make_corpus(work / "corpus", sizes=((side, side),) * n_images)
        store = str(work / "s.zarr")
        ensir_flow.ingest(work / "corpus", store, scheduler="threads", progress=False)
    run = {"scheduler": "threads", "progress": False}
    ensir_flow.fit(store, work / "lut.zarr", overwrite=True, **run)  # numba's kernels compiled or loaded once

    def fresh_apply():  # into a new output each time: one made by the same inputs would be left 'unchanged'
        shutil.rmtree(work / "out.zarr", ignore_errors=True)
        ensir_flow.apply(store, work / "lut.zarr", work / "out.zarr", **run)

    jobs = {"fit": lambda: ensir_flow.fit(store, work / "lut.zarr", overwrite=True, **run), "apply": fresh_apply}
    times = {(job, checked): [] for job in jobs for checked in (True, False)}
    try:
        for run_index in range(options.runs):
            for job, function in jobs.items():
                for checked in (True, False) if run_index % 2 == 0 else (False, True):  # neither always first
                    checks_on(checked)
                    times[job, checked].append(timed(function))
    finally:
        checks_on(True)

    sample = np.random.default_rng(0).integers(0, 256, 64 << 20, dtype=np.uint8)
    rate = sample.nbytes / min(timed(lambda: xxhash.xxh3_64_intdigest(sample.data)) for _ in range(5)) / 1e9
    ds = ensir_flow.open_store(store)
    pixels, plane = ds.sizes["pixel"], ds.sizes["pixel"] * ds.sizes["channel"]
    # the bytes each command hashes: what it reads (fit: predictions and ground truth; apply: predictions)
    # and what it writes (apply: the ensemble)
    hashed = {"fit": (ds.sizes["model"] + 1) * plane, "apply": (ds.sizes["model"] + 1) * plane}
    print(
        f"store: {store} ({pixels / 1e6:.1f} Mpx); XXH3-64 at {rate:.1f} GB/s on this machine; "
        f"median of {options.runs} runs, dask threads"
    )
    print(f"{'command':8} {'checked s':>10} {'unchecked s':>12} {'difference':>11} {'hashing alone':>14}")
    for job in jobs:
        checked, unchecked = statistics.median(times[job, True]), statistics.median(times[job, False])
        alone = hashed[job] / rate / 1e9
        print(
            f"{job:8} {checked:10.3f} {unchecked:12.3f} {100 * (checked / unchecked - 1):10.1f}% "
            f"{alone * 1e3:8.1f} ms {100 * alone / checked:4.1f}%"
        )


if __name__ == "__main__":
    main()
