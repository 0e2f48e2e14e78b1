"""Batches of consecutive images, so that a pass over a store's images runs tasks that grow with
its bytes, not with its number of images.

A store chunks its pixels, not its images: a chunk of the default size holds dozens of small
images, so a task per image would read, decode and check a whole chunk for each of them, and the
scheduler would handle a task (the client a future) per image. Export and evaluate hand a task a
*batch* instead: a run of consecutive images that together hold at least `BATCH_BYTES` of the
pixels the task reads, read with one `chunks.read_pixels` per variable (each chunk it needs read
and checked once) and handled one by one inside the task. An image that holds `BATCH_BYTES` or
more, or that the caller says must be handled alone (evaluate's images larger than a strip, which
it reads strip by strip), is a batch of its own.
"""

import numpy as np

#: Bytes of pixels (of every variable a task reads) a batch of small images holds at least. Large
#: enough that what a task costs beside its images (scheduling it, about a millisecond on a
#: cluster; reading a second time the chunk its first image shares with the previous batch) is a
#: few percent of its work: on one core here about a second of PNG encoding (11 Mpx of RGB) or
#: three of scoring (3 Mpx of three models and the ground truth). Small enough that a task holds
#: little (a batch is under twice the budget, held twice while joined from its chunks: under
#: 128 MiB) and that a store of a few hundred MB still spreads over several workers.
BATCH_BYTES = 32 << 20


def consecutive_runs(counts, bytes_per_pixel: int, alone=None, budget: int | None = None) -> list[range]:
    """Batches of consecutive items (images, or chunks) of `counts` pixels each, `bytes_per_pixel`
    read of each pixel, in order, as index ranges: runs that together hold at least `budget`
    bytes (`BATCH_BYTES` by default; the last may hold less); an item of `budget` or more, or
    marked in `alone`, a batch of its own."""
    budget = BATCH_BYTES if budget is None else budget
    sizes = np.asarray(counts, dtype=np.int64) * bytes_per_pixel
    single = sizes >= budget if alone is None else (sizes >= budget) | np.asarray(alone, dtype=bool)
    batches, first, held = [], 0, 0
    for item, (size, own) in enumerate(zip(sizes.tolist(), single.tolist())):
        if own:
            if first < item:
                batches.append(range(first, item))
            batches.append(range(item, item + 1))
            first, held = item + 1, 0
            continue
        held += size
        if held >= budget:
            batches.append(range(first, item + 1))
            first, held = item + 1, 0
    if first < len(sizes):
        batches.append(range(first, len(sizes)))
    return batches


def pixel_range(offsets, counts, images: range) -> tuple[int, int]:
    """Pixels start:stop of the consecutive `images` (which lie back to back)."""
    return int(offsets[images[0]]), int(offsets[images[-1]] + counts[images[-1]])


def chunk_reads(ranges, chunk_length: int, n_pixels: int) -> tuple[int, int]:
    """(chunks, pixels in them) that `chunks.read_pixels` reads for the pixel ranges (start, stop)
    of an array of `n_pixels` in chunks of `chunk_length`: every chunk a range touches, read whole."""
    chunks = pixels = 0
    for start, stop in ranges:
        if stop <= start:
            continue
        first, end = start // chunk_length, -(-stop // chunk_length)
        chunks += end - first
        pixels += min(end * chunk_length, n_pixels) - first * chunk_length
    return chunks, pixels
