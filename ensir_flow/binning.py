"""Range-wise binning of K predictions, as EnsIR defines it.

A pixel-channel whose K predictions are x_1..x_K (0..255) falls into the bin tuple
(floor(x_1/w), ..., floor(x_K/w)); its flat index puts the first model in the most significant
place: b = sum_k floor(x_k/w) * nb^(K-1-k), with nb = ceil(256/w) ranges per model. Cells are
(bin, channel) pairs, flattened as cell = b * C + c so that a (bin, channel) table is row-major.
"""

import math

import numpy as np

LEVELS = 256
#: The paper's bin width, and every command's default.
DEFAULT_BIN_WIDTH = 32


def ranges_per_model(bin_width: int) -> int:
    """Number of ranges nb = ceil(256 / w) each model's values are split into."""
    if not 1 <= bin_width <= LEVELS:
        raise ValueError(f"bin width must be between 1 and {LEVELS}, got {bin_width}")
    return math.ceil(LEVELS / bin_width)


def bin_count(n_models: int, bin_width: int) -> int:
    """Number of flat bins nb^K of a LUT for K models."""
    return ranges_per_model(bin_width) ** n_models


def place_values(n_models: int, bin_width: int) -> np.ndarray:
    """Table (K, 256): model k's contribution floor(x / w) * nb^(K-1-k) to the flat bin of value x.

    Kernels add K table entries instead of dividing, which is several times faster.
    """
    nb = ranges_per_model(bin_width)
    digits = np.arange(LEVELS, dtype=np.int64) // bin_width
    return np.stack([digits * nb ** (n_models - 1 - k) for k in range(n_models)])


def flat_bins_of_edges(edges: np.ndarray, bin_width: int) -> np.ndarray:
    """Flat bin index of each row of lower edges (n, K); the inverse of `bin_lower_edges`."""
    nb = ranges_per_model(bin_width)
    flat = np.zeros(len(edges), dtype=np.int64)
    for k in range(edges.shape[1]):
        flat = flat * nb + np.asarray(edges[:, k], dtype=np.int64) // bin_width
    return flat


def place_tables(n_models: int, bin_width: int) -> tuple[np.ndarray, ...]:
    """`place_values` as a tuple of K tables, the form the kernels of `ensir_flow.kernels` take
    (the tuple's length tells numba K when it compiles them)."""
    return tuple(place_values(n_models, bin_width))
