import numpy as np
import pytest

from ensir_flow import stats
from ensir_flow.binning import bin_count, flat_bins_of_edges, ranges_per_model


def test_ranges_and_bins():
    assert ranges_per_model(32) == 8
    assert ranges_per_model(48) == 6  # ceil(256 / 48)
    assert bin_count(3, 32) == 512
    assert bin_count(5, 16) == 16**5
    with pytest.raises(ValueError):
        ranges_per_model(0)


def test_flat_index_puts_first_model_most_significant():
    # x = (10, 200, 64) at w = 32 -> digits (0, 6, 2) -> 0*64 + 6*8 + 2 = 50
    predictions = np.array([[[10, 40]], [[200, 0]], [[64, 255]]], dtype=np.uint8)  # (K=3, P=1, C=2)
    truth = np.zeros((1, 2), np.uint8)
    # second channel: digits (1, 0, 7) -> 64 + 0 + 7 = 71; the dense kernel's cells, then the grouping one's
    for first_bins in (None, (0, 512)):
        assert stats.chunk_statistics(predictions, truth, 32, first_bins=first_bins).cells.tolist() == [50 * 2 + 0, 71 * 2 + 1]
    assert flat_bins_of_edges(np.array([[0, 192, 64], [32, 0, 224]]), 32).tolist() == [50, 71]
