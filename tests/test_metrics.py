import numpy as np
import pytest
from scipy.signal import convolve2d

from ensir_flow.metrics import psnr, rgb_to_y, ssim


def test_psnr_by_hand_and_identical():
    a = np.full((8, 8, 3), 100, np.uint8)
    b = a + np.uint8(5)
    assert psnr(a, b) == pytest.approx(10 * np.log10(255 ** 2 / 25))
    assert psnr(a, a) == float("inf")


def test_crop_border_removes_the_border():
    a = np.full((10, 10, 3), 50, np.uint8)
    b = a.copy()
    b[0, :] = 0
    b[:, -1] = 0
    assert psnr(a, b, crop_border=1) == float("inf")
    assert psnr(a, b) < 30


def test_y_channel_of_pure_colours():
    pixels = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [0, 0, 0]]], np.uint8)
    np.testing.assert_allclose(rgb_to_y(pixels)[0], [81.481, 144.553, 40.966, 16.0])


def _ssim_oracle(a, b):
    """SSIM with an 11x11 Gaussian (sigma 1.5) over the 'valid' region, per channel, averaged."""
    g = np.exp(-(np.arange(11) - 5) ** 2 / (2 * 1.5 ** 2))
    window = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    scores = []
    for c in range(a.shape[2]):
        x, y = a[:, :, c].astype(np.float64), b[:, :, c].astype(np.float64)
        f = lambda z: convolve2d(z, window, mode="valid")  # noqa: E731
        mx, my = f(x), f(y)
        sxx, syy, sxy = f(x * x) - mx ** 2, f(y * y) - my ** 2, f(x * y) - mx * my
        scores.append((((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))).mean())
    return np.mean(scores)


def test_ssim_matches_an_independent_implementation():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (40, 37, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-30, 31, a.shape), 0, 255).astype(np.uint8)
    assert ssim(a, b) == pytest.approx(_ssim_oracle(a, b), abs=1e-6)
    assert ssim(a, a) == pytest.approx(1.0)
    y = lambda im: rgb_to_y(im)[:, :, None]  # noqa: E731
    assert ssim(a, b, y_channel=True) == pytest.approx(_ssim_oracle(y(a), y(b)), abs=1e-6)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="differs"):
        psnr(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5, 3), np.uint8))
