"""The chunk kernels (numba): fused loops over the pixel-channels of a chunk, for binning, statistics and blending.

Each takes `places`, the `binning.place_tables` tuple of K tables. A tuple's length is part of
its numba type, so a kernel is compiled once per K with its loops over models unrolled (about
2.5x faster than a loop bound read at run time), and that version is cached on disk: later
processes load it instead of compiling it again (statistics and blend, for writable and read-only
inputs: 0.4 s to load, 1.4 s to compile, in every worker of every run).

They live in one file because numba invalidates a cached kernel only when its own source file
changes: a kernel that inlines `flat_bin` from another file would outlive a change to it.
"""

import numba
import numpy as np


@numba.njit(inline="always")
def flat_bin(predictions, pixel, channel, places):
    """Flat bin of one pixel-channel of predictions (K, P, C); `places` from `place_tables`."""
    b = 0
    for k in range(len(places)):
        b += places[k][predictions[k, pixel, channel]]
    return b


@numba.njit(nogil=True, cache=True)
def cell_indices(predictions, places):
    """Cell b * C + c of every pixel-channel of predictions (K, P, C), pixel-major; `places` from `place_tables`."""
    n_pixels, n_channels = predictions.shape[1], predictions.shape[2]
    cells = np.empty(n_pixels * n_channels, dtype=np.int64)
    for p in range(n_pixels):
        for c in range(n_channels):
            cells[p * n_channels + c] = flat_bin(predictions, p, c, places) * n_channels + c
    return cells


@numba.njit(nogil=True, cache=True)
def blend_into(predictions, weights, places, out):
    """out (P, C) = the weighted sum of predictions (K, P, C) with weights (bins, C, K) of each
    pixel-channel's bin; `places` from `place_tables`."""
    n_pixels, n_channels = predictions.shape[1], predictions.shape[2]
    for p in range(n_pixels):
        for c in range(n_channels):
            b = flat_bin(predictions, p, c, places)
            acc = np.float32(0.0)
            for k in range(len(places)):
                acc += weights[b, c, k] * np.float32(predictions[k, p, c])
            value = np.floor(acc + np.float32(0.5))
            out[p, c] = 0 if value < 0 else (255 if value > 255 else np.uint8(value))


@numba.njit(inline="always")
def add_moments(predictions, truth, pixel, channel, row, n_models):
    """Add one pixel-channel's n, x_k, x_i x_j (i <= j) and x_k y to the moments `row`."""
    y = np.int64(truth[pixel, channel])
    row[0] += 1
    col = 1 + n_models
    col_xy = 1 + n_models + n_models * (n_models + 1) // 2
    for i in range(n_models):
        xi = np.int64(predictions[i, pixel, channel])
        row[1 + i] += xi
        row[col_xy + i] += xi * y
        for j in range(i, n_models):
            row[col] += xi * predictions[j, pixel, channel]
            col += 1


@numba.njit(nogil=True, cache=True)
def accumulate_dense(predictions, truth, places, moments, histogram):
    """One fused pass: moments per cell and the y histogram per cell, into dense tables
    (`places` from `place_tables`: its length, K, is known when compiling, so loops unroll)."""
    n_pixels, n_channels = predictions.shape[1], predictions.shape[2]
    for p in range(n_pixels):
        for c in range(n_channels):
            cell = flat_bin(predictions, p, c, places) * n_channels + c
            histogram[cell * 256 + truth[p, c]] += 1
            add_moments(predictions, truth, p, c, moments[cell], len(places))


@numba.njit(nogil=True, cache=True)
def accumulate_moments(predictions, truth, slots, moments, places):
    """Add each pixel-channel's moments to row slots[p * C + c] of `moments` (of `places`, the
    `place_tables` tuple, only its length K is used: known when compiling, so loops unroll)."""
    n_pixels, n_channels = predictions.shape[1], predictions.shape[2]
    for p in range(n_pixels):
        for c in range(n_channels):
            add_moments(predictions, truth, p, c, moments[slots[p * n_channels + c]], len(places))
