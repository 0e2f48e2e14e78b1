"""Image-quality metrics as the restoration literature computes them (BasicSR conventions).

PSNR and SSIM on the 0..255 scale in float64, with `crop_border` pixels removed from each side
and, optionally, on the luma Y of ITU-R BT.601 as MATLAB's rgb2ycbcr defines it (the convention
for super-resolution and deraining benchmarks). Papers' tables are computed this way, so scores
from here compare with published figures.

Inputs are 8-bit images, (H, W), (H, W, 1) or (H, W, 3) RGB; anything else is refused rather than
scored on a wrong scale. SSIM is NaN for images smaller than its 11x11 window (after cropping), as
in BasicSR; PSNR is defined for every size.

`scores` rates several candidates against one reference in one pass: one numba loop over the
output rows filters the reference's local moments once for all candidates, then each
candidate's (separable Gaussian, 'valid' region only, no full-size intermediate maps: a few rows
stay in cache). It gives the bits of the per-candidate kernels it replaced, and it equals
scikit-image's `structural_similarity` with BasicSR's settings to rounding (~1e-14 on the GoPro
frames; tested to 1e-6 against scikit-image and to 1e-9 against a direct implementation).
"""

import numba
import numpy as np

#: Side of SSIM's Gaussian window (sigma 1.5, truncated at 3.5 sigma): 2 * 5 + 1 pixels.
SSIM_WINDOW = 11
HALF_WINDOW = SSIM_WINDOW // 2
SSIM_SIGMA = 1.5
#: SSIM's stabilising constants for data on 0..255: (0.01 L)^2 and (0.03 L)^2.
SSIM_C1, SSIM_C2 = (0.01 * 255.0) ** 2, (0.03 * 255.0) ** 2


def _gaussian_taps() -> np.ndarray:
    """The normalised 11-tap Gaussian (sigma 1.5), computed as scipy.ndimage's gaussian_filter does."""
    offsets = np.arange(SSIM_WINDOW) - SSIM_WINDOW // 2
    taps = np.exp(-0.5 / SSIM_SIGMA ** 2 * offsets.astype(np.float64) ** 2)
    return taps / taps.sum()


GAUSSIAN_TAPS = _gaussian_taps()
#: The numba kernels below: run without the GIL (one evaluate task per image, in parallel), cached
#: on disk, and with numpy's error model, so their loops carry no division-by-zero branch (SSIM's
#: denominators are at least C1 * C2 > 0).
KERNEL_OPTIONS = {"nogil": True, "cache": True, "error_model": "numpy"}


def rgb_to_y(image: np.ndarray) -> np.ndarray:
    """BT.601 luma on 0..255 as MATLAB's rgb2ycbcr: 16 + (65.481 R + 128.553 G + 24.966 B) / 255.

    `image` is (H, W, 3) RGB on 0..255; returns float64 (H, W), not rounded (as BasicSR scores it).
    """
    rgb = np.asarray(image, dtype=np.float64)
    return 16.0 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255.0


def _check(image: np.ndarray, reference: np.ndarray, crop_border: int) -> None:
    """Refuse pairs that cannot be scored: other shapes, layouts, dtypes, or nothing left after cropping."""
    if image.shape != reference.shape:
        raise ValueError(f"image shape {image.shape} differs from reference shape {reference.shape}")
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3))):
        raise ValueError(f"expected an (H, W), (H, W, 1) or (H, W, 3) image, got shape {image.shape}")
    for name, array in (("image", image), ("reference", reference)):
        if array.dtype != np.uint8:
            raise ValueError(f"{name} has dtype {array.dtype}; the metrics are defined for uint8 (0..255) images")
    if crop_border < 0 or 2 * crop_border >= min(image.shape[:2]):
        raise ValueError(f"crop_border={crop_border} leaves no pixels of a {image.shape[0]}x{image.shape[1]} image")


