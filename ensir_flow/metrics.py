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

`StripScorer` computes the same scores from horizontal strips of rows handed in one after the
other, so an image far larger than memory is scored holding a strip at a time (`evaluate` does).
Each strip comes with the SSIM_WINDOW - 1 rows below it that its last windows reach; the sums
are those of the whole image, added in the same order (the same bits, except PSNR on luma, whose
float squared errors are summed per strip: equal to rounding).
"""

import numba
import numpy as np

from .kernel_cache import CACHE

#: Side of SSIM's Gaussian window (sigma 1.5, truncated at 3.5 sigma): 2 * 5 + 1 pixels.
SSIM_WINDOW = 11
HALF_WINDOW = SSIM_WINDOW // 2
SSIM_SIGMA = 1.5
#: SSIM's stabilising constants for data on 0..255: (0.01 L)^2 and (0.03 L)^2.
SSIM_C1, SSIM_C2 = (0.01 * 255.0) ** 2, (0.03 * 255.0) ** 2


def _gaussian_taps() -> np.ndarray:
    """The normalised 11-tap Gaussian (sigma 1.5), computed as scipy.ndimage's gaussian_filter does."""
    offsets = np.arange(SSIM_WINDOW) - SSIM_WINDOW // 2
    taps = np.exp(-0.5 / SSIM_SIGMA**2 * offsets.astype(np.float64) ** 2)
    return taps / taps.sum()


GAUSSIAN_TAPS = _gaussian_taps()
#: The numba kernels below: run without the GIL (evaluate's tasks, each a batch of images or one big image, in parallel), cached
#: on disk, and with numpy's error model, so their loops carry no division-by-zero branch (SSIM's
#: denominators are at least C1 * C2 > 0).
KERNEL_OPTIONS = {"nogil": True, "cache": CACHE, "error_model": "numpy"}


def rgb_to_y(image: np.ndarray) -> np.ndarray:
    """BT.601 luma on 0..255 as MATLAB's rgb2ycbcr: 16 + (65.481 R + 128.553 G + 24.966 B) / 255.

    `image` is (H, W, 3) RGB on 0..255; returns float64 (H, W), not rounded (as BasicSR scores it).
    """
    rgb = np.asarray(image, dtype=np.float64)
    return 16.0 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255.0


def _check(image: np.ndarray, reference: np.ndarray) -> None:
    """Refuse pairs that cannot be scored: other shapes, layouts or dtypes."""
    if image.shape != reference.shape:
        raise ValueError(f"image shape {image.shape} differs from reference shape {reference.shape}")
    _check_layout(image.shape)
    for name, array in (("image", image), ("reference", reference)):
        if array.dtype != np.uint8:
            raise ValueError(f"{name} has dtype {array.dtype}; the metrics are defined for uint8 (0..255) images")


def _check_layout(shape: tuple) -> None:
    if not (len(shape) == 2 or (len(shape) == 3 and shape[2] in (1, 3))):
        raise ValueError(f"expected an (H, W), (H, W, 1) or (H, W, 3) image, got shape {shape}")


def _check_crop(shape: tuple, crop_border: int) -> None:
    if crop_border < 0 or 2 * crop_border >= min(shape[:2]):
        raise ValueError(f"crop_border={crop_border} leaves no pixels of a {shape[0]}x{shape[1]} image")


def _prepare(array: np.ndarray, crop_border: int, y_channel: bool, crop_rows: bool = True) -> np.ndarray:
    """One checked image (or strip of rows) as rows (H, W * C) after cropping its columns (and,
    with `crop_rows`, its rows): uint8 as stored, or float64 BT.601 luma (C = 1) with `y_channel`
    on RGB."""
    array = array[:, :, None] if array.ndim == 2 else array
    if crop_border:
        array = array[crop_border:-crop_border] if crop_rows else array
        array = array[:, crop_border:-crop_border]
    if y_channel and array.shape[2] == 3:
        return rgb_to_y(array)
    return np.ascontiguousarray(array).reshape(array.shape[0], -1)


def _squared_errors(a: np.ndarray, b: np.ndarray) -> float:
    """Sum of the squared differences of two prepared images: for uint8 exact (integers in
    float64), which is what numpy's float64 mean gave bit for bit; luma (float) summed by numpy."""
    if a.dtype == np.uint8:
        return _squared_error_sum(a, b)
    return float(np.sum((a - b) ** 2))


