import numpy as np
import pytest

from ensir_flow.blend import average, blend, blend_spans, squared_distance_sums, zzpm


def test_blend_by_hand_with_rounding_half_up_and_bin_lookup():
    # K=2, w=128 -> 4 bins; C=1. Pixel 1: x = (10, 20) bin 0; pixel 2: x = (200, 100) bin 2 (digits 1, 0)
    predictions = np.array([[[10], [200]], [[20], [100]]], dtype=np.uint8)
    weights = np.zeros((4, 1, 2), np.float32)
    weights[0, 0] = [0.25, 0.75]  # 2.5 + 15 = 17.5 -> 18 (half up)
    weights[2, 0] = [0.5, 0.5]  # 150
    np.testing.assert_array_equal(blend(predictions, weights, 128), [[18], [150]])


def test_blend_clips_to_uint8():
    predictions = np.array([[[250]], [[250]]], dtype=np.uint8)
    weights = np.full((4, 1, 2), 0.6, np.float32)  # 300 before clipping
    assert blend(predictions, weights, 128)[0, 0] == 255


def test_uniform_lut_equals_average():
    rng = np.random.default_rng(0)
    predictions = rng.integers(0, 256, (3, 1000, 3), dtype=np.uint8)
    weights = np.full((512, 3, 3), np.float32(1 / 3), np.float32)
    got = blend(predictions, weights, 32).astype(int)
    assert np.abs(got - average(predictions).astype(int)).max() <= 1


def test_blend_refuses_mismatched_weights():
    with pytest.raises(ValueError, match="do not fit"):
        blend(np.zeros((3, 4, 3), np.uint8), np.zeros((512, 3, 2), np.float32), 32)


def test_zzpm_by_hand():
    # three models on 2 pixels; the per-pixel mean is (11, 20); distances (1, 1, 4) / 2 over pixels
    predictions = np.array([[10, 19], [10, 19], [13, 22]], dtype=np.uint8)[:, :, None]
    distance = np.array([(1 + 1) / 2, (1 + 1) / 2, (4 + 4) / 2])
    weights = np.exp(1 / (1e-3 + distance)) / np.exp(1 / (1e-3 + distance)).sum()
    expected = np.floor(weights @ predictions[:, :, 0].astype(float) + 0.5)
    np.testing.assert_array_equal(zzpm(predictions)[:, 0], expected)


@pytest.mark.parametrize("n_models", [1, 2, 3, 5, 8])
def test_average_equals_the_float32_mean_for_every_sum(n_models):
    # the average of a pixel-channel depends only on the sum of its K values: try every sum
    sums = np.arange(255 * n_models + 1)
    predictions = np.stack([np.clip(sums - 255 * k, 0, 255) for k in range(n_models)]).astype(np.uint8)
    expected = np.floor(predictions.astype(np.float32).mean(axis=0) + np.float32(0.5)).astype(np.uint8)
    np.testing.assert_array_equal(average(predictions), expected)


@pytest.mark.parametrize("n_pixels", [1, 7, 43, 129, 1000, 70001])
def test_zzpm_parts_equal_the_numpy_expressions_bit_for_bit(n_pixels):
    # sizes below, at and far above numpy's pairwise-summation block (128 values), odd remainders
    rng = np.random.default_rng(n_pixels)
    predictions = rng.integers(0, 256, (3, n_pixels, 3), dtype=np.uint8)
    x = predictions.astype(np.float64)
    expected_sums = ((x - x.mean(axis=0)) ** 2).reshape(3, -1).sum(axis=1)
    assert squared_distance_sums(predictions).tobytes() == expected_sums.tobytes()
    weights = rng.random((2, 3))
    spans = [(0, n_pixels // 2), (n_pixels // 2, n_pixels)]
    expected = np.concatenate(
        [
            np.floor(np.tensordot(w, x[:, start:stop], axes=1) + 0.5).clip(0, 255).astype(np.uint8)
            for (start, stop), w in zip(spans, weights)
        ]
    )
    np.testing.assert_array_equal(blend_spans(predictions, weights, spans), expected)