def _prepare(array: np.ndarray, crop_border: int, y_channel: bool) -> np.ndarray:
    """One checked image as rows (H, W * C) after cropping: uint8 as stored, or float64 BT.601
    luma (C = 1) with `y_channel` on RGB."""
    array = array[:, :, None] if array.ndim == 2 else array
    if crop_border:
        array = array[crop_border:-crop_border, crop_border:-crop_border]
    if y_channel and array.shape[2] == 3:
        return rgb_to_y(array)
    return np.ascontiguousarray(array).reshape(array.shape[0], -1)


def _psnr_of(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two prepared images. For uint8 the squared errors are summed exactly (integers in
    float64), which is what numpy's float64 mean gave bit for bit; luma (float) is scored by numpy."""
    if a.dtype == np.uint8:
        mse = _squared_error_sum(a, b) / a.size
    else:
        mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else float(10.0 * np.log10(255.0 ** 2 / mse))


@numba.njit(**KERNEL_OPTIONS)
def _squared_error_sum(x, y):
    """Sum of (x - y)^2 over two uint8 arrays of one shape: exact (below 2^53 for any image that fits in memory)."""
    total = 0.0
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            d = np.float64(x[i, j]) - np.float64(y[i, j])
            total += d * d
    return total


@numba.njit(inline="always")
def _vertical_pass(rows, pixel, weighted, weighted_squares):
    """Column `pixel` of the 11 rows `rows`, filtered by the Gaussian into weighted[pixel] and
    (of the squared values) weighted_squares[pixel]: the two rows a symmetric tap weighs alike
    are added before multiplying (sums of integers for uint8 images, so exact)."""
    v = np.float64(rows[HALF_WINDOW, pixel])
    total, squares = GAUSSIAN_TAPS[HALF_WINDOW] * v, GAUSSIAN_TAPS[HALF_WINDOW] * (v * v)
    for k in range(HALF_WINDOW):
        a, b = np.float64(rows[k, pixel]), np.float64(rows[SSIM_WINDOW - 1 - k, pixel])
        total += GAUSSIAN_TAPS[k] * (a + b)
        squares += GAUSSIAN_TAPS[k] * (a * a + b * b)
    weighted[pixel], weighted_squares[pixel] = total, squares


@numba.njit(inline="always")
def _horizontal_pass(columns, j, channels):
    """Output value j of a row of vertically filtered values `columns` of C interleaved channels,
    filtered by the Gaussian along the row (the two columns a tap weighs alike added first)."""
    total = GAUSSIAN_TAPS[HALF_WINDOW] * columns[j + HALF_WINDOW * channels]
    for k in range(HALF_WINDOW):
        total += GAUSSIAN_TAPS[k] * (columns[j + k * channels] + columns[j + (SSIM_WINDOW - 1 - k) * channels])
    return total


@numba.njit(**KERNEL_OPTIONS)
def _ssim_sums(images, reference, channels, c1, c2):
    """Per image of `images` (n, H, W * C) and channel, the sum of its SSIM map against
    `reference` (H, W * C), both rows of C interleaved channels, over the 'valid' region: (n, C).

    One output row at a time: the reference's local moments are filtered once for all the
    images, then each image's (vertical pass over the 11 rows, horizontal pass fused with the
    SSIM formula), so no full-size map is ever held and the working set stays in cache. The
    filter and the formula are scikit-image's term for term. The window and its taps are
    compile-time constants, so the loops over taps unroll and the loops over pixels vectorise.
    """
    n_images = images.shape[0]
    height, row_len = reference.shape
    out_h, out_len = height - SSIM_WINDOW + 1, row_len - (SSIM_WINDOW - 1) * channels
    col_y, col_yy, col_x, col_xx, col_xy = np.empty(row_len), np.empty(row_len), np.empty(row_len), np.empty(row_len), np.empty(row_len)
    mean_y, square_y, ssim_row = np.empty(out_len), np.empty(out_len), np.empty(out_len)
    totals = np.zeros((n_images, channels))
    for i in range(out_h):
        truth = reference[i: i + SSIM_WINDOW]
        for j in range(row_len):
            _vertical_pass(truth, j, col_y, col_yy)
        for j in range(out_len):
            mean_y[j], square_y[j] = _horizontal_pass(col_y, j, channels), _horizontal_pass(col_yy, j, channels)
        for n in range(n_images):
            rows = images[n, i: i + SSIM_WINDOW]
            for j in range(row_len):
                _vertical_pass(rows, j, col_x, col_xx)
                cross = GAUSSIAN_TAPS[HALF_WINDOW] * (np.float64(rows[HALF_WINDOW, j]) * np.float64(truth[HALF_WINDOW, j]))
                for k in range(HALF_WINDOW):
                    top, bottom = k, SSIM_WINDOW - 1 - k
                    cross += GAUSSIAN_TAPS[k] * (np.float64(rows[top, j]) * np.float64(truth[top, j])
                                                 + np.float64(rows[bottom, j]) * np.float64(truth[bottom, j]))
                col_xy[j] = cross
            for j in range(out_len):
                ux, sx, cross = (_horizontal_pass(col_x, j, channels), _horizontal_pass(col_xx, j, channels),
                                 _horizontal_pass(col_xy, j, channels))
                uy = mean_y[j]
                ssim_row[j] = ((2.0 * ux * uy + c1) * (2.0 * (cross - ux * uy) + c2)) / (
                    (ux * ux + uy * uy + c1) * ((sx - ux * ux) + (square_y[j] - uy * uy) + c2))
            total = totals[n]
            for j in range(out_len):
                total[j % channels] += ssim_row[j]
    return totals


def scores(images, reference, crop_border: int = 0, y_channel: bool = False) -> tuple[list[float], list[float]]:
    """PSNR and SSIM of each of `images` against `reference`, in one pass: ([psnr...], [ssim...]).

    The values of `psnr` and `ssim` for each image; the reference is converted and its local
    moments filtered once for all of them (the candidates are stacked for `_ssim_sums`).
    """
    reference = np.asarray(reference)
    images = [np.asarray(image) for image in images]
    for image in images:
        _check(image, reference, crop_border)
    truth = _prepare(reference, crop_border, y_channel)
    candidates = [_prepare(image, crop_border, y_channel) for image in images]
    psnrs = [_psnr_of(candidate, truth) for candidate in candidates]
    channels = truth.shape[1] // (reference.shape[1] - 2 * crop_border)
    if not candidates or min(truth.shape[0], truth.shape[1] // channels) < SSIM_WINDOW:
        return psnrs, [float("nan")] * len(candidates)
    sums = _ssim_sums(np.stack(candidates), truth, channels, SSIM_C1, SSIM_C2)
    n_valid = (truth.shape[0] - SSIM_WINDOW + 1) * (truth.shape[1] // channels - SSIM_WINDOW + 1)
    return psnrs, [float(np.mean(per_channel / n_valid)) for per_channel in sums]


def psnr(image, reference, crop_border: int = 0, y_channel: bool = False) -> float:
    """Peak signal-to-noise ratio in dB for 8-bit images; inf when they are identical.

    MSE is taken over all pixels and channels of the cropped images, peak 255.
    `y_channel` scores the BT.601 luma of RGB images (single-channel images are scored as they are).
    """
    image, reference = np.asarray(image), np.asarray(reference)
    _check(image, reference, crop_border)
    return _psnr_of(_prepare(image, crop_border, y_channel), _prepare(reference, crop_border, y_channel))


def ssim(image, reference, crop_border: int = 0, y_channel: bool = False) -> float:
    """Mean SSIM: 11x11 Gaussian window (sigma 1.5), 'valid' region, mean over channels.

    This is scikit-image's `structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=255)`, which is BasicSR's `_ssim` (cv2.filter2D, then
    the 5-pixel frame dropped): its Gaussian truncated at 3.5 sigma is the same 11-tap kernel, and
    it discards the same frame, so its reflect padding never enters the mean; here the filter runs
    over the valid region only.

    An image with a (cropped) side under 11 pixels has no valid region: its SSIM is NaN, which is
    what BasicSR returns for it (the mean of the empty map left by dropping the frame), where
    scikit-image would raise. Means over images should skip NaN and say how many images lack SSIM.
    """
    return scores([image], reference, crop_border, y_channel)[1][0]