def _decibels(squared_errors: float, n_values: int) -> float:
    """PSNR from the sum of squared errors over `n_values` values; inf for no error."""
    mse = squared_errors / n_values
    return float("inf") if mse == 0 else float(10.0 * np.log10(255.0**2 / mse))


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
def _add_ssim_sums(images, reference, channels, c1, c2, totals):
    """Per image of `images` (n, H, W * C) and channel, the sum of its SSIM map against
    `reference` (H, W * C), both rows of C interleaved channels, over the 'valid' region, added
    into `totals` (n, C), one output row after the other (so strips of an image handed in turn
    give the sums of the whole image, bit for bit).

    One output row at a time: the reference's local moments are filtered once for all the
    images, then each image's (vertical pass over the 11 rows, horizontal pass fused with the
    SSIM formula), so no full-size map is ever held and the working set stays in cache. The
    filter and the formula are scikit-image's term for term. The window and its taps are
    compile-time constants, so the loops over taps unroll and the loops over pixels vectorise.
    """
    n_images = images.shape[0]
    height, row_len = reference.shape
    out_h, out_len = height - SSIM_WINDOW + 1, row_len - (SSIM_WINDOW - 1) * channels
    col_y, col_yy, col_x, col_xx, col_xy = (
        np.empty(row_len),
        np.empty(row_len),
        np.empty(row_len),
        np.empty(row_len),
        np.empty(row_len),
    )
    mean_y, square_y, ssim_row = np.empty(out_len), np.empty(out_len), np.empty(out_len)
    for i in range(out_h):
        truth = reference[i : i + SSIM_WINDOW]
        for j in range(row_len):
            _vertical_pass(truth, j, col_y, col_yy)
        for j in range(out_len):
            mean_y[j], square_y[j] = _horizontal_pass(col_y, j, channels), _horizontal_pass(col_yy, j, channels)
        for n in range(n_images):
            rows = images[n, i : i + SSIM_WINDOW]
            for j in range(row_len):
                _vertical_pass(rows, j, col_x, col_xx)
                cross = GAUSSIAN_TAPS[HALF_WINDOW] * (np.float64(rows[HALF_WINDOW, j]) * np.float64(truth[HALF_WINDOW, j]))
                for k in range(HALF_WINDOW):
                    top, bottom = k, SSIM_WINDOW - 1 - k
                    cross += GAUSSIAN_TAPS[k] * (
                        np.float64(rows[top, j]) * np.float64(truth[top, j])
                        + np.float64(rows[bottom, j]) * np.float64(truth[bottom, j])
                    )
                col_xy[j] = cross
            for j in range(out_len):
                ux, sx, cross = (
                    _horizontal_pass(col_x, j, channels),
                    _horizontal_pass(col_xx, j, channels),
                    _horizontal_pass(col_xy, j, channels),
                )
                uy = mean_y[j]
                ssim_row[j] = ((2.0 * ux * uy + c1) * (2.0 * (cross - ux * uy) + c2)) / (
                    (ux * ux + uy * uy + c1) * ((sx - ux * ux) + (square_y[j] - uy * uy) + c2)
                )
            total = totals[n]
            for j in range(out_len):
                total[j % channels] += ssim_row[j]


def strip_bounds(height: int, crop_border: int, rows: int) -> list[tuple[int, int]]:
    """Image rows start:stop of each strip `StripScorer` takes, in order: `rows` rows of the
    cropped image at a time, each with the SSIM_WINDOW - 1 rows below it that its last SSIM
    windows reach (fewer at the bottom of the cropped image)."""
    inner = height - 2 * crop_border
    return [(crop_border + first, crop_border + min(first + rows + SSIM_WINDOW - 1, inner)) for first in range(0, inner, rows)]


