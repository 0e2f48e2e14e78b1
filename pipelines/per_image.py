"""Per-image solvers (ZZPM, the paper's baseline) as blend jobs for `apply`.

Unlike a LUT, a per-image solver weights each image as a whole, from the mean squared distance of
each model to the per-pixel mean (`Solver.image_weights`; ZZPM: softmax_k(1 / (1e-3 + that
distance))). `apply` with the LUT of such a solver (which records only the method) first gathers
every image's squared distances in one pass over the chunks, then blends each chunk span by span.
"""

import dask
import numpy as np
import xarray as xr

from ensir_flow.blend import blend_spans, squared_distance_sums

from .batches import BATCH_BYTES
from .chunks import Span, chunk_runs, read_pixels
from .executor import Compute


def image_blend_jobs(
    image_weights,
    predictions,
    ranges: list[tuple[int, int]],
    spans: list[list[Span]],
    ds: xr.Dataset,
    chunk_indices,
    compute: Compute,
) -> list[tuple]:
    """(combine, arguments) per chunk of `chunk_indices` for apply's tasks: `blend_spans` with the
    weights of each image the chunk holds (`spans` labelled by image), `image_weights` of its mean
    squared distances."""
    weights = image_weights(_mean_squared_distances(predictions, ranges, spans, ds, compute))
    return [(blend_spans, (weights[[span.label for span in spans[i]]], spans[i])) for i in chunk_indices]


def _mean_squared_distances(predictions, ranges, spans, ds: xr.Dataset, compute: Compute) -> np.ndarray:
    """Each image's mean squared distance of each model to the per-pixel mean (images, K): one pass
    of per-chunk, per-image squared distances (`predictions`: the store's opened array as a graph
    key; `ranges`: its chunks' (start, stop)), a task per run of consecutive chunks (`weight_runs`),
    which reads them one at a time."""
    parts = [
        dask.delayed(_chunk_distance_sums, pure=True)(predictions, ranges[run.start : run.stop], spans[run.start : run.stop])
        for run in weight_runs([stop - start for start, stop in ranges], ds.sizes["model"] * ds.sizes["channel"])
    ]
    sums = np.zeros((ds.sizes["image"], ds.sizes["model"]))
    for run_sums in compute(*parts, label="per-image weights"):
        for chunk_sums in run_sums:
            for image, values in chunk_sums:
                sums[image] += values
    values_per_image = ds["pixel_count"].values[:, None] * ds.sizes["channel"]
    return sums / values_per_image


def weight_runs(chunk_lengths, bytes_per_pixel: int) -> list[range]:
    """The tasks of the pass that gathers the images' weights: runs of consecutive chunks of at
    least `batches.BATCH_BYTES` (of `chunks.RUN_BYTES` on a store of many chunks: `chunks.chunk_runs`)."""
    return chunk_runs(chunk_lengths, bytes_per_pixel, budget=BATCH_BYTES)


def _chunk_distance_sums(
    predictions, ranges: list[tuple[int, int]], spans: list[list[Span]]
) -> list[list[tuple[int, np.ndarray]]]:
    """One task: per chunk start:stop of `ranges` of the array of predictions, per image in it (its
    `spans`), its `squared_distance_sums`."""
    sums = []
    for (start, stop), chunk_spans in zip(ranges, spans):
        chunk = read_pixels(predictions, start, stop)
        sums.append([(image, squared_distance_sums(chunk[:, lo:hi])) for lo, hi, image in chunk_spans])
    return sums
