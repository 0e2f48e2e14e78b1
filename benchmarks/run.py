"""Benchmark ensir-flow on a synthetic corpus: kernels, ingest, fit, apply, and worker scaling.

    python benchmarks/run.py [--megapixels 50] [--models 3] [--bin-width 32] [--workers 1,2] [--out results.json]

A synthetic reference corpus (frames of 1920 x 1080, the last one shorter, ground truth plus K
model predictions) is generated chunk by chunk, so memory stays bounded whatever its size, and
written straight into a Zarr store in ensir-flow's layout: PNG decoding speed does not enter the
fit and apply figures. Ingest is timed separately on a smaller PNG corpus made by the same
generator.

Each step is compared with a lower bound for the same data: the time to read the K + 1 uint8
planes of the store once (predictions and ground truth, summed by Dask on the same scheduler), or
for the kernels, numpy summing the same in-memory chunk. `x bound` = step time / bound time.
Peak memory is the resident set size (RSS) sampled every 20 ms: of this process on the threaded
scheduler (and for EM, which runs in the client), of the busiest worker on a LocalCluster.

Everything is written to a fresh directory under --workdir, removed at the end. Status lines go to
stderr, tables to stdout, the same figures as JSON to --out.
"""

import argparse
import contextlib
import functools
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import dask
import dask.array as da
import imageio.v3 as iio
import numba
import numpy as np
import psutil
import xarray as xr
import zarr

import ensir_flow
from ensir_flow import schema
from ensir_flow.binning import LEVELS, bin_count, place_values
from ensir_flow.blend import blend
from ensir_flow.images import write_png
from ensir_flow.pipelines.apply import plan_apply
from ensir_flow.pipelines.chunks import chunk_ranges, pixel_array, read_pixels, task_argument
from ensir_flow.pipelines.executor import threaded_compute
from ensir_flow.pipelines.fit import plan_fit
from ensir_flow.pipelines.ingest import plan_ingest
from ensir_flow.pipelines.lut_io import read_lut
from ensir_flow.pipelines.resumable import write_dataset
from ensir_flow.stats import chunk_statistics

#: Kernels and pipelines run on the CPU (numba); the kernel figures are per core.
DEVICE = "cpu"
FRAME_HEIGHT, FRAME_WIDTH = 1080, 1920
CHANNELS = 3
SAMPLE_INTERVAL_S = 0.02
MIB = 1 << 20


# --------------------------------------------------------------------------- synthetic data


