"""Applying a LUT: each pixel-channel's output is the LUT-weighted sum of the K predictions.

out = floor(sum_k w_k[b, c] * x_k + 0.5), clipped to 0..255, with the sum taken in float32 in
model order, as the paper's code does, so that outputs match it to the last bit wherever the
weights do.
"""

from typing import NamedTuple

import numpy as np

#: Names of the combinations in evaluation results, next to the models' own names.
AVERAGE, ZZPM, ENSEMBLE = "average", "zzpm", "ensemble"

from .binning import group_place_tables, place_tables, place_values
from .devices import resolve_device
from .kernels import blend_hashed_into, blend_into, fill_hash_slots


class HashedWeights(NamedTuple):
    """A sparse LUT as blend tasks take it: the stored bins' key words `keys` (m, W)
    (`binning.words_of_digits`), an open-addressing hash table `slots` of their rows (-1: free; a
    power of two at least twice m, so a lookup probes about 1.5 slots), their `weights` (m, C, K)
    float32, and the `fallback` (C, K) of every other cell. Built once per LUT by `of`; pickles
    as a few arrays."""

    keys: np.ndarray
    slots: np.ndarray
    weights: np.ndarray
    fallback: np.ndarray
    bin_width: int

    @classmethod
    def of(cls, keys: np.ndarray, weights: np.ndarray, fallback: np.ndarray, n_models: int, bin_width: int) -> "HashedWeights":
        """Hash the stored bins' unique key words (m, W) of a LUT of `n_models` at `bin_width`."""
        slots = np.full(max(8, 1 << (2 * len(keys) - 1).bit_length()), -1, dtype=np.int64)
        keys = np.ascontiguousarray(keys, dtype=np.int64)
        fill_hash_slots(keys, slots)
        return cls(keys, slots, np.ascontiguousarray(weights, dtype=np.float32), np.ascontiguousarray(fallback, dtype=np.float32),
                   bin_width)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(stored bins, C, K), as a dense table's shape reads."""
        return self.weights.shape


def blend(predictions: np.ndarray, weights, bin_width: int, device: str = "cpu") -> np.ndarray:
    """Ensemble of predictions uint8 (K, P, C) with LUT weights, dense (bins, C, K) or
    `HashedWeights` (`lut.Lut.lookup_table` gives one or the other): uint8 (P, C).

    numba on the CPU; dense tables in torch on other devices ('auto' resolved where it runs), same
    bytes. Hashed tables are always looked up on the CPU.
    """
    predictions = np.ascontiguousarray(predictions, dtype=np.uint8)
    if isinstance(weights, HashedWeights):
        return _blend_hashed(predictions, weights)
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    n_models, n_pixels, n_channels = predictions.shape
    if weights.shape[1:] != (n_channels, n_models):
        raise ValueError(f"weights of shape {weights.shape} do not fit predictions of shape {predictions.shape}")
    device = resolve_device(device)
    if device != "cpu":
        return blend_torch(predictions, weights, bin_width, device)
    out = np.empty((n_pixels, n_channels), dtype=np.uint8)
    blend_into(predictions, weights, place_tables(n_models, bin_width), out)
    return out


def _blend_hashed(predictions: np.ndarray, table: HashedWeights) -> np.ndarray:
    """`blend` with a sparse LUT's `HashedWeights`, on the CPU."""
    n_models, n_pixels, n_channels = predictions.shape
    if table.weights.shape[1:] != (n_channels, n_models):
        raise ValueError(f"weights of shape {table.weights.shape} do not fit predictions of shape {predictions.shape}")
    places, word_of_model = group_place_tables(n_models, table.bin_width)
    out = np.empty((n_pixels, n_channels), dtype=np.uint8)
    blend_hashed_into(predictions, np.stack(places), word_of_model, table.keys, table.slots, table.weights, table.fallback[None], out)
    return out


def blend_torch(predictions: np.ndarray, weights: np.ndarray, bin_width: int, device: str) -> np.ndarray:
    """`blend` in torch on `device`: the same float32 products and sums in model order."""
    import torch

    n_models, _, n_channels = predictions.shape
    x = torch.as_tensor(predictions).to(device)
    table = torch.as_tensor(weights).to(device)
    places = torch.as_tensor(place_values(n_models, bin_width), device=device)
    bins = sum(places[k][x[k].long()] for k in range(n_models))
    selected = table[bins, torch.arange(n_channels, device=device)]  # (P, C, K)
    acc = torch.zeros(bins.shape, dtype=torch.float32, device=device)
    for k in range(n_models):
        acc = acc + selected[:, :, k] * x[k].float()
    return torch.floor(acc + 0.5).clamp(0, 255).to(torch.uint8).cpu().numpy()


def average(predictions: np.ndarray) -> np.ndarray:
    """Plain average of the K predictions (K, ...) rounded half up to uint8: the baseline."""
    return np.floor(predictions.astype(np.float32).mean(axis=0) + np.float32(0.5)).astype(np.uint8)


def squared_distance_sums(predictions: np.ndarray) -> np.ndarray:
    """sum over pixels and channels of (x_k - per-pixel mean)^2, per model (K,): additive over
    pieces of an image, so ZZPM's image-wide weights can be gathered chunk by chunk."""
    x = predictions.astype(np.float64)
    return ((x - x.mean(axis=0)) ** 2).reshape(len(x), -1).sum(axis=1)


def zzpm_weights(mean_squared_distance: np.ndarray) -> np.ndarray:
    """ZZPM's image-wide weights softmax_k(1 / (1e-3 + MSE_k)) (the paper's other baseline)."""
    logits = 1.0 / (1e-3 + np.asarray(mean_squared_distance, dtype=np.float64))
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return weights / weights.sum(axis=-1, keepdims=True)


def blend_spans(predictions: np.ndarray, weights: np.ndarray, spans) -> np.ndarray:
    """Weighted sum with one weight vector per span of pixels: weights (n, K), spans [(start, stop, ...)]."""
    out = np.empty(predictions.shape[1:], dtype=np.uint8)
    for (start, stop, *_), w in zip(spans, weights):
        part = np.tensordot(w, predictions[:, start:stop].astype(np.float64), axes=1)
        out[start:stop] = np.floor(part + 0.5).clip(0, 255)
    return out


def zzpm(predictions: np.ndarray) -> np.ndarray:
    """ZZPM on one whole image (K, ...), rounded half up to uint8."""
    size = predictions[0].size
    weights = zzpm_weights(squared_distance_sums(predictions) / size)
    return blend_spans(predictions, weights[None], [(0, predictions.shape[1])])
