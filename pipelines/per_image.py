"""ZZPM, the paper's per-image baseline, as blend jobs for `apply`.

Unlike a LUT, ZZPM weights each image as a whole: softmax_k(1 / (1e-3 + MSE of model k to the
per-pixel mean)). `apply` with a zzpm LUT (which records only the method) first gathers every
image's squared distances in one pass over the chunks, then blends each chunk span by span.
"""

import dask
import numpy as np
import xarray as xr

from ensir_flow.blend import blend_spans, squared_distance_sums, zzpm_weights

from .chunks import Span, read_pixels
from .executor import Compute


def zzpm_blend_jobs(predictions, ranges: list[tuple[int, int]], spans: list[list[Span]], ds: xr.Dataset,
                    chunk_indices, compute: Compute) -> list[tuple]:
    """(combine, arguments) per chunk of `chunk_indices` for apply's tasks: `blend_spans` with the
    weights of each image the chunk holds (`spans` labelled by image)."""
    image_weights = _image_weights(predictions, ranges, spans, ds, compute)
    return [(blend_spans, (image_weights[[span.label for span in spans[i]]], spans[i])) for i in chunk_indices]


def _image_weights(predictions, ranges, spans, ds: xr.Dataset, compute: Compute) -> np.ndarray:
    """ZZPM's weights (images, K): one pass of per-chunk, per-image squared distances to the mean
    (`predictions`: the store's opened array as a graph key; `ranges`: its chunks' (start, stop))."""
    parts = [dask.delayed(_image_distance_sums, pure=True)(predictions, start, stop, chunk)
             for (start, stop), chunk in zip(ranges, spans)]
    sums = np.zeros((ds.sizes["image"], ds.sizes["model"]))
    for chunk_sums in compute(*parts, label="ZZPM weights"):
        for image, values in chunk_sums:
            sums[image] += values
    values_per_image = ds["pixel_count"].values[:, None] * ds.sizes["channel"]
    return zzpm_weights(sums / values_per_image)


def _image_distance_sums(predictions, start: int, stop: int, spans: list[Span]) -> list[tuple[int, np.ndarray]]:
    """One task: per image in chunk start:stop of the array of predictions, its `squared_distance_sums`."""
    chunk = read_pixels(predictions, start, stop)
    return [(image, squared_distance_sums(chunk[:, lo:hi])) for lo, hi, image in spans]
