"""Per-image solvers (ZZPM, the paper's baseline) as blend tasks for `apply`.

Unlike a LUT, a per-image solver weights each image as a whole, from the mean squared distance of
each model to the per-pixel mean (`Solver.image_weights`; ZZPM: softmax_k(1 / (1e-3 + that
distance))). `apply` with the LUT of such a solver (which records only the method) gathers every
image's squared distances in one pass over the chunks, reduced into the images' weights, which
the blend tasks take to blend each chunk span by span: one graph, built while planning.
"""

import uuid

import numpy as np
import xarray as xr
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

from ensir_flow.blend import blend_spans, squared_distance_sums

from .batches import BATCH_BYTES
from .chunks import MERGE_FAN_IN, Span, chunk_runs, graph_tasks, read_pixels, reduce_tasks, tree_reduce


def image_weights_graph(
    image_weights, predictions: Delayed, ranges: list[tuple[int, int]], spans: list[list[Span]], ds: xr.Dataset
):
    """The weights (images, K) of every image of `ds` as one graph key: `image_weights` of each
    image's mean squared distance of each model to the per-pixel mean. A task per run of
    consecutive chunks (`weight_runs`) reads them one at a time and sums, per chunk and per image in
    it (its `spans`, labelled by image), the squared distances; the sums are gathered in chunk order
    (`tree_reduce`) and added up image by image in that order by the last task.
    `predictions`: the store's `PixelSource` as a graph key; `ranges`: its chunks' (start, stop)."""
    runs = weight_runs([stop - start for start, stop in ranges], ds.sizes["model"] * ds.sizes["channel"])
    parts = graph_tasks(
        "image-distances",
        [(_chunk_distance_sums, predictions.key, ranges[run.start : run.stop], spans[run.start : run.stop]) for run in runs],
        [predictions],
    )
    gathered = tree_reduce(parts, _joined)
    values_per_image = ds["pixel_count"].values * ds.sizes["channel"]
    name = f"image-weights-{uuid.uuid4().hex}"
    layer = {name: (_weights_of, image_weights, gathered.key, values_per_image, ds.sizes["model"])}
    return Delayed(name, HighLevelGraph.from_collections(name, layer, dependencies=[gathered]))


def image_weights_tasks(chunk_lengths, n_models: int, n_channels: int) -> int:
    """The tasks of `image_weights_graph` over chunks of `chunk_lengths`: its reads, their merges
    and the last task."""
    reads = len(weight_runs(chunk_lengths, n_models * n_channels))
    return reads + reduce_tasks(reads, MERGE_FAN_IN) + 1


def blend_image_spans(spans: list[Span], pixels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """A chunk's blend: `blend_spans` of its `pixels` with the weights of each image it holds
    (`spans` labelled by image; `weights`: every image's, from `image_weights_graph`)."""
    return blend_spans(pixels, weights[[span.label for span in spans]], spans)


def weight_runs(chunk_lengths, bytes_per_pixel: int) -> list[range]:
    """The tasks of the pass that gathers the images' weights: runs of consecutive chunks of at
    least `batches.BATCH_BYTES` (of `chunks.RUN_BYTES` on a store of many chunks: `chunks.chunk_runs`)."""
    return chunk_runs(chunk_lengths, bytes_per_pixel, budget=BATCH_BYTES)


def _chunk_distance_sums(predictions, ranges: list[tuple[int, int]], spans: list[list[Span]]) -> tuple[np.ndarray, np.ndarray]:
    """One task: per chunk start:stop of `ranges` of the array of predictions, per image in it (its
    `spans`), its `squared_distance_sums`, as (images, sums: (entries, K)) in chunk order."""
    images, sums = [], []
    for (start, stop), chunk_spans in zip(ranges, spans):
        chunk = read_pixels(predictions, start, stop)
        for lo, hi, image in chunk_spans:
            images.append(image)
            sums.append(squared_distance_sums(chunk[:, lo:hi]))
    n_models = predictions.array.shape[0]
    return np.asarray(images, dtype=np.int64), np.asarray(sums, dtype=np.float64).reshape(-1, n_models)


def _joined(*parts: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Parts of `_chunk_distance_sums` one after another, in the order given."""
    return np.concatenate([images for images, _ in parts]), np.concatenate([sums for _, sums in parts])


def _weights_of(
    image_weights, gathered: tuple[np.ndarray, np.ndarray], values_per_image: np.ndarray, n_models: int
) -> np.ndarray:
    """`image_weights` of each image's mean squared distances, its sums added in chunk order."""
    images, sums = gathered
    totals = np.zeros((len(values_per_image), n_models))
    np.add.at(totals, images, sums)
    return image_weights(totals / values_per_image[:, None])
