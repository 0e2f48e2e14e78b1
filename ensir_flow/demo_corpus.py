"""The embedded demo corpus: scikit-image's bundled photos, blurred, and three restorers for it.

No download: only photos that ship inside scikit-image are used. Each is cropped to a different
size (so the corpus is ragged, as real test sets are) and blurred with a Gaussian point-spread
function plus sensor noise (the `lq` inputs). The "base models" are three classical restorers
that fail in different ways, written as small torch modules and saved as `torch.export` programs
(`.pt2`, any image size), so that the demo runs them through `predict` as a user runs their own
models: Wiener deconvolution (ringing, amplified noise), Richardson-Lucy (slow convergence, halos)
and total-variation denoising followed by unsharp masking (flat, cartoon-like regions; no real
deconvolution).
"""

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
from scipy.signal import fftconvolve
from skimage import data

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
MIN_SIDE = 16  # the smallest image side the exported restorers take: reflect padding needs more than PAD
PNG_COMPRESSION = 1  # zlib level: 4x faster than the default 6 for ~10% larger files; pixels are the same


def _gaussian_psf(sigma: float) -> np.ndarray:
    """Normalised 2-D Gaussian point-spread function, 3 sigma each side: the blur, known to the deconvolvers."""
    radius = int(np.ceil(3 * sigma))
    grid = np.arange(-radius, radius + 1)
    kernel = np.exp(-(grid[:, None] ** 2 + grid[None, :] ** 2) / (2 * sigma**2))
    return kernel / kernel.sum()


def _photo(name: str) -> np.ndarray:
    loader, (top, left, height, width) = PHOTOS[name]
    image = loader()
    image = image[0] if isinstance(image, tuple) else image  # the stereo pair comes as (left, right, disparity)
    return np.ascontiguousarray(image[top : top + height, left : left + width, :3])


def _planes(x: torch.Tensor, pad: int) -> torch.Tensor:
    """(N, C, H, W) as (N*C, 1, H + 2 pad, W + 2 pad), reflect-padded: the restorers work per
    channel, and the padding keeps a dark frame (zero padding) out of the deconvolutions. The
    padded size follows the image's, so that one exported program runs on images of any size."""
    n, c, h, w = x.shape
    return torch.nn.functional.pad(x.reshape(n * c, 1, h, w), [pad] * 4, mode="reflect")


def _unplanes(y: torch.Tensor, like: torch.Tensor, pad: int) -> torch.Tensor:
    """The inverse of `_planes`: crop the padding and restore (N, C, H, W)."""
    n, c, h, w = like.shape
    return y[:, :, pad : pad + h, pad : pad + w].reshape(n, c, h, w)


