"""Spans: how passes over chunks keep images, or cross-validation folds of images, apart within a chunk."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ensir_flow import schema
from ensir_flow.pipelines.chunks import chunk_spans, image_folds


@settings(max_examples=50, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=12), chunk=st.integers(1, 60), n_folds=st.integers(1, 4))
def test_spans_cover_each_chunk_with_the_fold_of_each_pixel(sizes, chunk, n_folds):
    index = schema.ImageIndex([f"i{k}" for k in range(len(sizes))], np.array(sizes), np.ones(len(sizes), int))
    folds = image_folds(len(sizes), n_folds)
    fold_of_pixel = np.repeat(folds, sizes)
    chunks = schema.pixel_chunks(index.n_pixels, chunk)
    start = 0
    for length, spans in zip(chunks, chunk_spans(index.offsets, index.counts, folds, chunks)):
        covered = np.full(length, -1)
        for lo, hi, fold in spans:
            assert (covered[lo:hi] == -1).all()
            covered[lo:hi] = fold
        np.testing.assert_array_equal(covered, fold_of_pixel[start : start + length])
        start += length
