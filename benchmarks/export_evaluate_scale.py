"""Export and evaluate on stores of many small images, against encoding and scoring alone.

    python benchmarks/export_evaluate_scale.py                          # 100 and 1,000 images of 256 x 256, K = 3
    python benchmarks/export_evaluate_scale.py --images 100,1000,10000 --runs 2

For each image count a synthetic reference store (run.py's generator: ground truth and K
predictions, in the default chunks, so one chunk holds about 32 of these images) is written
under --workdir. Then, on dask's threaded scheduler as `--scheduler threads` runs them:

- export: the store's ground truth as one PNG per image (`pipelines.export.export`, the work of
  `ensir-flow export` and `apply --export-dir`), and the same PNGs encoded alone: a plain loop of
  `images.write_png` over the images, already in memory, on one thread;
- evaluate: `plan_evaluate` (PSNR and SSIM of each model, the average and ZZPM), and the same
  scores alone: a plain loop of `metrics.scores` over the same candidates, already in memory, on
  one thread.

Printed per image count: the tasks each command submits (`plan.task_count` of its graphs), its
wall time and the ratio to the plain loop. The plain loops read nothing (their pixels are read
before the clock starts, a batch of images at a time), so the ratio includes the pipelines'
reading, checksum checks and scheduling: "at most 2x the work alone" is the target. Each figure
is the best of --runs. The stores are removed at the end.
"""

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ensir_flow import metrics, schema
from ensir_flow.blend import average, zzpm
from ensir_flow.images import write_png
from ensir_flow.pipelines.chunks import pixel_array, read_pixels
from ensir_flow.pipelines.evaluate import plan_evaluate
from ensir_flow.pipelines.executor import threaded_compute
from ensir_flow.pipelines.export import export, export_text
from ensir_flow.pipelines.plan import task_count
from ensir_flow.pipelines.stores import open_store_index

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import SyntheticCorpus  # noqa: E402  (the benchmarks' shared generator)

#: Images whose pixels the plain loops hold at a time (read before their clock starts).
LOOP_BATCH = 64


def write_store(path: Path, n_images: int, side: int, n_models: int, seed: int) -> None:
    """A reference store of `n_images` images of `side` x `side`, in the default chunks."""
    index = schema.ImageIndex([f"img{i:05d}" for i in range(n_images)], np.full(n_images, side), np.full(n_images, side))
    corpus = dataclasses.replace(SyntheticCorpus.of_size(1, n_models, seed), index=index)
    corpus.write_store(path, schema.DEFAULT_CHUNK_PIXELS, schema.DEFAULT_COMPRESSION)


class CountingCompute:
    """`threaded_compute` that adds up the tasks of every graph it is given."""

    def __init__(self):
        self.tasks = 0

    def __call__(self, *collections, label: str = "") -> tuple:
        self.tasks += task_count(*collections)
        return threaded_compute(*collections, label=label)


def batches(store: Path, variables: list[str]):
    """(index, first image, {variable: pixels of each image}) per batch of `LOOP_BATCH` images."""
    index = schema.ImageIndex.from_dataset(open_store_index(str(store)))
    sources = {name: pixel_array(str(store), name) for name in variables}
    for first in range(0, len(index.stems), LOOP_BATCH):
        images = range(first, min(first + LOOP_BATCH, len(index.stems)))
        start, stop = int(index.offsets[images[0]]), int(index.offsets[images[-1]] + index.counts[images[-1]])
        pixels = {name: read_pixels(source, start, stop) for name, source in sources.items()}
        yield index, images, start, pixels


def encode_alone(store: Path, folder: Path) -> float:
    """Seconds to encode every ground-truth image as export does, on one thread, pixels in memory."""
    folder.mkdir()
    text, seconds = export_text(store, schema.GROUND_TRUTH), 0.0
    for index, images, start, pixels in batches(store, [schema.GROUND_TRUTH]):
        began = time.perf_counter()
        for i in images:
            lo, h, w = int(index.offsets[i]) - start, int(index.heights[i]), int(index.widths[i])
            write_png(folder / f"{index.stems[i]}.png", pixels[schema.GROUND_TRUTH][lo : lo + h * w].reshape(h, w, -1), text)
        seconds += time.perf_counter() - began
    return seconds