def _transfer(kernel: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Real-FFT transfer function of a centred 2-D kernel for (height, width) images (circular)."""
    k = kernel.shape[-1]
    padded = torch.zeros((height, width), dtype=kernel.dtype, device=kernel.device)
    padded[:k, :k] = kernel
    return torch.fft.rfft2(torch.roll(padded, shifts=(-(k // 2), -(k // 2)), dims=(0, 1)))


class Wiener(torch.nn.Module):
    """Wiener deconvolution of the known blur with a Laplacian regulariser (as scikit-image's
    `restoration.wiener`): sharp, with ringing and amplified noise."""

    def __init__(self, psf: np.ndarray, balance: float = 0.03, pad: int = PAD):
        super().__init__()
        self.register_buffer("psf", torch.tensor(psf, dtype=torch.float32))
        self.register_buffer("laplacian", torch.tensor([[0.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 0.0]]))
        self.balance, self.pad = balance, pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _planes(x, self.pad)
        height, width = y.shape[-2], y.shape[-1]
        blur, regulariser = _transfer(self.psf, height, width), _transfer(self.laplacian, height, width)
        inverse = torch.conj(blur) / (blur.abs() ** 2 + self.balance * regulariser.abs() ** 2)
        restored = torch.fft.irfft2(torch.fft.rfft2(y) * inverse, s=(height, width))
        return _unplanes(restored, x, self.pad).clamp(0.0, 1.0)


def _convolve(planes: torch.Tensor, transfer: torch.Tensor) -> torch.Tensor:
    """Circular convolution of (..., H, W) planes with the kernel whose `_transfer` is given (by FFT:
    far faster on a CPU than a single-channel conv2d with a large kernel)."""
    return torch.fft.irfft2(torch.fft.rfft2(planes) * transfer, s=(planes.shape[-2], planes.shape[-1]))


class RichardsonLucy(torch.nn.Module):
    """Richardson-Lucy deconvolution, a few iterations: converges slowly, leaves halos."""

    def __init__(self, psf: np.ndarray, iterations: int = 10, pad: int = PAD):
        super().__init__()
        self.register_buffer("psf", torch.tensor(psf, dtype=torch.float32))
        self.iterations, self.pad = iterations, pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _planes(x, self.pad)
        blur = _transfer(self.psf, y.shape[-2], y.shape[-1])
        estimate = torch.full_like(y, 0.5)
        for _ in range(self.iterations):  # the PSF is symmetric: its mirror image is itself
            estimate = estimate * _convolve(y / (_convolve(estimate, blur) + 1e-12), torch.conj(blur))
        return _unplanes(estimate, x, self.pad).clamp(0.0, 1.0)


class TvUnsharp(torch.nn.Module):
    """Total-variation denoising (Chambolle's projection algorithm, fixed iterations) followed by an
    unsharp mask: flat, cartoon-like regions, no real deconvolution."""

    def __init__(self, weight: float = 0.02, iterations: int = 50, sigma: float = 2.0, amount: float = 1.5):
        super().__init__()
        radius = int(4 * sigma + 0.5)
        grid = torch.arange(-radius, radius + 1, dtype=torch.float32)
        plane = torch.exp(-(grid[:, None] ** 2 + grid[None, :] ** 2) / (2 * sigma**2))
        self.register_buffer("gaussian", plane / plane.sum())
        self.weight, self.iterations, self.amount, self.radius = weight, iterations, amount, radius

    def denoise(self, image: torch.Tensor) -> torch.Tensor:
        """Chambolle's dual projection on (N, 1, H, W) planes. The iterations run in a
        `torch.while_loop`, which an exported program holds once: unrolled, they would be a graph
        of some 1,500 nodes that takes seconds to load in every worker."""
        tau = 0.25

        def step(i: torch.Tensor, p_rows: torch.Tensor, p_cols: torch.Tensor, out: torch.Tensor):
            divergence = -(p_rows + p_cols)
            divergence[:, :, 1:, :] += p_rows[:, :, :-1, :]
            divergence[:, :, :, 1:] += p_cols[:, :, :, :-1]
            out = image + divergence
            g_rows, g_cols = torch.zeros_like(out), torch.zeros_like(out)
            g_rows[:, :, :-1, :] = out[:, :, 1:, :] - out[:, :, :-1, :]
            g_cols[:, :, :, :-1] = out[:, :, :, 1:] - out[:, :, :, :-1]
            norm = 1.0 + tau / self.weight * torch.sqrt(g_rows**2 + g_cols**2)
            return i + 1, (p_rows - tau * g_rows) / norm, (p_cols - tau * g_cols) / norm, out

        start = (torch.zeros((), dtype=torch.int64), torch.zeros_like(image), torch.zeros_like(image), image.clone())
        return torch.while_loop(lambda i, *_: i < self.iterations, step, start)[3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        smooth = self.denoise(x.reshape(n * c, 1, h, w))
        padded = torch.nn.functional.pad(smooth, [self.radius] * 4, mode="replicate")
        blurred = _convolve(padded, _transfer(self.gaussian, padded.shape[-2], padded.shape[-1]))
        blurred = blurred[:, :, self.radius : self.radius + h, self.radius : self.radius + w]
        sharpened = smooth + self.amount * (smooth - blurred)
        return sharpened.reshape(n, c, h, w).clamp(0.0, 1.0)


def demo_restorers() -> dict[str, torch.nn.Module]:
    """The three base models, in `DEMO_MODELS` order, for the demo's blur."""
    psf = _gaussian_psf(BLUR_SIGMA)
    return {"richardson_lucy": RichardsonLucy(psf), "tv_unsharp": TvUnsharp(), "wiener": Wiener(psf)}


def export_program(module: torch.nn.Module) -> torch.export.ExportedProgram:
    """`module` exported for (N, C, H, W) batches of any count, channels and size (sides from
    `MIN_SIDE`): what `save_demo_models` saves."""
    sizes = {
        0: torch.export.Dim("batch"),
        1: torch.export.Dim("channels"),
        2: torch.export.Dim("height", min=MIN_SIDE),
        3: torch.export.Dim("width", min=MIN_SIDE),
    }
    return torch.export.export(module.eval(), (torch.rand(2, 3, 64, 80),), dynamic_shapes=(sizes,))


def save_demo_models(directory) -> dict[str, Path]:
    """Save the demo's restorers as `torch.export` programs `<directory>/<name>.pt2` (what `predict` runs)."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, module in demo_restorers().items():
        paths[name] = folder / f"{name}.pt2"
        torch.export.save(export_program(module), paths[name])
    return paths


def build_demo_corpus(directory, seed: int = 0) -> list[str]:
    """Write gt/ and lq/ into `directory`; returns the stems.

    Every folder holds one PNG per photo, named by its stem (`astronaut.png`, ...), uint8 RGB.
    Deterministic for a given seed (the seed draws the noise). `directory` may exist if empty;
    one that already holds anything is refused, so nobody's files are overwritten. The base
    models' outputs are not written: `predict` computes them (`save_demo_models`).
    """
    root = Path(directory)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root}: not empty; the demo corpus is only written into a new folder")
    rng = np.random.default_rng(seed)
    psf = _gaussian_psf(BLUR_SIGMA)
    for folder in ("gt", "lq"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        truth = _photo(name)
        padded = np.pad(truth.astype(np.float64), ((PAD, PAD), (PAD, PAD), (0, 0)), mode="reflect")
        blurred = np.stack([fftconvolve(padded[:, :, c], psf, mode="same") for c in range(3)], axis=2)[PAD:-PAD, PAD:-PAD]
        lq = np.clip(np.floor(blurred + rng.normal(0, NOISE_SIGMA, blurred.shape) + 0.5), 0, 255).astype(np.uint8)
        iio.imwrite(root / "gt" / f"{name}.png", truth, compress_level=PNG_COMPRESSION)
        iio.imwrite(root / "lq" / f"{name}.png", lq, compress_level=PNG_COMPRESSION)
    return list(PHOTOS)
