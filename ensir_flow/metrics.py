"""Image-quality metrics as the restoration literature computes them (BasicSR conventions).

PSNR and SSIM on the 0..255 scale in float64, with `crop_border` pixels removed from each side
and, optionally, on the luma Y of ITU-R BT.601 as MATLAB's rgb2ycbcr defines it (the convention
for super-resolution and deraining benchmarks).
"""

import numpy as np
from skimage.metrics import structural_similarity


def rgb_to_y(image: np.ndarray) -> np.ndarray:
    """BT.601 luma on 0..255 as MATLAB's rgb2ycbcr: 16 + (65.481 R + 128.553 G + 24.966 B) / 255."""
    rgb = np.asarray(image, dtype=np.float64)
    return 16.0 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255.0


def _prepare(image, reference, crop_border: int, y_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """Both images as float64 (H, W, C) after cropping and the optional luma conversion."""
    image, reference = np.asarray(image), np.asarray(reference)
    if image.shape != reference.shape:
        raise ValueError(f"image shape {image.shape} differs from reference shape {reference.shape}")
    out = []
    for array in (image, reference):
        array = array[:, :, None] if array.ndim == 2 else array
        if y_channel and array.shape[2] == 3:
            array = rgb_to_y(array)[:, :, None]
        array = array.astype(np.float64)
        if crop_border:
            array = array[crop_border:-crop_border, crop_border:-crop_border]
        out.append(array)
    return out[0], out[1]


def psnr(image, reference, crop_border: int = 0, y_channel: bool = False) -> float:
    """Peak signal-to-noise ratio in dB for 8-bit images; inf when they are identical."""
    a, b = _prepare(image, reference, crop_border, y_channel)
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else float(10.0 * np.log10(255.0 ** 2 / mse))


def ssim(image, reference, crop_border: int = 0, y_channel: bool = False) -> float:
    """Mean SSIM: 11x11 Gaussian window (sigma 1.5), 'valid' region, mean over channels."""
    a, b = _prepare(image, reference, crop_border, y_channel)
    return float(np.mean([
        structural_similarity(a[:, :, c], b[:, :, c], gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False, data_range=255.0)
        for c in range(a.shape[2])
    ]))
