"""How the fit pipeline keeps cross-validation folds of images apart within pixel chunks."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ensir_flow import schema
from pipelines.fit import chunk_segments, image_folds


@settings(max_examples=50, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=12), chunk=st.integers(1, 60), n_folds=st.integers(1, 4))
def test_segments_cover_each_chunk_with_the_fold_of_each_pixel(sizes, chunk, n_folds):
    index = schema.ImageIndex([f"i{k}" for k in range(len(sizes))], np.array(sizes), np.ones(len(sizes), int))
    folds = image_folds(len(sizes), n_folds)
    fold_of_pixel = np.repeat(folds, sizes)
    chunks = schema.pixel_chunks(index.n_pixels, chunk)
    start = 0
    for length, runs in zip(chunks, chunk_segments(index.to_dataset(), folds, chunks)):
        covered = np.full(length, -1)
        for lo, hi, fold in runs:
            assert (covered[lo:hi] == -1).all()
            covered[lo:hi] = fold
        np.testing.assert_array_equal(covered, fold_of_pixel[start: start + length])
        start += length
