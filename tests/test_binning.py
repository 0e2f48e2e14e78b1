import numpy as np
import pytest

from ensir_flow.binning import bin_count, flat_bins_of_edges, place_tables, ranges_per_model
from ensir_flow.kernels import cell_indices


def test_ranges_and_bins():
    assert ranges_per_model(32) == 8
    assert ranges_per_model(48) == 6  # ceil(256 / 48)
    assert bin_count(3, 32) == 512
    assert bin_count(5, 16) == 16 ** 5
    with pytest.raises(ValueError):
        ranges_per_model(0)


def test_flat_index_puts_first_model_most_significant():
    # x = (10, 200, 64) at w = 32 -> digits (0, 6, 2) -> 0*64 + 6*8 + 2 = 50
    predictions = np.array([[[10, 40]], [[200, 0]], [[64, 255]]], dtype=np.uint8)  # (K=3, P=1, C=2)
    cells = cell_indices(predictions, place_tables(3, 32))
    assert cells[0] == 50 * 2 + 0
    # second channel: digits (1, 0, 7) -> 64 + 0 + 7 = 71
    assert cells[1] == 71 * 2 + 1
    assert flat_bins_of_edges(np.array([[0, 192, 64], [32, 0, 224]]), 32).tolist() == [50, 71]
