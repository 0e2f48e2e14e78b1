"""How ingest scales with the number of images: tasks, planning time and memory, wall time
against decoding alone.

    python benchmarks/ingest_scale.py [--sizes 100,1000,10000] [--side 256] [--models 3]

For each N of --sizes, a corpus of N images of --side x --side pixels (--models models and ground
truth: PNGs made from a few synthetic frames, written once into a temporary folder, the smaller
corpora hard links into the largest) is ingested at the default --chunk-pixels on dask's threads
(what `--scheduler threads` runs). Each figure comes from a fresh process:

- tasks: the tasks of the graphs the scheduler receives (optimised, as it runs them);
- plan s: the client's time from the call of `plan_ingest` until the scheduler is about to run
  the first task (probing the headers, the plan, the staging template, the graph and its
  optimisation), the CPU time it took (all threads; on a shared host the wall time grows with
  the load, the CPU time hardly), and plan MiB: the peak RSS of the client up to then (a process
  that stops there), less the RSS after its imports;
- ingest s: the whole ingest (plan, decode, write, commit), and its peak RSS;
- decode s: decoding and hashing every file once (`images.read_image_and_sha256`, as the
  ingest's tasks do) on as many threads as dask's threaded scheduler uses, and the ratio of the
  two;
- objects: the files the store is made of (each an object on object storage).
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

#: Distinct frames per folder; the corpus repeats them (decoding costs the same, the files are cheap to write).
FRAMES = 16


def rss_mib() -> float:
    """Peak RSS of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_corpus(root: Path, n_images: int, side: int, n_models: int) -> None:
    """N images of side x side in gt/ and model0.. (smooth waves and noise, as `tests/helpers.py` makes them)."""
    from ensir_flow.images import encode_png

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side]
    folders = ["gt", *(f"model{k}" for k in range(n_models))]
    for folder in folders:
        (root / folder).mkdir(parents=True)
    for frame in range(FRAMES):
        base = 127 + 100 * np.sin(xx / 9.0 + frame)[..., None] * np.cos(yy / 13.0)[..., None] + rng.normal(0, 6, (side, side, 3))
        images = [base] + [base + 3 * (k - 1) + rng.normal(0, 3 + 2 * k, base.shape) for k in range(n_models)]
        for folder, image in zip(folders, images):
            data = encode_png(np.clip(np.rint(image), 0, 255).astype(np.uint8))
            for i in range(frame, n_images, FRAMES):
                (root / folder / f"img{i:06d}.png").write_bytes(data)


def linked_corpus(full: Path, root: Path, n_images: int) -> None:
    """The first `n_images` images of the corpus `full`, as hard links."""
    for folder in full.iterdir():
        (root / folder.name).mkdir(parents=True)
        for i in range(n_images):
            name = f"img{i:06d}.png"
            (root / folder.name / name).hardlink_to(folder / name)


class FirstTask(Exception):
    """Raised by the compute of a planning run: the client's work is done, no task runs."""


def child(mode: str, corpus: str, store: str) -> dict:
    """One measurement in this (fresh) process."""
    import dask
    from dask.callbacks import Callback

    from ensir_flow.pipelines.executor import threaded_compute
    from ensir_flow.pipelines.ingest import plan_ingest

    base = rss_mib()
    if mode == "decode":
        from ensir_flow.images import discover_corpus, probe_image, read_image_and_sha256

        found = discover_corpus(corpus)
        paths = [*found.ground_truth, *(path for model in found.models for path in found.predictions[model])]
        info = probe_image(paths[0])
        start = time.perf_counter()
        with ThreadPoolExecutor(dask.system.CPU_COUNT) as pool:
            for _ in pool.map(lambda path: read_image_and_sha256(path, info), paths):
                pass
        return {"seconds": time.perf_counter() - start}
    tasks = []
    start, cpu = time.perf_counter(), time.process_time()

    class Watch(Callback):
        """Counts the tasks of each computation as the scheduler receives them; a planning run
        stops at the first one, once its graph is ready to run."""

        def _start_state(self, dsk, state):
            tasks.append(len(dsk))
            if mode == "plan":
                raise FirstTask(time.perf_counter() - start, time.process_time() - cpu, rss_mib() - base)

    def compute(*collections, label=""):
        with Watch():
            return threaded_compute(*collections)

    try:
        plan_ingest(corpus, store).run(compute)
    except FirstTask as planned:
        seconds, cpu_seconds, peak = planned.args
        return {"seconds": seconds, "cpu": cpu_seconds, "mib": peak, "tasks": sum(tasks)}
    return {"seconds": time.perf_counter() - start, "mib": rss_mib(), "tasks": sum(tasks)}


def measure(mode: str, corpus: Path, work: Path) -> dict:
    store = work / "store.zarr"
    output = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(corpus), str(store)], check=True, capture_output=True, text=True
    ).stdout
    measured = json.loads(output.splitlines()[-1])
    if store.exists():  # the objects a store of this many images is made of (files here; objects on S3)
        measured["objects"] = sum(1 for path in store.rglob("*") if path.is_file())
    for leftover in work.glob("store*"):
        shutil.rmtree(leftover)
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,10000", help="numbers of images, comma-separated")
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        print(json.dumps(child(*options.child)))
        return
    sizes = sorted(int(size) for size in options.sizes.split(","))
    work = Path(tempfile.mkdtemp(prefix="ensir-ingest-scale-"))
    try:
        full = work / f"corpus{sizes[-1]}"
        started = time.perf_counter()
        make_corpus(full, sizes[-1], options.side, options.models)
        print(f"corpus of {sizes[-1]:,} images ({options.models} models and ground truth): {time.perf_counter() - started:.1f} s")
        header = (
            f"{'images':>8} {'tasks':>7} {'plan s':>7} {'plan CPU s':>11} {'plan MiB':>9} {'ingest s':>9} {'ingest MiB':>11} "
            f"{'decode s':>9} {'ratio':>6} {'objects':>8}"
        )
        print(header)
        for n_images in sizes:
            corpus = full if n_images == sizes[-1] else work / f"corpus{n_images}"
            if corpus != full:
                linked_corpus(full, corpus, n_images)
            plan = measure("plan", corpus, work)
            ingest = measure("ingest", corpus, work)
            decode = measure("decode", corpus, work)
            print(
                f"{n_images:>8,} {ingest['tasks']:>7,} {plan['seconds']:>7.2f} {plan['cpu']:>11.2f} {plan['mib']:>9.0f} "
                f"{ingest['seconds']:>9.1f} "
                f"{ingest['mib']:>11.0f} {decode['seconds']:>9.1f} {ingest['seconds'] / decode['seconds']:>6.2f} "
                f"{ingest['objects']:>8,}",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
