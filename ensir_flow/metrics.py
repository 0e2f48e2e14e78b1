"""Image-quality metrics as the restoration literature computes them (BasicSR conventions).

PSNR and SSIM on the 0..255 scale in float64, with `crop_border` pixels removed from each side
and, optionally, on the luma Y of ITU-R BT.601 as MATLAB's rgb2ycbcr defines it (the convention
for super-resolution and deraining benchmarks). Papers' tables are computed this way, so scores
from here compare with published figures.

Inputs are 8-bit images, (H, W), (H, W, 1) or (H, W, 3) RGB; anything else is refused rather than
scored on a wrong scale. SSIM is NaN for images smaller than its 11x11 window (after cropping), as
in BasicSR; PSNR is defined for every size.
"""

import numpy as np
from skimage.metrics import structural_similarity

#: Side of SSIM's Gaussian window (sigma 1.5, truncated at 3.5 sigma): 2 * 5 + 1 pixels.
SSIM_WINDOW = 11


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


def _prepare(image, reference, crop_border: int, y_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """Both images as float64 (H, W, C) after cropping and the optional luma conversion."""
    image, reference = np.asarray(image), np.asarray(reference)
    _check(image, reference, crop_border)
    out = []
    for array in (image, reference):
        array = array[:, :, None] if array.ndim == 2 else array
        if crop_border:
            array = array[crop_border:-crop_border, crop_border:-crop_border]
        array = rgb_to_y(array)[:, :, None] if y_channel and array.shape[2] == 3 else array.astype(np.float64)
        out.append(array)
    return out[0], out[1]


def psnr(image, reference, crop_border: int = 0, y_channel: bool = False) -> float:
    """Peak signal-to-noise ratio in dB for 8-bit images; inf when they are identical.

    MSE is taken over all pixels and channels of the cropped images, peak 255.
    `y_channel` scores the BT.601 luma of RGB images (single-channel images are scored as they are).
    """
    a, b = _prepare(image, reference, crop_border, y_channel)
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else float(10.0 * np.log10(255.0 ** 2 / mse))


def ssim(image, reference, crop_border: int = 0, y_channel: bool = False) -> float:
    """Mean SSIM: 11x11 Gaussian window (sigma 1.5), 'valid' region, mean over channels.

    scikit-image with these settings is BasicSR's `_ssim` (cv2.filter2D, then the 5-pixel frame
    dropped): its Gaussian filter truncated at 3.5 sigma is the same 11-tap kernel, and it discards
    the same frame, so the reflect padding it uses never enters the mean.

    An image with a (cropped) side under 11 pixels has no valid region: its SSIM is NaN, which is
    what BasicSR returns for it (the mean of the empty map left by dropping the frame), where
    scikit-image would raise. Means over images should skip NaN and say how many images lack SSIM.
    """
    a, b = _prepare(image, reference, crop_border, y_channel)
    if min(a.shape[:2]) < SSIM_WINDOW:
        return float("nan")
    return float(np.mean([
        structural_similarity(a[:, :, c], b[:, :, c], gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False, data_range=255.0)
        for c in range(a.shape[2])
    ]))
