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


@numba.njit(inline="always")
def store_blend(predictions, weights, row, pixel, channel, places, out):
    """out[pixel, channel] = floor(sum_k weights[row, channel, k] * x_k + 0.5) clipped to 0..255, the
    sum in float32 in model order (the paper's operations); `places` only gives K, known when
    compiling, so the loop unrolls (and no view of `weights` is made: indexing stays scalar)."""
    acc = np.float32(0.0)
    for k in range(len(places)):
        acc += weights[row, channel, k] * np.float32(predictions[k, pixel, channel])
    value = np.floor(acc + np.float32(0.5))
    out[pixel, channel] = 0 if value < 0 else (255 if value > 255 else np.uint8(value))


@numba.njit(nogil=True, cache=True)
def blend_into(predictions, weights, places, out):
    """out (P, C) = the weighted sum of predictions (K, P, C) with weights (bins, C, K) of each
    pixel-channel's bin; `places` from `place_tables`."""
    n_pixels, n_channels = predictions.shape[1], predictions.shape[2]
    for p in range(n_pixels):
        for c in range(n_channels):
            store_blend(predictions, weights, flat_bin(predictions, p, c, places), p, c, places, out)


@numba.njit(inline="always")
def hash_slot(words, mask):
    """First slot (0..mask) of a bin's key words in an open-addressing table (Fibonacci hashing)."""
    h = np.uint64(0)
    for i in range(len(words)):
        h = (h ^ np.uint64(words[i])) * np.uint64(0x9E3779B97F4A7C15)
    return np.int64(h >> np.uint64(32)) & mask


@numba.njit(nogil=True, cache=True)
def fill_hash_slots(keys, slots):
    """Put row r of unique key words `keys` (m, W) into `slots` (a power of two, all -1, > m):
    linear probing from `hash_slot`."""
    mask = len(slots) - 1
    for r in range(len(keys)):
        slot = hash_slot(keys[r], mask)
        while slots[slot] >= 0:
            slot = (slot + 1) & mask
        slots[slot] = r


@numba.njit(inline="always")
def find_row(words, keys, slots, mask):
    """Row of `keys` equal to `words` through the hash `slots`, or -1."""
    slot = hash_slot(words, mask)
    while True:
        row = slots[slot]
        if row < 0:
            return -1
        same = True
        for i in range(len(words)):
            if keys[row, i] != words[i]:
                same = False
                break
        if same:
            return row
        slot = (slot + 1) & mask


@numba.njit(nogil=True, cache=True)
def blend_hashed_into(predictions, places, word_of_model, keys, slots, weights, fallback, out):
    """`blend_into` for a sparse LUT: each pixel-channel's bin key words (model k adds
    places[k, x_k] to word word_of_model[k]; `places` (K, 256) from `binning.group_place_tables`,
    an array: indexing a tuple of 16 tables by a loop variable is 300x slower) are looked up in the hash
    `slots` of the stored bins' `keys` (m, W); found, the bin's weights (m, C, K) are used, else the
    channel's `fallback` (1, C, K). The sum is `store_blend`'s, so a bin gives the bytes it gives
    dense. The last bin found in each channel is remembered: neighbouring pixels often share it."""
    n_pixels, n_channels = predictions.shape[1], predictions.shape[2]
    n_words = keys.shape[1]
    mask = len(slots) - 1
    words = np.zeros(n_words, np.int64)
    last_words = np.full((n_channels, n_words), -1, np.int64)
    last_row = np.full(n_channels, -1, np.int64)
    for p in range(n_pixels):
        for c in range(n_channels):
            for i in range(n_words):
                words[i] = 0
            for k in range(len(places)):
                words[word_of_model[k]] += places[k, predictions[k, p, c]]
            same = True
            for i in range(n_words):
                if words[i] != last_words[c, i]:
                    same = False
            if not same:
                last_row[c] = find_row(words, keys, slots, mask)
                for i in range(n_words):
                    last_words[c, i] = words[i]
            row = last_row[c]
            if row >= 0:
                store_blend(predictions, weights, row, p, c, places, out)
            else:
                store_blend(predictions, fallback, 0, p, c, places, out)


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
