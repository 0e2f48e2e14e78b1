"""Range-wise binning of K predictions, as EnsIR defines it.

A pixel-channel whose K predictions are x_1..x_K (0..255) falls into the bin tuple
(floor(x_1/w), ..., floor(x_K/w)); its flat index puts the first model in the most significant
place: b = sum_k floor(x_k/w) * nb^(K-1-k), with nb = ceil(256/w) ranges per model. Cells are
(bin, channel) pairs, flattened as cell = b * C + c so that a (bin, channel) table is row-major.

Keys as int64 words. nb^K does not fit 64 bits for many models (16^16 = 2^64 at w = 16, 32^16 =
2^80 at w = 8), and statistics multiply the bin by C and then by 256 levels. So the models are
split into consecutive groups (`model_groups`), each small enough that its own flat bin, times
C * 256, fits an int64 word; a bin's key is one word per group, compared lexicographically, which
orders bins as their flat index does. One group holds every model whenever nb^K * 2^10 <= 2^63
(K = 3 at any width, K = 8 at w = 32, K = 12 at w = 16): then the key is the flat index itself,
the one-word fast path, exactly as before groups existed.
"""

import math

import numpy as np

LEVELS = 256
#: Bits a key word keeps free above a group's flat bin: the channel (C <= 4, 2 bits) and the ground
#: truth's level (8 bits) are packed below it by the statistics.
RESERVED_BITS = 10
#: Largest value (exclusive) of a non-negative int64.
WORD_LIMIT = 1 << 63
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


def model_groups(n_models: int, bin_width: int) -> tuple[tuple[int, int], ...]:
    """Consecutive (start, stop) groups of models whose flat bin, shifted by `RESERVED_BITS`, fits an
    int64 word: the fewest groups, sizes as even as possible (larger first). One group, (0, K),
    whenever nb^K << RESERVED_BITS fits."""
    nb = ranges_per_model(bin_width)
    per_word = 1
    while per_word < n_models and nb ** (per_word + 1) << RESERVED_BITS < WORD_LIMIT:
        per_word += 1
    n_words = -(-n_models // per_word)
    sizes = [n_models // n_words + (1 if g < n_models % n_words else 0) for g in range(n_words)]
    starts = np.cumsum([0, *sizes])
    return tuple((int(a), int(b)) for a, b in zip(starts[:-1], starts[1:]))


def key_words(n_models: int, bin_width: int) -> int:
    """Number of int64 words of a bin's key (1: the flat index, the fast path)."""
    return len(model_groups(n_models, bin_width))


def group_places(n_models: int, bin_width: int) -> tuple[np.ndarray, np.ndarray]:
    """Each model's place value nb^(stop - 1 - k) within its group's key word (K,) int64, and that
    word (K,): word g of a bin = sum over the models k of group g of floor(x_k / w) * place k."""
    nb = ranges_per_model(bin_width)
    places, word_of_model = [], []
    for word, (start, stop) in enumerate(model_groups(n_models, bin_width)):
        places.extend(nb ** (stop - 1 - k) for k in range(start, stop))
        word_of_model.extend([word] * (stop - start))
    return np.array(places, dtype=np.int64), np.array(word_of_model, dtype=np.int64)


def words_of_digits(digits: np.ndarray, bin_width: int) -> np.ndarray:
    """Key words (m, W) int64 of bins given by their digits floor(x_k / w) (m, K)."""
    nb = ranges_per_model(bin_width)
    groups = model_groups(digits.shape[1], bin_width)
    words = np.zeros((len(digits), len(groups)), dtype=np.int64)
    for word, (start, stop) in enumerate(groups):
        for k in range(start, stop):
            words[:, word] = words[:, word] * nb + digits[:, k]
    return words


def digits_of_words(words: np.ndarray, n_models: int, bin_width: int) -> np.ndarray:
    """Digits (m, K) uint8 of bins given by their key words (m, W): the inverse of `words_of_digits`."""
    nb = ranges_per_model(bin_width)
    digits = np.empty((len(words), n_models), dtype=np.uint8)
    for word, (start, stop) in enumerate(model_groups(n_models, bin_width)):
        rest = words[:, word].copy()
        for k in reversed(range(start, stop)):
            rest, digits[:, k] = np.divmod(rest, nb)
    return digits


def flat_index_fits(n_models: int, bin_width: int) -> bool:
    """Whether the flat bin index nb^K - 1 fits an int64 (K = 16 at w = 16 does not)."""
    return bin_count(n_models, bin_width) <= WORD_LIMIT


def flat_bins_of_digits(digits: np.ndarray, bin_width: int) -> np.ndarray:
    """Flat bin index (m,) int64 of bins given by their digits (m, K); needs `flat_index_fits`."""
    if not flat_index_fits(digits.shape[1], bin_width):
        raise ValueError(f"the flat bin index of {digits.shape[1]} models at bin width {bin_width} does not fit 64 bits")
    return flat_bins_of_edges(digits.astype(np.int64) * bin_width, bin_width)


def all_digits(n_models: int, bin_width: int) -> np.ndarray:
    """Digits (nb^K, K) uint8 of every bin in flat order (for tables small enough to hold whole)."""
    nb = ranges_per_model(bin_width)
    return np.indices((nb,) * n_models, dtype=np.uint8).reshape(n_models, -1).T.copy()
