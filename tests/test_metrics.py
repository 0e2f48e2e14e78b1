"""PSNR, SSIM and BT.601 luma against hand-computed values and an independent SSIM."""

import numpy as np
import pytest

from ensir_flow.metrics import SSIM_WINDOW, StripScorer, psnr, rgb_to_y, scores, ssim


def test_psnr_by_hand_and_identical():
    a = np.full((8, 8, 3), 100, np.uint8)
    for d in (1, 5, 40):
        assert psnr(a, a + np.uint8(d)) == pytest.approx(10 * np.log10(255**2 / d**2), abs=1e-12)
    assert psnr(a, a) == float("inf")


def test_psnr_mse_is_over_all_pixels_and_channels():
    a = np.zeros((4, 5, 3), np.uint8)
    b = a.copy()
    b[1, 2, 0] = 60  # one value of 60 among 4 * 5 * 3
    assert psnr(a, b) == pytest.approx(10 * np.log10(255**2 / (60**2 / 60)), abs=1e-12)


def test_crop_border_removes_the_border():
    a = np.full((10, 10, 3), 50, np.uint8)
    b = a.copy()
    b[0, :] = 0
    b[:, -1] = 0
    b[-2, 3] = 56  # inside the 1-pixel frame: the only difference left after cropping
    uncropped_mse = (19 * 3 * 50**2 + 3 * 6**2) / (10 * 10 * 3)  # 19 frame pixels, one inner pixel
    assert psnr(a, b) == pytest.approx(10 * np.log10(255**2 / uncropped_mse), abs=1e-12)
    assert psnr(a, b, crop_border=1) == pytest.approx(10 * np.log10(255**2 / (3 * 6**2 / (8 * 8 * 3))), abs=1e-12)
    assert psnr(a, b, crop_border=2) == float("inf")


def test_y_of_pure_colours():
    pixels = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [0, 0, 0], [255, 255, 255]]], np.uint8)
    y = rgb_to_y(pixels)
    assert y.dtype == np.float64 and y.shape == (1, 5)
    np.testing.assert_allclose(y[0], [81.481, 144.553, 40.966, 16.0, 235.0], atol=1e-12)


def test_psnr_on_y_by_hand():
    black = np.zeros((6, 6, 3), np.uint8)
    for channel, weight in enumerate((65.481, 128.553, 24.966)):
        pure = black.copy()
        pure[..., channel] = 255
        assert psnr(pure, black, y_channel=True) == pytest.approx(20 * np.log10(255 / weight), abs=1e-12)
    # the same difference on all of R, G and B: Y moves by 219/255 of it
    grey = np.full((6, 6, 3), 100, np.uint8)
    assert psnr(grey, grey + np.uint8(10), y_channel=True) == pytest.approx(20 * np.log10(255 / (10 * 219 / 255)), abs=1e-12)


def test_single_channel_images_use_their_channel_for_y():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (20, 23), dtype=np.uint8)
    b = rng.integers(0, 256, (20, 23), dtype=np.uint8)
    expected = 10 * np.log10(255**2 / np.mean((a.astype(float) - b) ** 2))
    for x, y in ((a, b), (a[:, :, None], b[:, :, None])):
        assert psnr(x, y) == pytest.approx(expected, abs=1e-12)
        assert psnr(x, y, y_channel=True) == pytest.approx(expected, abs=1e-12)
    assert ssim(a, b, y_channel=True) == pytest.approx(ssim(a[:, :, None], b[:, :, None]), abs=1e-15)


def _ssim_oracle(a, b):
    """SSIM written out: 11x11 Gaussian (sigma 1.5) correlated over the 'valid' region, channels averaged."""
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    window = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    a = a.astype(np.float64).reshape(*a.shape[:2], -1)
    b = b.astype(np.float64).reshape(*b.shape[:2], -1)

    def local_mean(z):  # every full 11x11 patch, weighted: the 'valid' region only
        return np.einsum("ijkl,kl->ij", np.lib.stride_tricks.sliding_window_view(z, (11, 11)), window)

    scores = []
    for c in range(a.shape[2]):
        x, y = a[:, :, c], b[:, :, c]
        mx, my = local_mean(x), local_mean(y)
        sxx, syy, sxy = local_mean(x * x) - mx**2, local_mean(y * y) - my**2, local_mean(x * y) - mx * my
        scores.append(np.mean((2 * mx * my + c1) * (2 * sxy + c2) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))))
    return float(np.mean(scores))