@dataclass(frozen=True)
class Frame:
    """Parameters of one synthetic ground-truth image: smooth waves, sharp edges, colour, texture."""

    wave_amplitude: np.ndarray
    wave_row_freq: np.ndarray
    wave_col_freq: np.ndarray
    wave_phase: np.ndarray
    edge_row_freq: float
    edge_col_freq: float
    edge_phase: float
    gain: np.ndarray
    offset: np.ndarray
    texture: float

    @classmethod
    def random(cls, rng: np.random.Generator) -> "Frame":
        """Five smooth waves (wavelengths 80 to 900 px), sharp edges (a saturated wave), noise texture of 2 to 8 levels."""
        n_waves = 5
        wavelength = rng.uniform(80, 900, n_waves)
        angle = rng.uniform(0, 2 * np.pi, n_waves)
        edge_wavelength, edge_angle = rng.uniform(300, 1500), rng.uniform(0, 2 * np.pi)
        return cls(
            wave_amplitude=rng.uniform(8, 30, n_waves).astype(np.float32),
            wave_row_freq=(2 * np.pi / wavelength * np.sin(angle)).astype(np.float32),
            wave_col_freq=(2 * np.pi / wavelength * np.cos(angle)).astype(np.float32),
            wave_phase=rng.uniform(0, 2 * np.pi, n_waves).astype(np.float32),
            edge_row_freq=float(2 * np.pi / edge_wavelength * np.sin(edge_angle)),
            edge_col_freq=float(2 * np.pi / edge_wavelength * np.cos(edge_angle)),
            edge_phase=float(rng.uniform(0, 2 * np.pi)),
            gain=rng.uniform(0.8, 1.2, CHANNELS).astype(np.float32),
            offset=rng.uniform(-20, 20, CHANNELS).astype(np.float32),
            texture=float(rng.uniform(2, 8)),
        )

    def truth(self, rows: np.ndarray, cols: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Unclipped float32 ground truth (n, C) at the given pixel coordinates."""
        base = np.full(rows.shape, 120, dtype=np.float32)
        for amplitude, fr, fc, phase in zip(self.wave_amplitude, self.wave_row_freq, self.wave_col_freq, self.wave_phase):
            base += amplitude * np.sin(fr * rows + fc * cols + phase)
        base += 45 * np.tanh(
            8
            * np.sin(np.float32(self.edge_row_freq) * rows + np.float32(self.edge_col_freq) * cols + np.float32(self.edge_phase))
        )
        texture = rng.standard_normal((len(rows), CHANNELS), dtype=np.float32) * np.float32(self.texture)
        return base[:, None] * self.gain + self.offset + texture


@dataclass(frozen=True)
class SyntheticCorpus:
    """A deterministic synthetic corpus: ground truth and K predictions of any pixel range.

    Predictions look like restoration output: truth plus a per-model bias and intensity-dependent
    gain error, noise shared by all models (they fail on the same content) and per-model noise.
    """

    index: schema.ImageIndex
    models: list[str]
    seed: int
    bias: np.ndarray
    slope: np.ndarray
    sigma: np.ndarray
    shared_sigma: float = 2.0

    @classmethod
    def of_size(cls, megapixels: float, n_models: int, seed: int) -> "SyntheticCorpus":
        """Full HD frames up to `megapixels`, the last one cut to the rows that still fit."""
        total = int(round(megapixels * 1e6))
        full, rest = divmod(total, FRAME_HEIGHT * FRAME_WIDTH)
        heights = [FRAME_HEIGHT] * full + ([rest // FRAME_WIDTH] if rest >= FRAME_WIDTH else [])
        if not heights:
            raise ValueError(f"{megapixels} MP is smaller than one row of {FRAME_WIDTH} pixels")
        index = schema.ImageIndex(
            [f"frame{i:05d}" for i in range(len(heights))], np.array(heights), np.full(len(heights), FRAME_WIDTH)
        )
        rng = np.random.default_rng([seed, 0])
        return cls(
            index,
            [f"m{k + 1}" for k in range(n_models)],
            seed,
            bias=rng.uniform(-4, 4, n_models).astype(np.float32),
            slope=rng.uniform(-0.04, 0.04, n_models).astype(np.float32),
            sigma=rng.uniform(2, 8, n_models).astype(np.float32),
        )

    @property
    def n_models(self) -> int:
        """K."""
        return len(self.models)

    @property
    def megapixels(self) -> float:
        """Size in millions of pixels (all channels of a pixel count once)."""
        return self.index.n_pixels / 1e6

    def pixels(self, start: int, stop: int) -> np.ndarray:
        """uint8 (K + 1, stop - start, C): the K predictions, then the ground truth."""
        n = stop - start
        out = np.empty((self.n_models + 1, n, CHANNELS), dtype=np.uint8)
        rng = np.random.default_rng([self.seed, 1, start])
        offsets, counts, widths = self.index.offsets, self.index.counts, self.index.widths
        for i in np.flatnonzero((offsets < stop) & (offsets + counts > start)):
            lo, hi = max(start, offsets[i]), min(stop, offsets[i] + counts[i])
            local = np.arange(lo - offsets[i], hi - offsets[i])
            rows, cols = (local // widths[i]).astype(np.float32), (local % widths[i]).astype(np.float32)
            frame = Frame.random(np.random.default_rng([self.seed, 2, int(i)]))
            out[-1, lo - start : hi - start] = np.clip(np.rint(frame.truth(rows, cols, rng)), 0, 255)
        truth = out[-1].astype(np.float32)
        shared = rng.standard_normal(truth.shape, dtype=np.float32) * np.float32(self.shared_sigma)
        for k in range(self.n_models):
            value = truth + self.bias[k] + self.slope[k] * (truth - 128) + shared
            value += rng.standard_normal(truth.shape, dtype=np.float32) * self.sigma[k]
            out[k] = np.clip(np.rint(value, out=value), 0, 255, out=value)
        return out

    def write_store(self, path: Path, chunk_pixels: int, compression: str) -> None:
        """Write the corpus as an ensir-flow reference store, one generator task per Zarr chunk."""
        blocks, start = [], 0
        for length in schema.pixel_chunks(self.index.n_pixels, chunk_pixels):
            block = dask.delayed(self.pixels, pure=True)(start, start + length)
            blocks.append(da.from_delayed(block, (self.n_models + 1, length, CHANNELS), np.uint8))
            start += length
        planes = da.concatenate(blocks, axis=1)
        ds = self.index.to_dataset()
        ds[schema.PREDICTION] = (("model", "pixel", "channel"), planes[:-1])
        ds[schema.GROUND_TRUTH] = (("pixel", "channel"), planes[-1])
        ds = ds.assign_coords(model=np.array(self.models, dtype=object))
        ds.attrs = schema.store_attributes(
            self.models, CHANNELS, created_by="benchmarks/run.py", source=f"synthetic (seed {self.seed})"
        )
        encoding = {
            schema.PREDICTION: schema.pixel_encoding((self.n_models, chunk_pixels, CHANNELS), compression),
            schema.GROUND_TRUTH: schema.pixel_encoding((chunk_pixels, CHANNELS), compression),
        }
        dask.compute(write_dataset(ds, str(path), encoding), scheduler="threads")

    def write_png_folders(self, root: Path) -> None:
        """Write the corpus as PNG files: root/gt and one folder per model, as `ingest` reads them."""
        roles = [*self.models, "gt"]
        for role in roles:
            (root / role).mkdir(parents=True)

        def write_image(i: int) -> None:
            offset, count = int(self.index.offsets[i]), int(self.index.counts[i])
            shape = (int(self.index.heights[i]), int(self.index.widths[i]), CHANNELS)
            pixels = self.pixels(offset, offset + count)
            for role, plane in zip(roles, pixels):
                write_png(root / role / f"{self.index.stems[i]}.png", plane.reshape(shape))

        with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
            list(pool.map(write_image, range(len(self.index.stems))))


# --------------------------------------------------------------------------- measuring


class RssSampler:
    """RSS of some processes, sampled in a background thread; peaks are queried by time window."""

    def __init__(self, pids: list[int]):
        self.processes = {pid: psutil.Process(pid) for pid in pids}
        self.samples: list[tuple[float, dict[int, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            rss = {}
            for pid, process in self.processes.items():
                with contextlib.suppress(psutil.Error):
                    rss[pid] = process.memory_info().rss
            self.samples.append((time.perf_counter(), rss))
            self._stop.wait(SAMPLE_INTERVAL_S)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, start: float, end: float, pids: list[int]) -> int:
        """Largest RSS of any of `pids` sampled between `start` and `end` (or just after a short step)."""
        inside = [rss for t, rss in self.samples if start <= t <= end]
        if not inside:
            inside = [rss for t, rss in self.samples if t >= start][:1]
        return max((r.get(pid, 0) for r in inside for pid in pids), default=0)


@dataclass
class Step:
    """One measured step of the pipeline."""

    name: str
    scheduler: str
    workers: int
    seconds: float
    megapixels: float
    peak_rss_mib: float
    bound_seconds: float

    @property
    def mpx_per_s(self) -> float:
        """Throughput in megapixels per second."""
        return self.megapixels / self.seconds

    @property
    def x_bound(self) -> float:
        """How many times slower than the lower bound."""
        return self.seconds / self.bound_seconds

    def as_dict(self) -> dict:
        """The step and its derived figures, for the JSON output."""
        return {**asdict(self), "mpx_per_s": self.mpx_per_s, "x_bound": self.x_bound}


class Session:
    """A scheduler to run pipelines on: a `Compute` that records each labelled call, and RSS sampling.

    `run(*collections)` computes on the scheduler; `worker_pids` are the processes doing the work,
    and this process (the client, where EM runs) is sampled too.
    """

    def __init__(self, name: str, n_workers: int, run, worker_pids: list[int]):
        self.name, self.n_workers, self._run = name, n_workers, run
        self.worker_pids, self.client_pid = worker_pids, os.getpid()
        self.calls: list[tuple[str, float, float]] = []
        self.startup_seconds = 0.0  # of a cluster: set by `cluster_session`
        self.sampler = RssSampler(sorted({*worker_pids, self.client_pid}))

    def compute(self, *collections, label: str = "") -> tuple:
        """The pipelines' `Compute`: run on the scheduler, record (label, start, end)."""
        start = time.perf_counter()
        result = self._run(*collections)
        self.calls.append((label, start, time.perf_counter()))
        return result

    def step(self, name: str, start: float, end: float, megapixels: float, bound: float, client: bool = False) -> Step:
        pids = [self.client_pid] if client else self.worker_pids
        peak = self.sampler.peak(start, end, pids) / MIB
        return Step(name, self.name, self.n_workers, end - start, megapixels, peak, bound)

    def idle_rss_mib(self) -> float:
        """Current RSS of the busiest worker process."""
        return max(psutil.Process(pid).memory_info().rss for pid in self.worker_pids) / MIB


@contextlib.contextmanager
def threaded_session():
    """Dask's local threaded scheduler (the CLI's `--scheduler threads`), one thread per core."""
    session = Session(f"{os.cpu_count()} threads", os.cpu_count(), threaded_compute, [os.getpid()])
    with session.sampler:
        yield session


def warm_up(n_models: int, bin_width: int) -> None:
    """Import what the pipelines' tasks run and load (or compile, the first time) the numba kernels
    for K models, writable and read-only inputs: one-time costs of a process (every CLI run pays
    them once per worker), measured apart from the throughput figures."""
    import ensir_flow.pipelines.apply  # noqa: F401
    import ensir_flow.pipelines.fit  # noqa: F401

    for writable in (True, False):
        predictions, truth = np.zeros((n_models, 4, CHANNELS), np.uint8), np.zeros((4, CHANNELS), np.uint8)
        predictions.flags.writeable = truth.flags.writeable = writable
        chunk_statistics(predictions, truth, bin_width, device=DEVICE)
        weights = np.full((bin_count(n_models, bin_width), CHANNELS, n_models), 1 / n_models, np.float32)
        blend(predictions, weights, bin_width, device=DEVICE)


@contextlib.contextmanager
def cluster_session(n_workers: int, n_models: int, bin_width: int):
    """A fresh LocalCluster (as the CLI's `--scheduler local` makes it) of `n_workers`
    single-threaded processes, warmed up; `session.startup_seconds` is what that took."""
    from distributed import Client

    from ensir_flow.pipelines.executor import compute_function, local_cluster

    start = time.perf_counter()
    with (
        local_cluster(
            n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.ERROR
        ) as cluster,
        Client(cluster) as client,
    ):
        client.run(warm_up, n_models, bin_width)
        pids = list(client.run(os.getpid).values())
        session = Session("LocalCluster", n_workers, compute_function(client, progress=False), pids)
        session.startup_seconds = time.perf_counter() - start
        with session.sampler:
            yield session


def _read_chunk(predictions, truth, start: int, stop: int) -> int:
    """Read one chunk's predictions and ground truth as the pipelines' tasks do; keep only the size."""
    return read_pixels(predictions, start, stop).nbytes + read_pixels(truth, start, stop).nbytes


def read_bound(session: Session, store: Path, megapixels: float, what: str) -> Step:
    """The lower bound: read every prediction and ground-truth chunk of `store` once, one task per
    chunk, through the same reader as the pipelines."""
    arrays = [task_argument(pixel_array(store, name)) for name in (schema.PREDICTION, schema.GROUND_TRUTH)]
    tasks = [dask.delayed(_read_chunk)(*arrays, start, stop) for start, stop in chunk_ranges(xr.open_zarr(str(store)))]
    start = time.perf_counter()
    session.compute(*tasks, label="read bound")
    end = time.perf_counter()
    return session.step(f"read bound: {what}", start, end, megapixels, end - start)


def fit_steps(session: Session, store: Path, lut: Path, bin_width: int, megapixels: float, bound: float) -> list[Step]:
    """Run `fit`; split it into the statistics pass (its 'statistics' compute) and EM (what follows)."""
    plan = plan_fit(str(store), str(lut), bin_width, device=DEVICE, overwrite=True)
    session.calls.clear()
    plan.run(session.compute)
    labels = [label for label, _, _ in session.calls]
    if "statistics" not in labels or labels.index("statistics") + 1 >= len(labels):
        raise RuntimeError(f"plan_fit's compute calls were {labels}: expected 'statistics', then the LUT write")
    position = labels.index("statistics")
    _, stats_start, stats_end = session.calls[position]
    _, write_start, _ = session.calls[position + 1]
    return [
        session.step("fit: statistics pass", stats_start, stats_end, megapixels, bound),
        session.step("fit: EM on reduced table", stats_end, write_start, megapixels, bound, client=True),
    ]


def apply_steps(
    session: Session, store: Path, lut: Path, output: Path, megapixels: float, bound: float, compression: str
) -> list[Step]:
    """Run `apply` (blend every chunk, write the ensemble store) into a fresh `output`: the whole
    run, and its chunk tasks alone (the run less its fixed client work: output template, graph,
    completion check, move into place)."""
    shutil.rmtree(output, ignore_errors=True)
    plan = plan_apply(str(store), str(lut), str(output), device=DEVICE, overwrite=True, compression=compression)
    session.calls.clear()
    start = time.perf_counter()
    plan.run(session.compute)
    end = time.perf_counter()
    blends = [call for call in session.calls if call[0] == "apply"]
    if len(blends) != 1:
        raise RuntimeError(f"plan_apply's compute calls were {[label for label, _, _ in session.calls]}: expected one 'apply'")
    ((_, tasks_start, tasks_end),) = blends
    return [
        session.step("apply: blend + Zarr write", start, end, megapixels, bound),
        session.step("apply: of which chunk tasks", tasks_start, tasks_end, megapixels, bound),
    ]


def update_steps(session: Session, store: Path, lut: Path, workdir: Path, new_frames: int, bound: float) -> list[Step]:
    """The scheduled-job case: `apply` on an output made before the store's last `new_frames`
    frames were appended (appended by `resumable.committed_append`, copying
    the frames' chunks from `store`), against a fresh apply of the grown store."""
    from ensir_flow.pipelines.resumable import committed_append, resize_arrays
    from ensir_flow.pipelines.zarr_adapter import commit_metadata

    ds = xr.open_zarr(str(store))
    n_images, n_pixels = ds.sizes["image"], ds.sizes["pixel"]
    kept = n_images - new_frames
    kept_pixels = int(ds["pixel_offset"].values[kept])
    grown, updated, fresh = workdir / "grown.zarr", workdir / "updated.zarr", workdir / "fresh.zarr"
    for path in (grown, updated, fresh):
        shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(store, grown)
    resize_arrays(str(grown), {"pixel": kept_pixels, "image": kept})  # the store as it was before the new frames
    commit_metadata(str(grown), dict(ds.attrs))
    plan_apply(str(grown), str(lut), str(updated), device=DEVICE).run(session.compute)

    def copy_new_pixels(arrays):
        source = zarr.open_group(str(store), mode="r")
        for name in (schema.PREDICTION, schema.GROUND_TRUTH):
            region = (slice(None),) * (arrays[name].ndim - 2) + (slice(kept_pixels, n_pixels),)
            arrays[name][region] = source[name][region]

    committed_append(
        str(grown),
        {"pixel": kept_pixels, "image": kept},
        {"pixel": n_pixels, "image": n_images},
        copy_new_pixels,
        {name: ds[name].values[kept:] for name in (*schema.IMAGE_VARIABLES, "image")},
        dict(ds.attrs),
    )
    new_megapixels = (n_pixels - kept_pixels) / 1e6
    start = time.perf_counter()
    result = plan_apply(str(grown), str(lut), str(updated), device=DEVICE).run(session.compute)
    end = time.perf_counter()
    if result.status != "updated":
        raise RuntimeError(f"apply after the append did {result.status!r}, not an update")
    fresh_start = time.perf_counter()
    plan_apply(str(grown), str(lut), str(fresh), device=DEVICE).run(session.compute)
    fresh_end = time.perf_counter()
    if not np.array_equal(xr.open_zarr(str(updated))["ensemble"].values, xr.open_zarr(str(fresh))["ensemble"].values):
        raise RuntimeError("the updated output differs from a fresh apply")
    for path in (grown, updated, fresh):
        shutil.rmtree(path)
    return [
        session.step(f"apply update: {new_frames} new of {n_images} frames", start, end, new_megapixels, bound),
        session.step(f"apply fresh: all {n_images} frames", fresh_start, fresh_end, n_pixels / 1e6, bound),
    ]


def best_of_interleaved(runs: int, measures: list) -> list[list[Step]]:
    """Call each of `measures` (functions returning a list of steps) in turn, `runs` times over
    (A, B, A, B, ...); keep each step's fastest run, per measure.

    Other jobs on the host slow some runs down: the fastest is the one they disturbed least, and
    taking the measures in turn spreads a slow spell over all of them alike (figures compared
    with each other, such as one worker against two, are not skewed by when they ran). Before
    each run the page cache's dirty pages are flushed (`os.sync`), so that a run does not pay for
    writing back what earlier steps wrote (over a gigabyte here)."""
    results = [[] for _ in measures]
    for _ in range(runs):
        for result, measure in zip(results, measures):
            os.sync()
            result.append(measure())
    return [[min(column, key=lambda step: step.seconds) for column in zip(*result)] for result in results]


def best_of(runs: int, measure) -> list[Step]:
    """`best_of_interleaved` of a single measure."""
    return best_of_interleaved(runs, [measure])[0]


def ingest_steps(
    session: Session, corpus: SyntheticCorpus, root: Path, chunk_pixels: int, compression: str, runs: int
) -> list[Step]:
    """Time `ingest` of a PNG corpus, against decoding its PNGs only and reading the store it makes
    (each the best of `runs`)."""
    source, store = root / "png", root / "ingested.zarr"
    corpus.write_png_folders(source)
    files = sorted(source.glob("*/*.png"))

    def measure() -> list[Step]:
        shutil.rmtree(store, ignore_errors=True)
        start = time.perf_counter()
        session.compute(*[dask.delayed(_decoded_bytes)(path) for path in files], label="decode")
        decode_end = time.perf_counter()
        plan = plan_ingest(str(source), str(store), corpus.models, chunk_pixels=chunk_pixels, compression=compression)
        ingest_start = time.perf_counter()
        plan.run(session.compute)
        ingest_end = time.perf_counter()
        return [
            read_bound(session, store, corpus.megapixels, f"ingested store ({corpus.megapixels:.0f} MP)"),
            session.step("PNG decode only (no store)", start, decode_end, corpus.megapixels, 1.0),
            session.step("ingest: PNG -> Zarr", ingest_start, ingest_end, corpus.megapixels, 1.0),
        ]

    bound, decode, ingest = best_of(runs, measure)
    decode.bound_seconds = ingest.bound_seconds = bound.seconds
    return [bound, decode, ingest]


def _decoded_bytes(path: Path) -> int:
    """Decode one image file, keeping only its size (so decoding alone is timed)."""
    return iio.imread(path).nbytes


# --------------------------------------------------------------------------- kernels


def numpy_statistics(predictions: np.ndarray, truth: np.ndarray, bin_width: int):
    """The statistics of `chunk_statistics` in plain numpy: np.unique for cells, np.bincount for sums."""
    n_models, n_pixels, n_channels = predictions.shape
    places = place_values(n_models, bin_width)
    x = predictions.reshape(n_models, -1)
    y = truth.reshape(-1)
    cell_ids = sum(places[k][x[k]] for k in range(n_models)) * n_channels + np.tile(np.arange(n_channels), n_pixels)
    cells, slots = np.unique(cell_ids, return_inverse=True)
    xf, yf = x.astype(np.float64), y.astype(np.float64)
    columns = [*xf, *(xf[i] * xf[j] for i in range(n_models) for j in range(i, n_models)), *(xf[k] * yf for k in range(n_models))]
    moments = np.stack(
        [np.bincount(slots, minlength=len(cells))]
        + [np.rint(np.bincount(slots, weights=c, minlength=len(cells))).astype(np.int64) for c in columns],
        axis=1,
    )
    histogram = np.bincount(cell_ids * LEVELS + y)
    hist_keys = np.flatnonzero(histogram)
    return cells, moments, hist_keys, histogram[hist_keys]


def numpy_blend(predictions: np.ndarray, weights: np.ndarray, bin_width: int) -> np.ndarray:
    """The blend in plain numpy: gather w[bins], then (pred * w).sum over models in float32."""
    n_models, _, n_channels = predictions.shape
    places = place_values(n_models, bin_width)
    bins = sum(places[k][predictions[k]] for k in range(n_models))
    selected = weights[bins, np.arange(n_channels)]
    acc = (selected * np.moveaxis(predictions, 0, -1)).sum(axis=-1, dtype=np.float32)
    return np.clip(np.floor(acc + np.float32(0.5)), 0, 255).astype(np.uint8)


def best_time(function, repeats: int, warm_up: bool = True, clock=time.perf_counter) -> float:
    """Best wall time of `repeats` calls, after one warm-up call (numba loads or compiles then)
    unless `warm_up` is False (a fresh process per call, or work too slow to repeat needlessly).
    `clock=time.thread_time` times the calling thread's CPU seconds instead: a kernel's cost per
    core without the time it waited for a core on a shared machine."""
    if warm_up:
        function()
    times = []
    for _ in range(repeats):
        start = clock()
        function()
        times.append(clock() - start)
    return min(times)


def kernel_benchmarks(corpus: SyntheticCorpus, chunk_pixels: int, bin_width: int, repeats: int) -> list[dict]:
    """Single-thread throughput of the kernels and their numpy equivalents on one in-memory chunk."""
    pixels = corpus.pixels(0, min(chunk_pixels, corpus.index.n_pixels))
    predictions, truth = pixels[:-1], pixels[-1]
    n_bins = bin_count(corpus.n_models, bin_width)
    weights = np.random.default_rng(corpus.seed).dirichlet(np.ones(corpus.n_models), (n_bins, CHANNELS)).astype(np.float32)
    stats = chunk_statistics(predictions, truth, bin_width, device=DEVICE)
    reference = (stats.cells, stats.moments, stats.hist_keys, stats.hist_counts)
    same_stats = all(np.array_equal(a, b) for a, b in zip(reference, numpy_statistics(predictions, truth, bin_width)))
    same_blend = np.array_equal(
        blend(predictions, weights, bin_width, device=DEVICE), numpy_blend(predictions, weights, bin_width)
    )
    cases = [
        ("numpy read bound: sum of K+1 planes", lambda: (predictions.sum(), truth.sum()), None),
        ("chunk_statistics (numba)", lambda: chunk_statistics(predictions, truth, bin_width, device=DEVICE), None),
        ("numpy stats: unique + bincount", lambda: numpy_statistics(predictions, truth, bin_width), same_stats),
        ("blend (numba)", lambda: blend(predictions, weights, bin_width, device=DEVICE), None),
        ("numpy blend: (pred * w[bins]).sum", lambda: numpy_blend(predictions, weights, bin_width), same_blend),
    ]
    megapixels = predictions.shape[1] / 1e6
    rows = [
        {"kernel": name, "seconds": best_time(function, repeats), "megapixels": megapixels, "same_result": same}
        for name, function, same in cases
    ]
    for row in rows:
        row["mpx_per_s_per_core"] = megapixels / row["seconds"]
        row["x_bound"] = row["seconds"] / rows[0]["seconds"]
    return rows


# --------------------------------------------------------------------------- report


def machine_info() -> dict:
    """CPU model, cores, RAM and library versions."""
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    return {
        "cpu": model,
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_gib": round(psutil.virtual_memory().total / (1 << 30), 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            "ensir_flow": ensir_flow.__version__,
            "numpy": np.__version__,
            "numba": numba.__version__,
            "dask": dask.__version__,
            "zarr": zarr.__version__,
            "xarray": xr.__version__,
        },
    }


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    """Print a titled table: first column left-aligned, the others right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]

    def line(cells) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    print(f"\n{title}")
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))
    sys.stdout.flush()


def step_rows(steps: list[Step], speedups: dict | None = None) -> list[list[str]]:
    """Table rows of steps; with `speedups`, a workers column and a speedup column too."""
    rows = []
    for step in steps:
        row = [step.name, f"{step.seconds:.2f}", f"{step.mpx_per_s:.1f}", f"{step.peak_rss_mib:.0f}", f"{step.x_bound:.2f}"]
        if speedups is not None:
            row.insert(1, str(step.workers))
            row.append(speedups.get((step.name, step.workers), ""))
        rows.append(row)
    return rows


def scaling_speedups(steps: list[Step]) -> dict:
    """Speedup of each worker count over the smallest one, per step name."""
    base = {}
    for step in sorted(steps, key=lambda s: s.workers):
        base.setdefault(step.name, step.seconds)
    return {(s.name, s.workers): f"{base[s.name] / s.seconds:.2f}" for s in steps}


def status(message: str) -> None:
    """A timestamped progress line on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def store_mib(path: Path) -> float:
    """Size of a directory tree on disk, in MiB."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / MIB


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    """Options, with --workers parsed into a sorted list of worker counts."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--megapixels", type=float, default=50, help="size of the synthetic reference store")
    parser.add_argument("--models", type=int, default=3, help="number of models K")
    parser.add_argument("--bin-width", type=int, default=32, help="LUT bin width")
    parser.add_argument("--chunk-pixels", type=int, default=schema.DEFAULT_CHUNK_PIXELS, help="pixels per Zarr chunk")
    parser.add_argument(
        "--compression",
        choices=list(schema.COMPRESSORS),
        default=schema.DEFAULT_COMPRESSION,
        help="compressor of every store written (as ingest --compression)",
    )
    parser.add_argument("--workers", default="1,2", help="LocalCluster sizes for the scaling runs, comma-separated ('' to skip)")
    parser.add_argument("--ingest-megapixels", type=float, default=20, help="size of the PNG corpus for ingest (0 to skip)")
    parser.add_argument("--repeats", type=int, default=5, help="kernel timings: best of this many calls")
    parser.add_argument("--runs", type=int, default=3, help="pipeline timings: best of this many runs of each step")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    parser.add_argument(
        "--update-frames", type=int, default=4, help="frames appended before the incremental apply is measured (0 to skip)"
    )
    parser.add_argument("--out", type=Path, help="also write the figures as JSON to this file")
    parser.add_argument(
        "--workdir",
        type=Path,
        help="where the temporary stores go (a fresh subdirectory, removed at the end); default: the system temporary directory",
    )
    args = parser.parse_args(argv)
    try:
        args.workers = sorted({int(n) for n in args.workers.split(",") if n.strip()})
    except ValueError:
        parser.error(f"--workers: expected comma-separated integers, got {args.workers!r}")
    if any(n < 1 for n in args.workers):
        parser.error("--workers: worker counts must be at least 1")
    if args.models < 1 or args.megapixels <= 0 or args.chunk_pixels < 1 or args.repeats < 1 or args.runs < 1:
        parser.error("--models, --megapixels, --chunk-pixels, --repeats and --runs must be positive")
    return args