class StripScorer:
    """PSNR and SSIM of `n_images` candidates against one reference, all of `shape` (H, W),
    (H, W, 1) or (H, W, 3), from horizontal strips of their rows handed to `add` in the order of
    `strips` (`strip_bounds` of `rows` rows a strip); `scores` gives what `scores` gives for the
    whole images. Squared errors and SSIM sums are accumulated, so no more than a strip of each
    image (and its SSIM halo) is ever held."""

    def __init__(self, n_images: int, shape: tuple, crop_border: int = 0, y_channel: bool = False, rows: int | None = None):
        _check_layout(tuple(shape))
        _check_crop(shape, crop_border)
        self.n_images, self.shape, self.crop_border, self.y_channel = n_images, tuple(shape), crop_border, y_channel
        height, width = shape[0] - 2 * crop_border, shape[1] - 2 * crop_border
        self.rows = height if rows is None else rows
        if self.rows < 1:
            raise ValueError(f"a strip has at least one row, not {self.rows}")
        self.strips = strip_bounds(shape[0], crop_border, self.rows)
        self.channels = 1 if (y_channel and len(shape) == 3 and shape[2] == 3) or len(shape) == 2 else shape[2]
        self.n_values = height * width * self.channels
        self.has_ssim = n_images > 0 and min(height, width) >= SSIM_WINDOW
        self.n_windows = (height - SSIM_WINDOW + 1) * (width - SSIM_WINDOW + 1)
        self.squared_errors = np.zeros(n_images)
        self.ssim_sums = np.zeros((n_images, self.channels))
        self.added = 0

    def add(self, images, reference) -> None:
        """The rows `strips[i]` of the candidates and of the reference, for the i-th call."""
        if self.added == len(self.strips):
            raise ValueError(f"all {len(self.strips)} strips were added already")
        start, stop = self.strips[self.added]
        expected = (stop - start, *self.shape[1:])
        reference = np.asarray(reference)
        images = [np.asarray(image) for image in images]
        if len(images) != self.n_images or reference.shape != expected:
            raise ValueError(
                f"strip {self.added} is {len(images)} images of rows {start}:{stop}, shape {expected}; "
                f"got a reference of shape {reference.shape}"
            )
        for image in images:
            _check(image, reference)
        truth = _prepare(reference, self.crop_border, self.y_channel, crop_rows=False)
        candidates = [_prepare(image, self.crop_border, self.y_channel, crop_rows=False) for image in images]
        scored = min(self.rows, len(truth))  # the strip's own rows; the rest is the SSIM halo
        for n, candidate in enumerate(candidates):
            self.squared_errors[n] += _squared_errors(candidate[:scored], truth[:scored])
        if self.has_ssim and len(truth) >= SSIM_WINDOW:
            _add_ssim_sums(np.stack(candidates), truth, self.channels, SSIM_C1, SSIM_C2, self.ssim_sums)
        self.added += 1

    def scores(self) -> tuple[list[float], list[float]]:
        """([psnr...], [ssim...]) of the candidates, once every strip was added."""
        if self.added != len(self.strips):
            raise ValueError(f"{self.added} of {len(self.strips)} strips were added")
        psnrs = [_decibels(total, self.n_values) for total in self.squared_errors]
        if not self.has_ssim:
            return psnrs, [float("nan")] * self.n_images
        return psnrs, [float(np.mean(per_channel / self.n_windows)) for per_channel in self.ssim_sums]


def scores(images, reference, crop_border: int = 0, y_channel: bool = False) -> tuple[list[float], list[float]]:
    """PSNR and SSIM of each of `images` against `reference`, in one pass: ([psnr...], [ssim...]).

    The values of `psnr` and `ssim` for each image; the reference is converted and its local
    moments filtered once for all of them (the candidates are stacked for `_add_ssim_sums`).
    """
    reference = np.asarray(reference)
    images = [np.asarray(image) for image in images]
    for image in images:
        _check(image, reference)
    scorer = StripScorer(len(images), reference.shape, crop_border, y_channel)
    ((start, stop),) = scorer.strips
    scorer.add([image[start:stop] for image in images], reference[start:stop])
    return scorer.scores()


def psnr(image, reference, crop_border: int = 0, y_channel: bool = False) -> float:
    """Peak signal-to-noise ratio in dB for 8-bit images; inf when they are identical.

    MSE is taken over all pixels and channels of the cropped images, peak 255.
    `y_channel` scores the BT.601 luma of RGB images (single-channel images are scored as they are).
    """
    image, reference = np.asarray(image), np.asarray(reference)
    _check(image, reference)
    _check_crop(image.shape, crop_border)
    prepared = _prepare(image, crop_border, y_channel)
    return _decibels(_squared_errors(prepared, _prepare(reference, crop_border, y_channel)), prepared.size)


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
