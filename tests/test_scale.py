"""Out of core on a real distributed cluster: a store 8x larger than each worker's memory limit."""

import time
from dataclasses import replace

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from distributed import Client, LocalCluster

from ensir_flow import schema
from ensir_flow.blend import blend
from ensir_flow.lut import Lut, fit_lut
from ensir_flow.pipelines.apply import plan_apply
from ensir_flow.pipelines.executor import compute_function
from ensir_flow.pipelines.fit import plan_fit
from ensir_flow.stats import chunk_statistics, merge

MEMORY_LIMIT = 500_000_000
#: Workers idle at ~270-310 MB (libraries and compiled kernels): pausing them at distributed's
#: default 80% would stall them, so they pause at 90%; the nanny still restarts one at 95%.
WORKER_MEMORY = {"distributed.worker.memory.pause": 0.90, "distributed.worker.memory.terminate": 0.95}
N_MODELS = 3
CHUNK = 1 << 19


def _tile(seed: int) -> np.ndarray:
    """One chunk of (models + truth, pixel, channel): a random-walk truth and noisy predictions."""
    rng = np.random.default_rng(seed)
    truth = np.cumsum(rng.integers(-3, 4, (CHUNK, 3)), axis=0) % 256
    noise = rng.integers(-8, 9, (N_MODELS, CHUNK, 3)) + np.arange(N_MODELS)[:, None, None] * 2 - 2
    return np.concatenate([np.clip(truth[None] + noise, 0, 255), truth[None]]).astype(np.uint8)


def _write_store(path, n_chunks: int) -> None:
    tiles = [_tile(seed) for seed in range(4)]
    planes = da.concatenate(
        [da.from_delayed(dask.delayed(lambda i: tiles[i % 4])(i), tiles[0].shape, np.uint8) for i in range(n_chunks)], axis=1
    )
    n_images = n_chunks // 2
    index = schema.ImageIndex(
        [f"frame{i:04d}" for i in range(n_images)], np.full(n_images, 512), np.full(n_images, 2 * CHUNK // 512)
    )
    ds = index.to_dataset()
    ds["prediction"] = (("model", "pixel", "channel"), planes[:N_MODELS])
    ds["ground_truth"] = (("pixel", "channel"), planes[N_MODELS])
    ds.attrs = schema.store_attributes([f"m{k}" for k in range(N_MODELS)], 3)
    ds.to_zarr(
        path,
        mode="w-",
        zarr_format=3,
        encoding={"prediction": {"chunks": (N_MODELS, CHUNK, 3)}, "ground_truth": {"chunks": (CHUNK, 3)}},
    )


@pytest.mark.slow
def test_fit_and_apply_out_of_core_equal_an_in_memory_run(tmp_path):
    bytes_per_pixel = (N_MODELS + 1) * 3
    n_chunks = 2 * -(-8 * MEMORY_LIMIT // (bytes_per_pixel * CHUNK * 2))  # even, so images of 2 chunks fit
    assert n_chunks * CHUNK * bytes_per_pixel >= 8 * MEMORY_LIMIT
    store, lut_path, output = str(tmp_path / "big.zarr"), str(tmp_path / "lut.zarr"), str(tmp_path / "out.zarr")
    started = time.perf_counter()
    with dask.config.set(scheduler="threads"):
        _write_store(store, n_chunks)
    print(f"wrote {n_chunks} chunks in {time.perf_counter() - started:.1f} s")

    with (
        dask.config.set(WORKER_MEMORY),
        LocalCluster(
            n_workers=2, threads_per_worker=1, memory_limit=MEMORY_LIMIT, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        workers_before = set(client.scheduler_info()["workers"])

        compute = compute_function(client, progress=False)
        started = time.perf_counter()
        plan_fit(store, lut_path, 32, device="cpu").run(compute)
        print(f"fit in {time.perf_counter() - started:.1f} s")
        started = time.perf_counter()
        plan_apply(store, lut_path, output, device="cpu").run(compute)
        print(f"apply in {time.perf_counter() - started:.1f} s")
        assert set(client.scheduler_info()["workers"]) == workers_before, "a worker was restarted (out of memory?)"

    # The in-memory run: the store cycles through 4 tiles, so its statistics are those of the 4
    # tiles in memory, each counted as often as it occurs (statistics are additive).
    tiles = [_tile(seed) for seed in range(4)]
    repeats = [len(range(i, n_chunks, 4)) for i in range(4)]
    per_tile = [chunk_statistics(t[:N_MODELS], t[N_MODELS], 32) for t in tiles]
    expected = fit_lut(
        merge(*[replace(s, moments=s.moments * r, hist_counts=s.hist_counts * r) for s, r in zip(per_tile, repeats)]),
        [f"m{k}" for k in range(N_MODELS)],
        "cpu",
    )
    lut = Lut.from_dataset(xr.open_zarr(lut_path).load())
    assert lut.weights.tobytes() == expected.weights.tobytes()
    np.testing.assert_array_equal(lut.count, expected.count)
    ensemble = xr.open_zarr(output)["ensemble"].data
    blended = [blend(t[:N_MODELS], expected.weights, 32) for t in tiles]
    for i in range(0, n_chunks, 7):
        np.testing.assert_array_equal(ensemble[i * CHUNK : (i + 1) * CHUNK].compute(), blended[i % 4])