def test_ssim_matches_an_independent_implementation():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (40, 37, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-60, 61, a.shape), 0, 255).astype(np.uint8)
    reference = _ssim_oracle(a, b)
    assert 0.3 < reference < 0.95  # a case where the score is informative
    assert ssim(a, b) == pytest.approx(reference, abs=1e-9)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    y = lambda im: rgb_to_y(im)[:, :, None]  # noqa: E731
    assert ssim(a, b, y_channel=True) == pytest.approx(_ssim_oracle(y(a), y(b)), abs=1e-9)
    assert ssim(a, b, crop_border=4) == pytest.approx(_ssim_oracle(a[4:-4, 4:-4], b[4:-4, 4:-4]), abs=1e-9)
    assert ssim(a[:, :, 1], b[:, :, 1]) == pytest.approx(_ssim_oracle(a[:, :, 1:2], b[:, :, 1:2]), abs=1e-9)


@pytest.mark.parametrize("metric", [psnr, ssim])
def test_bad_pairs_are_refused(metric):
    rgb = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="differs"):
        metric(rgb, np.zeros((16, 17, 3), np.uint8))
    with pytest.raises(ValueError, match="differs"):
        metric(rgb, np.zeros((16, 16, 1), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        metric(np.zeros((16, 16, 4), np.uint8), np.zeros((16, 16, 4), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        metric(rgb.astype(np.float64), rgb.astype(np.float64))
    with pytest.raises(ValueError, match="crop_border"):
        metric(rgb, rgb, crop_border=8)


def _skimage_ssim(image, reference, crop_border=0, y_channel=False):
    """scikit-image's SSIM with BasicSR's settings, per channel then averaged: what metrics.ssim
    computed before its own fused filter (the two must agree)."""
    from skimage.metrics import structural_similarity

    a, b = (np.asarray(im)[:, :, None] if np.asarray(im).ndim == 2 else np.asarray(im) for im in (image, reference))
    if crop_border:
        a, b = a[crop_border:-crop_border, crop_border:-crop_border], b[crop_border:-crop_border, crop_border:-crop_border]
    if y_channel and a.shape[2] == 3:
        a, b = rgb_to_y(a)[:, :, None], rgb_to_y(b)[:, :, None]
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(
        np.mean(
            [
                structural_similarity(
                    a[:, :, c], b[:, :, c], gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255.0
                )
                for c in range(a.shape[2])
            ]
        )
    )


def _noisy_pair(rng, shape):
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 41, shape), 0, 255).astype(np.uint8)
    return a, b


def _photo_pair():
    """A real photo (scikit-image's astronaut, 512x512 RGB) and a blurred, quantised copy of it."""
    from scipy.ndimage import uniform_filter
    from skimage import data

    photo = data.astronaut()
    return np.clip(uniform_filter(photo.astype(np.float64), size=(3, 5, 1)) + 0.5, 0, 255).astype(np.uint8), photo


@pytest.mark.parametrize("shape", [(11, 11, 3), (40, 37, 3), (37, 53), (29, 31, 1), (64, 12, 3)])
@pytest.mark.parametrize("options", [{}, {"y_channel": True}, {"crop_border": 3}, {"crop_border": 4, "y_channel": True}])
def test_ssim_equals_scikit_image_with_basicsr_settings(shape, options):
    rng = np.random.default_rng(sum(shape) + len(options))
    a, b = _noisy_pair(rng, shape)
    cropped = min(shape[:2]) - 2 * options.get("crop_border", 0)
    if cropped < 11:
        assert np.isnan(ssim(a, b, **options))  # BasicSR's NaN where scikit-image would raise
    else:
        assert ssim(a, b, **options) == pytest.approx(_skimage_ssim(a, b, **options), abs=1e-6)


@pytest.mark.parametrize("options", [{}, {"y_channel": True}, {"crop_border": 4}])
def test_ssim_equals_scikit_image_on_a_photo(options):
    image, reference = _photo_pair()
    expected = _skimage_ssim(image, reference, **options)
    assert 0.5 < expected < 0.99
    assert ssim(image, reference, **options) == pytest.approx(expected, abs=1e-6)
    grey = (image[:, :, 1], reference[:, :, 1])
    assert ssim(*grey, **options) == pytest.approx(_skimage_ssim(*grey, **options), abs=1e-6)


def test_scores_in_one_pass_equal_each_metric():
    rng = np.random.default_rng(7)
    reference = rng.integers(0, 256, (33, 45, 3), dtype=np.uint8)
    images = [_noisy_pair(rng, reference.shape)[1], reference.copy(), 255 - reference]
    for options in ({}, {"y_channel": True, "crop_border": 2}):
        psnrs, ssims = scores(images, reference, **options)
        assert psnrs == [psnr(image, reference, **options) for image in images]
        assert ssims == [ssim(image, reference, **options) for image in images]
    assert psnrs[1] == float("inf") and ssims[1] == pytest.approx(1.0, abs=1e-12)
    assert scores([], reference) == ([], [])


def test_psnr_equals_the_float64_mean_bit_for_bit():
    """uint8 squared errors are summed exactly, which is what numpy's float64 mean of them gives."""
    rng = np.random.default_rng(3)
    for shape in ((720, 1280, 3), (17, 19), (5, 300, 1)):
        a, b = _noisy_pair(rng, shape)
        mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
        assert psnr(a, b) == float(10.0 * np.log10(255.0**2 / mse))


def _strip_scores(images, reference, rows, **options):
    """`StripScorer` fed `rows` rows (and the SSIM halo) at a time, as evaluate feeds it."""
    scorer = StripScorer(len(images), reference.shape, rows=rows, **options)
    for start, stop in scorer.strips:
        scorer.add([image[start:stop] for image in images], reference[start:stop])
    return scorer.scores()


@pytest.mark.parametrize("shape", [(37, 29, 3), (23, 41), (12, 15, 1), (11, 19, 3), (9, 30, 3)])
@pytest.mark.parametrize("options", [{}, {"y_channel": True}, {"crop_border": 1}, {"crop_border": 3, "y_channel": True}])
def test_strips_give_the_scores_of_the_whole_image(shape, options):
    """Strips of any height, across every boundary and halo cut at the bottom: SSIM and 8-bit PSNR
    the same bits as the whole image; PSNR on luma (float squared errors summed per strip) to rounding."""
    rng = np.random.default_rng(sum(shape) + 5 * len(options))
    reference = rng.integers(0, 256, shape, dtype=np.uint8)
    images = [_noisy_pair(rng, shape)[1] for _ in range(3)] + [reference.copy()]
    whole_psnr, whole_ssim = scores(images, reference, **options)
    on_luma = options.get("y_channel") and len(shape) == 3 and shape[2] == 3
    inner = shape[0] - 2 * options.get("crop_border", 0)
    for rows in sorted({1, 2, 3, SSIM_WINDOW - 1, SSIM_WINDOW, SSIM_WINDOW + 1, inner - 1, inner}):
        strip_psnr, strip_ssim = _strip_scores(images, reference, rows, **options)
        np.testing.assert_array_equal(strip_ssim, whole_ssim, err_msg=f"{rows} rows a strip")
        if on_luma:
            np.testing.assert_allclose(strip_psnr, whole_psnr, rtol=1e-13, err_msg=f"{rows} rows a strip")
        else:
            assert strip_psnr == whole_psnr, f"{rows} rows a strip"
    assert whole_psnr[-1] == float("inf")
    assert np.isnan(whole_ssim[0]) == (min(shape[:2]) - 2 * options.get("crop_border", 0) < SSIM_WINDOW)


def test_strip_bounds_carry_the_ssim_halo():
    scorer = StripScorer(1, (40, 30, 3), crop_border=2, rows=10)
    # cropped rows 2:38 (36 rows) in strips of 10, each read with the 10 rows below it where there are
    assert scorer.strips == [(2, 22), (12, 32), (22, 38), (32, 38)]


def test_strips_out_of_turn_are_refused():
    reference = np.zeros((30, 30, 3), np.uint8)
    scorer = StripScorer(1, reference.shape, rows=10)
    with pytest.raises(ValueError, match="rows 0:20"):
        scorer.add([reference[:10]], reference[:10])  # without its halo
    with pytest.raises(ValueError, match="0 of 3 strips"):
        scorer.scores()
    for start, stop in scorer.strips:
        scorer.add([reference[start:stop]], reference[start:stop])
    assert scorer.scores() == ([float("inf")], [pytest.approx(1.0, abs=1e-12)])
    with pytest.raises(ValueError, match="already"):
        scorer.add([reference[:10]], reference[:10])