def main(argv=None) -> None:
    """Kernels, then the synthetic store, the threaded pipeline and ingest, then the scaling runs."""
    args = parse_args(argv)
    machine = machine_info()
    corpus = SyntheticCorpus.of_size(args.megapixels, args.models, args.seed)
    mp = corpus.megapixels
    print(
        f"ensir-flow {ensir_flow.__version__} benchmark: {machine['cpu']}, {machine['logical_cores']} logical cores "
        f"({machine['physical_cores']} physical), {machine['ram_gib']} GiB RAM, Python {machine['python']}"
    )
    print(
        f"reference store: {mp:.1f} MP ({len(corpus.index.stems)} frames up to {FRAME_WIDTH}x{FRAME_HEIGHT}), "
        f"K={args.models}, bin width {args.bin_width}, chunks of {args.chunk_pixels:,} px, {args.compression} compression, "
        f"device {DEVICE}; "
        "Mpx = million pixels, all channels"
    )
    results = {"machine": machine, "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}

    status("importing torch, which EM runs in (a one-time cost of the process fit runs in)")
    start = time.perf_counter()
    import torch  # noqa: F401

    results["torch_import_seconds"] = time.perf_counter() - start
    print(f"torch imported in {results['torch_import_seconds']:.1f} s (not in the EM figures)")
    status("kernels on one in-memory chunk")
    kernels = kernel_benchmarks(corpus, args.chunk_pixels, args.bin_width, args.repeats)
    results["kernels"] = kernels
    print_table(
        f"kernels, 1 thread, one chunk of {kernels[0]['megapixels'] * 1e6:,.0f} px in memory, best of {args.repeats}",
        ["kernel", "ms/chunk", "Mpx/s/core", "x bound", "same result"],
        [
            [
                k["kernel"],
                f"{k['seconds'] * 1e3:.1f}",
                f"{k['mpx_per_s_per_core']:.1f}",
                f"{k['x_bound']:.2f}",
                {None: "", True: "yes", False: "NO"}[k["same_result"]],
            ]
            for k in kernels
        ],
    )

    workdir = Path(tempfile.mkdtemp(prefix="ensir-flow-bench-", dir=args.workdir))
    try:
        store, lut = workdir / "reference.zarr", workdir / "lut.zarr"
        status(f"writing the {mp:.1f} MP synthetic store")
        start = time.perf_counter()
        corpus.write_store(store, args.chunk_pixels, args.compression)
        results["store"] = {
            "megapixels": mp,
            "images": len(corpus.index.stems),
            "write_seconds": time.perf_counter() - start,
            "mib_on_disk": store_mib(store),
            "mib_uncompressed": corpus.index.n_pixels * CHANNELS * (args.models + 1) / MIB,
        }
        print(
            f"\nsynthetic store written in {results['store']['write_seconds']:.1f} s: "
            f"{results['store']['mib_on_disk']:.0f} MiB on disk ({results['store']['mib_uncompressed']:.0f} MiB uncompressed)"
        )

        with threaded_session() as session:
            idle = session.idle_rss_mib()
            status("threaded scheduler: read bound, fit, apply")
            (bound,) = best_of(args.runs, lambda: [read_bound(session, store, mp, f"reference store ({mp:.0f} MP)")])
            steps = [
                bound,
                *best_of(args.runs, lambda: fit_steps(session, store, lut, args.bin_width, mp, bound.seconds)),
                *best_of(
                    args.runs,
                    lambda: apply_steps(session, store, lut, workdir / "ensemble.zarr", mp, bound.seconds, args.compression),
                ),
            ]
            if args.update_frames:
                status(f"threaded scheduler: apply updating an output after {args.update_frames} frames were appended")
                steps += best_of(args.runs, lambda: update_steps(session, store, lut, workdir, args.update_frames, bound.seconds))
            if args.ingest_megapixels > 0:
                status(f"threaded scheduler: ingest of a {args.ingest_megapixels:g} MP PNG corpus")
                small = SyntheticCorpus.of_size(args.ingest_megapixels, args.models, args.seed)
                steps += ingest_steps(session, small, workdir, args.chunk_pixels, args.compression, args.runs)
        results["threaded"] = {"idle_rss_mib": idle, "steps": [s.as_dict() for s in steps]}
        print_table(
            f"pipeline, dask threaded scheduler, {session.name}; peak RSS of this process (idle: {idle:.0f} MiB); "
            "x bound = time / read bound of the same store",
            ["step", "wall s", "Mpx/s", "peak RSS MiB", "x bound"],
            step_rows(steps),
        )

        reference_weights = read_lut(str(lut)).weights
        startups: dict[int, list[float]] = {n: [] for n in args.workers}

        def on_cluster(n_workers: int) -> list[Step]:
            """Every step once, on a fresh LocalCluster of `n_workers`."""
            with cluster_session(n_workers, args.models, args.bin_width) as session:
                startups[n_workers].append(session.startup_seconds)
                bound = read_bound(session, store, mp, "reference store")
                lut_n = workdir / f"lut-{n_workers}.zarr"
                return [
                    bound,
                    *fit_steps(session, store, lut_n, args.bin_width, mp, bound.seconds),
                    *apply_steps(session, store, lut_n, workdir / "ensemble.zarr", mp, bound.seconds, args.compression),
                ]

        scaling, identical = [], []
        if args.workers:
            status(
                f"LocalClusters of {', '.join(map(str, args.workers))} worker(s) in turn, {args.runs} runs each: "
                "read bound, fit, apply"
            )
            for n, steps in zip(
                args.workers, best_of_interleaved(args.runs, [functools.partial(on_cluster, n) for n in args.workers])
            ):
                for step in steps[1:]:
                    step.bound_seconds = steps[0].seconds  # the fastest read bound
                scaling += steps
                identical.append(bool(np.array_equal(read_lut(str(workdir / f"lut-{n}.zarr")).weights, reference_weights)))
            shutil.rmtree(workdir / "ensemble.zarr")
        startup = {n: min(seconds) for n, seconds in startups.items() if seconds}
        if scaling:
            speedups = scaling_speedups(scaling)
            results["scaling"] = [{**s.as_dict(), "speedup": float(speedups[(s.name, s.workers)])} for s in scaling]
            results["scaling_lut_identical_to_threaded"] = all(identical)
            results["scaling_startup_seconds"] = startup
            print_table(
                f"scaling, LocalCluster of single-threaded processes; peak RSS of the busiest worker "
                f"(EM: of the client); speedup over {args.workers[0]} worker(s); "
                f"LUTs bit-identical to the threaded one: {'yes' if all(identical) else 'NO'}; start-up "
                "(cluster, imports, numba kernels; not in the figures): "
                + ", ".join(f"{s:.1f} s for {n} worker(s)" for n, s in startup.items()),
                ["step", "workers", "wall s", "Mpx/s", "peak RSS MiB", "x bound", "speedup"],
                step_rows(scaling, speedups),
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2, default=float) + "\n")
        status(f"figures written to {args.out}")


if __name__ == "__main__":
    main()