def score_alone(store: Path) -> tuple[float, list]:
    """(seconds, scores) of scoring every image as evaluate does, on one thread, pixels in memory."""
    seconds, scores = 0.0, []
    for index, images, start, pixels in batches(store, [schema.PREDICTION, schema.GROUND_TRUTH]):
        began = time.perf_counter()
        for i in images:
            lo, h, w = int(index.offsets[i]) - start, int(index.heights[i]), int(index.widths[i])
            block = pixels[schema.PREDICTION][:, lo : lo + h * w]
            candidates = [*block, average(block), zzpm(block)]
            truth = pixels[schema.GROUND_TRUTH][lo : lo + h * w].reshape(h, w, -1)
            scores.append(metrics.scores([c.reshape(h, w, -1) for c in candidates], truth))
        seconds += time.perf_counter() - began
    return seconds, scores


def best_of(runs: int, function):
    """(fastest seconds, the last result) of `runs` calls of `function`, which returns (seconds, result)."""
    results = [function() for _ in range(runs)]
    return min(seconds for seconds, _ in results), results[-1][1]


def run_export(store: Path, target: Path) -> tuple[float, int]:
    """(seconds, tasks) of exporting the store's ground truth into `target`, removed after."""
    compute = CountingCompute()
    began = time.perf_counter()
    export(str(store), str(target), compute, variable=schema.GROUND_TRUTH)
    seconds = time.perf_counter() - began
    shutil.rmtree(target)
    return seconds, compute.tasks


def run_encode(store: Path, target: Path) -> tuple[float, None]:
    seconds = encode_alone(store, target)
    shutil.rmtree(target)
    return seconds, None


def run_evaluate(store: Path) -> tuple[float, tuple]:
    """(seconds, (tasks, Evaluation)) of evaluating the store."""
    compute = CountingCompute()
    began = time.perf_counter()
    evaluation = plan_evaluate(str(store)).run(compute)
    return time.perf_counter() - began, (compute.tasks, evaluation)


def measure(store: Path, workdir: Path, runs: int) -> list[tuple[str, int, float, float]]:
    """(step, tasks, pipeline seconds, seconds alone) of export and evaluate of `store`, checking
    that evaluate's scores are the plain loop's."""
    exported, export_tasks = best_of(runs, lambda: run_export(store, workdir / f"export-{time.perf_counter_ns()}"))
    encoded, _ = best_of(runs, lambda: run_encode(store, workdir / f"encode-{time.perf_counter_ns()}"))
    evaluated, (evaluate_tasks, evaluation) = best_of(runs, lambda: run_evaluate(store))
    scored, alone = best_of(runs, lambda: score_alone(store))
    for scores, pair in zip(evaluation.per_image, alone, strict=True):
        for metric, values in zip(("psnr", "ssim"), pair):
            if list(scores[metric].values()) != list(values):
                raise SystemExit(f"evaluate's {metric} differs from the plain loop's: {scores[metric]} vs {values}")
    return [("export", export_tasks, exported, encoded), ("evaluate", evaluate_tasks, evaluated, scored)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", default="100,1000", help="image counts, comma-separated")
    parser.add_argument("--side", type=int, default=256, help="images are side x side RGB")
    parser.add_argument("--models", type=int, default=3, help="K, the number of model predictions")
    parser.add_argument("--runs", type=int, default=1, help="each figure is the best of this many runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the stores (default: a temporary folder)")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="ensir-export-evaluate-", dir=args.workdir))
    print(f"{'images':>7}  {'step':<9}  {'tasks':>6}  {'pipeline s':>10}  {'alone s':>8}  {'ratio':>6}")
    try:
        for n_images in map(int, args.images.split(",")):
            store = workdir / f"store-{n_images}.zarr"
            write_store(store, n_images, args.side, args.models, args.seed)
            for step, tasks, pipeline, alone in measure(store, workdir, args.runs):
                print(
                    f"{n_images:>7,}  {step:<9}  {tasks:>6,}  {pipeline:>10.2f}  {alone:>8.2f}  {pipeline / alone:>5.2f}x",
                    flush=True,
                )
            shutil.rmtree(store)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
