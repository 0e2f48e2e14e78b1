"""The chunk kernels (numba): fused loops over the pixel-channels of a chunk, for binning, statistics and blending.

The dense kernels and the moments' take `places`, a `binning.place_tables` tuple of K tables: a
tuple's length is part of its numba type, so a kernel is compiled once per K with its loops over
models unrolled (about 2.5x faster than a loop bound read at run time). The sparse kernels (blend
through a table of rows or a hash table, grouping cells) take place values as an array and work
block by block instead. Every version is cached on disk (where `kernel_cache` says): later
processes load it instead of compiling it again (statistics and blend, for writable and read-only
inputs: 0.4 s to load, 1.4 s to compile, in every worker of every run).

They live in one file because numba invalidates a cached kernel only when its own source file
changes: a kernel that inlines `flat_bin` from another file would outlive a change to it.
"""

import numba
import numpy as np

from .kernel_cache import CACHE


@numba.njit(inline="always")
def flat_bin(predictions, pixel, channel, places):
    """Flat bin of one pixel-channel of predictions (K, P, C); `places` from `place_tables`."""
    b = 0
    for k in range(len(places)):
        b += places[k][predictions[k, pixel, channel]]
    return b


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


@numba.njit(nogil=True, cache=CACHE)
def blend_into(predictions, weights, places, out):
    """out (P, C) = the weighted sum of predictions (K, P, C) with weights (bins, C, K) of each
    pixel-channel's bin; `places` from `place_tables`."""
    n_pixels, n_channels = predictions.shape[1], predictions.shape[2]
    for p in range(n_pixels):
        for c in range(n_channels):
            store_blend(predictions, weights, flat_bin(predictions, p, c, places), p, c, places, out)


#: The two hash functions of the cuckoo table of a sparse LUT's bins: a key's words are folded
#: with the golden-ratio multiplier (Fibonacci hashing), and its two slots are the top bits of that
#: hash and of the hash times murmur3's finaliser constant.
FIRST_HASH = np.uint64(0x9E3779B97F4A7C15)
SECOND_HASH = np.uint64(0xC2B2AE3D27D4EB4F)
#: Keys one insertion may move in a cuckoo table before it is declared too small (then one twice
#: as large is built): at the load of at most 0.4 that `blend.HashedWeights` keeps, rarely reached.
CUCKOO_MOVES = 500
#: floor(x / w) = (x * `digit_multiplier(w)`) >> DIGIT_SHIFT for every x in 0..255 and w in 1..256
#: (tests/test_sparse_lut.py checks all of them): a multiply and a shift, which vectorise, where a
#: division or a table read per value would not.
DIGIT_SHIFT = 16
#: Pixel-channels one pass of the sparse kernels (`blend_hashed_into`, `blend_indexed_into`,
#: `first_seen_cells`) handles: their scratch (a few rows of this many 4- or 8-byte values per
#: model and key word) stays in the core's L1 and L2 caches.
HASHED_BLOCK = 512


