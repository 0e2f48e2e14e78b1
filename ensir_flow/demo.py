"""The embedded demo corpus: scikit-image's bundled photos, blurred, and restored three ways.

No download: only photos that ship inside scikit-image are used. Each is cropped to a different
size (so the corpus is ragged, as real test sets are), blurred with a Gaussian point-spread
function plus sensor noise (the `lq` inputs), and restored by three classical restorers that fail
in different ways (the "base models"): Wiener deconvolution (ringing, amplified noise),
Richardson-Lucy (slow convergence, halos) and total-variation denoising followed by unsharp
masking (flat, cartoon-like regions; no real deconvolution).
"""

from pathlib import Path

import imageio.v3 as iio
import numpy as np
from scipy.signal import fftconvolve
from skimage import data, filters, restoration

# (scikit-image loader, crop as (top, left, height, width)): different sizes, all colour.
PHOTOS = {
    "astronaut": (data.astronaut, (40, 120, 320, 300)),
    "chelsea": (data.chelsea, (0, 60, 300, 360)),
    "coffee": (data.coffee, (40, 100, 280, 380)),
    "rocket": (data.rocket, (60, 200, 360, 260)),
    "motorcycle": (data.stereo_motorcycle, (200, 300, 300, 340)),
    "hubble": (data.hubble_deep_field, (200, 200, 256, 400)),
}
DEMO_MODELS = ("richardson_lucy", "tv_unsharp", "wiener")
BLUR_SIGMA = 1.6
NOISE_SIGMA = 3.0
PAD = 12
PNG_COMPRESSION = 1  # zlib level: 4x faster than the default 6 for ~10% larger files; pixels are the same


def _gaussian_psf(sigma: float) -> np.ndarray:
    """Normalised 2-D Gaussian point-spread function, 3 sigma each side: the blur, known to the deconvolvers."""
    radius = int(np.ceil(3 * sigma))
    grid = np.arange(-radius, radius + 1)
    kernel = np.exp(-(grid[:, None] ** 2 + grid[None, :] ** 2) / (2 * sigma ** 2))
    return kernel / kernel.sum()


def _per_channel(function, image: np.ndarray) -> np.ndarray:
    """Apply a 2-D `function` to each channel of an (H, W, C) image (the deconvolvers are 2-D only)."""
    return np.stack([function(image[:, :, c]) for c in range(image.shape[2])], axis=2)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """Float image on 0..1 to uint8, rounding half up and clipping."""
    return np.clip(np.floor(image * 255.0 + 0.5), 0, 255).astype(np.uint8)


def _photo(name: str) -> np.ndarray:
    loader, (top, left, height, width) = PHOTOS[name]
    image = loader()
    image = image[0] if isinstance(image, tuple) else image  # the stereo pair comes as (left, right, disparity)
    return np.ascontiguousarray(image[top: top + height, left: left + width, :3])


def _padded(function, image: np.ndarray, pad: int = PAD) -> np.ndarray:
    """Apply `function` to a reflect-padded image and crop back: no dark frame from zero padding."""
    return function(np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect"))[pad:-pad, pad:-pad]


def restorations(lq: np.ndarray, psf: np.ndarray) -> dict[str, np.ndarray]:
    """The three base models' outputs (uint8) for one degraded image."""
    x = lq.astype(np.float64) / 255.0
    deconvolve = {
        "richardson_lucy": lambda c: restoration.richardson_lucy(c, psf, num_iter=10, clip=True),
        "wiener": lambda c: restoration.wiener(c, psf, balance=0.03, clip=True),
    }
    outputs = {name: _padded(lambda y: _per_channel(f, y), x) for name, f in deconvolve.items()}
    outputs["tv_unsharp"] = filters.unsharp_mask(restoration.denoise_tv_chambolle(x, weight=0.02, channel_axis=2),
                                                 radius=2.0, amount=1.5, channel_axis=2)
    return {name: _to_uint8(outputs[name]) for name in DEMO_MODELS}


def build_demo_corpus(directory, seed: int = 0) -> list[str]:
    """Write gt/, lq/ and one folder per base model into `directory`; returns the model names.

    Every folder holds one PNG per photo, named by its stem (`astronaut.png`, ...), uint8 RGB.
    Deterministic for a given seed (the seed draws the noise). `directory` may exist if empty;
    one that already holds anything is refused, so nobody's files are overwritten.
    """
    root = Path(directory)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root}: not empty; the demo corpus is only written into a new folder")
    rng = np.random.default_rng(seed)
    psf = _gaussian_psf(BLUR_SIGMA)
    for folder in ("gt", "lq", *DEMO_MODELS):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        truth = _photo(name)
        blurred = _padded(lambda y: _per_channel(lambda c: fftconvolve(c, psf, mode="same"), y), truth.astype(np.float64))
        lq = np.clip(np.floor(blurred + rng.normal(0, NOISE_SIGMA, blurred.shape) + 0.5), 0, 255).astype(np.uint8)
        iio.imwrite(root / "gt" / f"{name}.png", truth, compress_level=PNG_COMPRESSION)
        iio.imwrite(root / "lq" / f"{name}.png", lq, compress_level=PNG_COMPRESSION)
        for model, output in restorations(lq, psf).items():
            iio.imwrite(root / model / f"{name}.png", output, compress_level=PNG_COMPRESSION)
    return list(DEMO_MODELS)