def digit_multiplier(bin_width: int) -> np.int32:
    """ceil(2^DIGIT_SHIFT / w): x // w = (x * it) >> DIGIT_SHIFT for 8-bit x."""
    return np.int32(-(-(1 << DIGIT_SHIFT) // bin_width))


@numba.njit(inline="always")
def hash_of_words(words, row):
    """The hash of row `row` of key words (n, W) (one int64 word per model group): the words folded
    with the golden-ratio multiplier (Fibonacci hashing), whose top bits make a slot."""
    h = np.uint64(0)
    for i in range(words.shape[1]):
        h = (h ^ np.uint64(words[row, i])) * FIRST_HASH
    return h


@numba.njit(inline="always")
def key_slots(words, row, shift):
    """The two slots (0 .. 2^(64 - shift) - 1) the key words[row] may take in a cuckoo table."""
    h = hash_of_words(words, row)
    return h >> shift, (h * SECOND_HASH) >> shift  # unsigned: numba indexes with them unchecked for negatives


@numba.njit(inline="always")
def copy_words(source, i, target, j):
    """target[j] = source[i] for rows of key words, word by word: an assignment of one array row to
    another makes numba compile the formatting of its shape-mismatch error, seconds per process."""
    for w in range(source.shape[1]):
        target[j, w] = source[i, w]


@numba.njit(inline="always")
def same_words(a, i, b, j):
    """Whether row i of key words a equals row j of b (every word compared: no branch per word)."""
    same = True
    for w in range(a.shape[1]):
        same &= a[i, w] == b[j, w]
    return same


@numba.njit(nogil=True, cache=CACHE)
def fill_cuckoo_slots(keys, slot_keys, slot_rows, shift):
    """Put each key of the unique key words `keys` (m, W), row r, with row r, into one of its two `key_slots`
    of a cuckoo table `slot_keys` (S, W) (all -1: free) with `slot_rows` (S + 1,): a key whose slot is
    taken moves the one there to that key's other slot, and so on. True when every key found a
    slot; False when one insertion moved `CUCKOO_MOVES` keys (the caller builds a larger table)."""
    n_words = keys.shape[1]
    carried = np.empty((1, n_words), np.int64)
    for r in range(keys.shape[0]):
        copy_words(keys, r, carried, 0)
        row = r
        slot = key_slots(carried, 0, shift)[0]
        for _ in range(CUCKOO_MOVES):
            free = slot_keys[slot, 0] < 0
            for i in range(n_words):
                carried[0, i], slot_keys[slot, i] = slot_keys[slot, i], carried[0, i]
            row, slot_rows[slot] = slot_rows[slot], row
            if free:
                break
            first, second = key_slots(carried, 0, shift)
            slot = second if first == slot else first
        else:
            return False
    return True


@numba.njit(inline="always")
def _key_sums_of_block(values_of_model, start, size, multiplier, places, word_of_model, sums, values):
    """Of the pixel-channels start:start + size of values_of_model (K, P * C): each one's key word
    sums into sums[:, :size] (word g = sum of floor(x_k / w) * places[k] over the models k of group
    g, word_of_model[k] = g; floor(x / w) as (x * multiplier) >> DIGIT_SHIFT; in float64, exact
    below 2^53: `binning.model_groups`), and its values as float32 into values[:, :size]. Model by
    model over contiguous runs: vectorised, where AVX2 has no 64-bit integer multiply."""
    sums[:, :size] = 0
    for k in range(len(places)):
        x, word_sum, value, place = values_of_model[k, start : start + size], sums[word_of_model[k]], values[k], places[k]
        for t in range(size):
            word_sum[t] += np.float64((np.int32(x[t]) * multiplier) >> DIGIT_SHIFT) * place
            value[t] = np.float32(x[t])


@numba.njit(nogil=True, cache=CACHE)
def blend_hashed_into(predictions, multiplier, places, word_of_model, slot_keys, slot_rows, shift, weights, out):
    """`blend_into` for a sparse LUT whose bins are looked up in a cuckoo table (`fill_cuckoo_slots`):
    `slot_keys` (S, W) (a slot's words side by side, in one cache line) and `slot_rows` (S + 1,)
    give the row of `weights` (m + 1, C, K) of each stored bin's key, the last row being the
    fallback of every other bin (free slots and the extra last slot hold it). A bin's key is its
    words as `_key_sums_of_block` makes them (places (K,) float64, `binning.words_of_digits`).

    Block by block of `HASHED_BLOCK` pixel-channels, each pass a short loop that the CPU overlaps
    across pixel-channels: (1) the key words and the float values (`_key_sums_of_block`), the
    words then made int64; (2) each pixel-channel's row: both slots are
    compared, the one holding the key, else the extra slot, chosen, and its row read (as selects,
    not a probing loop); (3) and (4) `_blend_rows_of_block`."""
    n_models = len(places)
    values_of_model = predictions.reshape(n_models, -1)
    n_words = slot_keys.shape[1]
    no_slot = np.uint64(len(slot_rows) - 1)
    sums = np.empty((n_words, HASHED_BLOCK), np.float64)
    words = np.empty((HASHED_BLOCK, n_words), np.int64)
    values = np.empty((n_models, HASHED_BLOCK), np.float32)
    rows = np.empty(HASHED_BLOCK, np.uint64)
    acc = np.empty(HASHED_BLOCK, np.float32)
    for start in range(0, values_of_model.shape[1], HASHED_BLOCK):
        size = min(HASHED_BLOCK, values_of_model.shape[1] - start)
        _key_sums_of_block(values_of_model, start, size, multiplier, places, word_of_model, sums, values)
        for i in range(n_words):
            for t in range(size):
                words[t, i] = np.int64(sums[i, t])
        for t in range(size):
            if n_words == 1:  # one compare per slot
                key = words[t, 0]
                h = np.uint64(key) * FIRST_HASH
                first, second = h >> shift, (h * SECOND_HASH) >> shift
                in_first, in_second = slot_keys[first, 0] == key, slot_keys[second, 0] == key
            else:
                first, second = key_slots(words, t, shift)
                in_first, in_second = same_words(words, t, slot_keys, first), same_words(words, t, slot_keys, second)
            # choose the slot (the key's, else the extra last one, which holds the fallback row), then
            # read its row: selecting between two loaded rows, LLVM made a branch, which mispredicts
            slot = second if in_second else no_slot
            rows[t] = slot_rows[first if in_first else slot]
        _blend_rows_of_block(weights, rows, values, start, size, predictions.shape[2], acc, out)


@numba.njit(nogil=True, cache=CACHE)
def blend_indexed_into(predictions, multiplier, places, row_of_bin, weights, out):
    """`blend_hashed_into` for a sparse LUT whose flat bin index is small enough for a dense table
    of rows (`blend.IndexedWeights`): row_of_bin[b] (nb^K,) is the row of `weights` (m + 1, C, K)
    of bin b, the last row (the fallback) for every bin not stored. b = sum_k floor(x_k / w) *
    places[k] (places (K,) int32, b below 2^31), floor(x / w) as (x * multiplier) >> DIGIT_SHIFT.
    One read replaces the hash and the two slots' compares: 1.4x the cuckoo table's speed at K = 8,
    w = 32 (README). Block by block: (1) the flat bins and float values, model by model
    (vectorised), (2) each bin's row, (3) and (4) `_blend_rows_of_block`."""
    n_models = len(places)
    values_of_model = predictions.reshape(n_models, -1)
    bins = np.empty(HASHED_BLOCK, np.int32)
    values = np.empty((n_models, HASHED_BLOCK), np.float32)
    rows = np.empty(HASHED_BLOCK, np.uint64)
    acc = np.empty(HASHED_BLOCK, np.float32)
    for start in range(0, values_of_model.shape[1], HASHED_BLOCK):
        size = min(HASHED_BLOCK, values_of_model.shape[1] - start)
        bins[:size] = 0
        for k in range(n_models):
            x, value, place = values_of_model[k, start : start + size], values[k], places[k]
            for t in range(size):
                bins[t] += ((np.int32(x[t]) * multiplier) >> DIGIT_SHIFT) * place
                value[t] = np.float32(x[t])
        for t in range(size):
            rows[t] = row_of_bin[bins[t]]
        _blend_rows_of_block(weights, rows, values, start, size, predictions.shape[2], acc, out)


@numba.njit(inline="always")
def _blend_rows_of_block(weights, rows, values, start, size, n_channels, acc, out):
    """The end of a sparse kernel's block of `size` pixel-channels from flat position `start`, each
    in row rows[t] of `weights` (m + 1, C, K), with float values[k, t]: (3) the offset of its cell's
    weights (in place of its row), (4) the sum, model by model over the block, then floor(acc +
    0.5) clipped (vectorised) into out (P, C). Per pixel-channel the float32 operations are
    `store_blend`'s, in model order (starting from the first product instead of 0 + it, which can
    differ only by the sign of a zero, which rounds the same), so a bin gives the bytes the dense
    kernel gives."""
    n_models = values.shape[0]
    flat_weights = weights.reshape(-1)
    offsets = rows
    channel = start % n_channels
    for t in range(size):
        offsets[t] = (rows[t] * n_channels + channel) * n_models  # unsigned: indexes without a negative check
        channel += 1
        if channel == n_channels:
            channel = 0
    for t in range(size):
        acc[t] = flat_weights[offsets[t]] * values[0, t]
    for k in range(1, n_models - 1, 2):  # two models a pass: half the loads and stores of acc, same order
        model, value, next_value = np.uint64(k), values[k], values[k + 1]
        for t in range(size):
            weight, next_weight = flat_weights[offsets[t] + model], flat_weights[offsets[t] + model + np.uint64(1)]
            acc[t] = (acc[t] + weight * value[t]) + next_weight * next_value[t]
    if n_models % 2 == 0:
        last, value = np.uint64(n_models - 1), values[n_models - 1]
        for t in range(size):
            acc[t] += flat_weights[offsets[t] + last] * value[t]
    block_out = out.reshape(-1)[start : start + size]
    for t in range(size):
        rounded = np.floor(acc[t] + np.float32(0.5))
        block_out[t] = 0 if rounded < 0 else (255 if rounded > 255 else np.uint8(rounded))


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


@numba.njit(inline="always")
def add_em_moments(predictions, pixel, channel, row, n_models):
    """Add one pixel-channel's n, x_k, x_k^2, x_k s and s^2 (s = sum_k x_k) to the moments `row`
    (`stats.EM_MOMENTS`)."""
    total = np.int64(0)
    for k in range(n_models):
        total += np.int64(predictions[k, pixel, channel])
    row[0] += 1
    for k in range(n_models):
        xk = np.int64(predictions[k, pixel, channel])
        row[1 + k] += xk
        row[1 + n_models + k] += xk * xk
        row[1 + 2 * n_models + k] += xk * total
    row[1 + 3 * n_models] += total * total


@numba.njit(nogil=True, cache=CACHE)
def accumulate_dense(predictions, truth, places, moments, histogram):
    """One fused pass: all moments per cell (`add_moments`) and the y histogram per cell, into dense
    tables (`places` from `place_tables`: its length, K, is known when compiling, so loops unroll)."""
    n_pixels, n_channels = predictions.shape[1], predictions.shape[2]
    for p in range(n_pixels):
        for c in range(n_channels):
            cell = flat_bin(predictions, p, c, places) * n_channels + c
            histogram[cell * 256 + truth[p, c]] += 1
            add_moments(predictions, truth, p, c, moments[cell], len(places))


@numba.njit(nogil=True, cache=CACHE)
def accumulate_dense_em(predictions, truth, places, moments, histogram):
    """`accumulate_dense` of the moments EM uses (`add_em_moments`): a kernel of its own, so that a
    fit compiles only the one it runs (a flag read at run time compiled both, 0.15 s more)."""
    n_pixels, n_channels = predictions.shape[1], predictions.shape[2]
    for p in range(n_pixels):
        for c in range(n_channels):
            cell = flat_bin(predictions, p, c, places) * n_channels + c
            histogram[cell * 256 + truth[p, c]] += 1
            add_em_moments(predictions, p, c, moments[cell], len(places))


#: Groups a table of `_add_to_groups` starts with room for (it doubles when half full).
FIRST_GROUP_SLOTS = 1024


@numba.njit(inline="always")
def _empty_groups(n_words):
    """A table of groups of key words of `n_words` words, empty: (each slot's key words, each
    slot's group (-1: free), each group's key words, how many groups, the hash's shift)."""
    return (
        np.empty((FIRST_GROUP_SLOTS, n_words), np.int64),
        np.full(FIRST_GROUP_SLOTS, -1, np.int64),
        np.empty((FIRST_GROUP_SLOTS, n_words), np.int64),
        np.int64(0),
        np.uint64(64 - 10),
    )


@numba.njit(inline="always")
def _add_to_groups(keys, n_rows, group, table):
    """The group of each of the first `n_rows` rows of key words `keys` (n, W) into group[:n_rows],
    groups numbered in order of first appearance in `table` (`_empty_groups`), which is returned
    with the new groups added. Open addressing with linear probing, the table doubled when half
    full; a slot holds its key words beside its group, so a probe reads one slot and never the
    keys of earlier rows."""
    slot_words, slot_group, group_words, n_groups, shift = table
    mask = np.uint64(len(slot_group) - 1)
    for r in range(n_rows):
        slot = hash_of_words(keys, r) >> shift
        while True:
            found = slot_group[slot]
            if found < 0 or same_words(slot_words, slot, keys, r):
                break
            slot = (slot + np.uint64(1)) & mask
        if found >= 0:
            group[r] = found
            continue
        if n_groups == len(group_words):
            grown = np.empty((2 * len(group_words), keys.shape[1]), np.int64)
            for g in range(n_groups):
                copy_words(group_words, g, grown, g)
            group_words = grown
        copy_words(keys, r, group_words, n_groups)
        copy_words(keys, r, slot_words, slot)
        slot_group[slot], group[r] = n_groups, n_groups
        n_groups += 1
        if 2 * n_groups > len(slot_group):
            shift -= np.uint64(1)
            slot_words = np.empty((2 * len(slot_group), keys.shape[1]), np.int64)
            slot_group = np.full(2 * len(slot_group), -1, np.int64)
            mask = np.uint64(len(slot_group) - 1)
            for g in range(n_groups):
                slot = hash_of_words(group_words, g) >> shift
                while slot_group[slot] >= 0:
                    slot = (slot + np.uint64(1)) & mask
                copy_words(group_words, g, slot_words, slot)
                slot_group[slot] = g
    return slot_words, slot_group, group_words, n_groups, shift


@numba.njit(nogil=True, cache=CACHE)
def first_seen_groups(keys):
    """Group of each row of key words (n, W), groups numbered in order of first appearance, and
    each group's key words (groups, W): one pass of `_add_to_groups`, O(n) where sorting is O(n log n)."""
    group = np.empty(len(keys), np.int64)
    table = _add_to_groups(keys, len(keys), group, _empty_groups(keys.shape[1]))
    return group, table[2][: table[3]].copy()


@numba.njit(nogil=True, cache=CACHE)
def first_seen_cells(predictions, multiplier, places, word_of_model, n_words, first, stop, group):
    """Group, into group (P * C,) pixel-major, of each pixel-channel of predictions (K, P, C) by its
    cell's key words, groups numbered in order of first appearance; returns each group's key words
    (groups, W). Word g of a cell is its bin's word g (`_key_sums_of_block`, `binning.group_places`
    as float64) * C + c, the cell's key as `stats.chunk_statistics` defines it. A pixel-channel
    whose first word's bin (word 0 // C) lies outside first <= b < stop takes group -1 (a fit in
    passes counts one range of cells at a time). Block by block of `HASHED_BLOCK` pixel-channels
    (keys in the core's cache, never an array of the chunk's size), then grouped (`_add_to_groups`)."""
    n_models, n_channels = len(places), predictions.shape[2]
    values_of_model = predictions.reshape(n_models, -1)
    sums = np.empty((n_words, HASHED_BLOCK), np.float64)
    values = np.empty((n_models, HASHED_BLOCK), np.float32)  # filled by `_key_sums_of_block`, not needed here
    keys = np.empty((HASHED_BLOCK, n_words), np.int64)
    position = np.empty(HASHED_BLOCK, np.int64)
    block_group = np.empty(HASHED_BLOCK, np.int64)
    table = _empty_groups(n_words)
    for start in range(0, values_of_model.shape[1], HASHED_BLOCK):
        size = min(HASHED_BLOCK, values_of_model.shape[1] - start)
        _key_sums_of_block(values_of_model, start, size, multiplier, places, word_of_model, sums, values)
        kept, channel = 0, start % n_channels
        for t in range(size):
            first_word_bin = np.int64(sums[0, t])
            group[start + t] = -1
            if first <= first_word_bin and first_word_bin < stop:
                for i in range(n_words):
                    keys[kept, i] = np.int64(sums[i, t]) * n_channels + channel
                position[kept] = start + t
                kept += 1
            channel += 1
            if channel == n_channels:
                channel = 0
        table = _add_to_groups(keys, kept, block_group, table)
        for t in range(kept):
            group[position[t]] = block_group[t]
    return table[2][: table[3]].copy()


@numba.njit(nogil=True, cache=CACHE)
def accumulate_groups(predictions, truth, group, row_of_group, moments, histogram, places, em_only):
    """Add each pixel-channel's moments to row row_of_group[group[p * C + c]] of `moments` (all of
    them, `add_moments`, or with `em_only` those EM uses, `add_em_moments`; none where `moments` has
    no columns), and where `histogram` has entries, count its ground-truth level y at that row *
    256 + y; pixel-channels of group -1 are left out. Of `places` (a tuple of K place tables) only
    its length K is used: known when compiling, so loops unroll."""
    n_pixels, n_channels = predictions.shape[1], predictions.shape[2]
    count_levels, add_to_moments = len(histogram) > 0, moments.shape[1] > 0
    for p in range(n_pixels):
        for c in range(n_channels):
            g = group[p * n_channels + c]
            if g < 0:
                continue
            row = row_of_group[g]
            if count_levels:
                histogram[row * 256 + truth[p, c]] += 1
            if not add_to_moments:
                continue
            if em_only:
                add_em_moments(predictions, p, c, moments[row], len(places))
            else:
                add_moments(predictions, truth, p, c, moments[row], len(places))
