"""The report's PNG figures: the per-image gain chart, the LUT's weight maps and the crops of an image.

Figures are drawn with matplotlib's object-oriented API on the Agg canvas, so no display and no
pyplot state are involved; crops are written as lossless PNGs of the pixels themselves.
"""

from dataclasses import dataclass
from pathlib import Path

import imageio.v3 as iio
import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from ensir_flow.binning import ranges_per_model
from ensir_flow.lut import Lut

from .summary import Methods, per_image_gains

CROP_SIZE = 128
FIGURE_DPI = 110
MOST_LABELLED_IMAGES = 40  # beyond this many images the gain chart drops the image names


@dataclass(frozen=True)
class Panel:
    """One picture of the best/worst-image comparison: a crop saved as `file`, with its caption."""

    file: str
    title: str
    detail: str


def _new_figure(width: float, height: float) -> Figure:
    """A matplotlib figure on the Agg canvas (no display, no pyplot)."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _method_colours(methods: Methods) -> dict[str, tuple]:
    """One colour per combination method, the same in every figure."""
    palette = matplotlib.colormaps["tab10"]
    return {method: palette(i % palette.N) for i, method in enumerate(methods.combinations)}


def gain_chart(summary: dict, methods: Methods, path: Path) -> None:
    """Save to `path` a bar chart of every combination's per-image PSNR gain over the best single model."""
    stems = [entry["image"] for entry in summary["per_image"]]
    order = np.argsort(per_image_gains(summary, methods.ranked_by, methods.best_model), kind="stable")
    figure = _new_figure(11, 4.2)
    axes = figure.add_subplot()
    colours = _method_colours(methods)
    bar_width = 0.8 / len(methods.combinations)
    positions = np.arange(len(stems))
    for i, method in enumerate(methods.combinations):
        gains = per_image_gains(summary, method, methods.best_model)[order]
        axes.bar(
            positions + (i - (len(methods.combinations) - 1) / 2) * bar_width,
            gains,
            bar_width,
            label=_plain(method),
            color=colours[method],
        )
    axes.axhline(0, color="#1d2330", linewidth=0.8)
    axes.set_ylabel(_plain(f"PSNR gain over {methods.best_model} (dB)"))
    axes.set_title(
        _plain(f"Per-image PSNR gain over the best single model, images sorted by the gain of {methods.ranked_by}"), fontsize=11
    )
    if len(stems) <= MOST_LABELLED_IMAGES:
        axes.set_xticks(
            positions,
            [_plain(stems[i]) for i in order],
            rotation=45 if len(stems) > 8 else 0,
            ha="right" if len(stems) > 8 else "center",
            fontsize=9,
        )
    else:
        axes.set_xticks([])
        axes.set_xlabel(_plain(f"{len(stems)} images, from the worst to the best gain of {methods.ranked_by}"))
    axes.grid(axis="y", color="#e3e6eb")
    axes.set_axisbelow(True)
    axes.spines[["top", "right"]].set_visible(False)
    axes.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.savefig(path, dpi=FIGURE_DPI)


def lut_maps(lut: Lut, path: Path) -> None:
    """Save to `path` heat maps of the LUT's weights over the value ranges of the first two models."""
    n_models, n_channels = len(lut.models), lut.n_channels
    weights = lut_weight_maps(lut)
    channel_names = _channel_names(n_channels)
    edge = ranges_per_model(lut.bin_width) * lut.bin_width
    figure = _new_figure(2.9 * n_models + 0.8, 2.7 * n_channels + 0.3)
    grid = figure.subplots(n_channels, n_models, squeeze=False, sharex=True, sharey=True)
    colour_map = matplotlib.colormaps["viridis"].with_extremes(bad="#ffffff")
    for channel in range(n_channels):
        for model in range(n_models):
            axes = grid[channel, model]
            image = axes.imshow(
                weights[:, :, channel, model],
                origin="lower",
                extent=(0, edge, 0, edge),
                cmap=colour_map,
                vmin=0,
                vmax=1,
                interpolation="nearest",
            )
            axes.set_xlim(0, 256)
            axes.set_ylim(0, 256)
            axes.set_title(_plain(f"weight of {lut.models[model]} · {channel_names[channel]}"), fontsize=10)
            if channel == n_channels - 1:
                axes.set_xlabel(_plain(f"{lut.models[1]} value"))
            if model == 0:
                axes.set_ylabel(_plain(f"{lut.models[0]} value"))
    figure.colorbar(image, ax=grid, shrink=0.8, label="weight")
    figure.savefig(path, dpi=FIGURE_DPI)


def lut_weight_maps(lut: Lut) -> np.ndarray:
    """Weights (nb, nb, channel, model) over the bins of the first two models, count-weighted over the others' bins.

    NaN where no reference pixel fell in any of the averaged bins. A LUT without counts (imported)
    is averaged uniformly over every bin, the ones not stored taking the fallback weights. Only the
    stored bins are read, so a many-model LUT is drawn without building its dense table.
    """
    nb, n_models, n_channels = ranges_per_model(lut.bin_width), len(lut.models), lut.n_channels
    first, second = lut.bin_digits[:, 0], lut.bin_digits[:, 1]
    weighted = np.zeros((nb, nb, n_channels, n_models))
    total = np.zeros((nb, nb, n_channels))
    if lut.bin_count.any():
        count = lut.bin_count.astype(np.float64)
    else:
        count = np.ones(lut.bin_count.shape)
        bins_per_pair = nb ** (n_models - 2)
        stored = np.zeros((nb, nb))
        np.add.at(stored, (first, second), 1.0)
        unstored = (bins_per_pair - stored)[..., None]
        weighted += unstored[..., None] * lut.fallback.astype(np.float64)
        total += unstored
    np.add.at(weighted, (first, second), count[..., None] * lut.bin_weights)
    np.add.at(total, (first, second), count)
    total = total[..., None]
    return np.divide(weighted, total, out=np.full(weighted.shape, np.nan), where=total > 0)


def _channel_names(n_channels: int) -> list[str]:
    """Readable names of the store's channels."""
    if n_channels == 3:
        return ["red", "green", "blue"]
    if n_channels == 1:
        return ["gray"]
    return [f"channel {c}" for c in range(n_channels)]


def save_crops(
    folder: Path,
    label: str,
    pictures: list[tuple[np.ndarray, str, str]],
    truth: np.ndarray,
    combined: tuple[str, np.ndarray],
    reference: tuple[str, np.ndarray],
) -> list[Panel]:
    """Save the same window of every picture (image, title, detail) of one image, and where it differs.

    The window is where the `combined` image (name, pixels) improves most on the `reference` image
    (name, pixels) when `label` is 'best', where it falls behind most when 'worst'. The files are
    `label`-NN.png in the order of `pictures`, then `label`-difference.png: blue where `combined` is
    closer to `truth`, red where it is farther.
    """
    (combined_name, combined_image), (reference_name, reference_image) = combined, reference
    improvement = _error(reference_image, truth) - _error(combined_image, truth)
    top, left = _crop_corner(improvement if label == "best" else -improvement)
    height, width = truth.shape[:2]
    window = (slice(top, top + min(CROP_SIZE, height)), slice(left, left + min(CROP_SIZE, width)))
    panels = [
        _save_crop(folder, f"{label}-{i:02d}.png", image[window], title, detail)
        for i, (image, title, detail) in enumerate(pictures)
    ]
    panels.append(
        _save_crop(
            folder,
            f"{label}-difference.png",
            _difference_picture(improvement[window]),
            "where it differs",
            f"blue: {combined_name} closer to the truth than {reference_name}; red: farther",
        )
    )
    return panels


def _error(image: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Absolute error per pixel, averaged over channels."""
    return np.abs(image.astype(np.float32) - truth.astype(np.float32)).mean(axis=2)


def _crop_corner(score: np.ndarray) -> tuple[int, int]:
    """Top-left corner of the crop window whose `score` sum is largest; the centred window when all are equal."""
    height, width = score.shape
    rows, cols = min(CROP_SIZE, height), min(CROP_SIZE, width)
    integral = np.pad(score.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = integral[rows:, cols:] - integral[:-rows, cols:] - integral[rows:, :-cols] + integral[:-rows, :-cols]
    if np.ptp(sums) == 0:
        return (height - rows) // 2, (width - cols) // 2
    top, left = np.unravel_index(np.argmax(sums), sums.shape)
    return int(top), int(left)


def _difference_picture(improvement: np.ndarray) -> np.ndarray:
    """RGB picture of an error difference: blue where positive, red where negative, white at zero."""
    limit = max(float(np.abs(improvement).max()), 1.0)
    colours = matplotlib.colormaps["RdBu"](TwoSlopeNorm(0, -limit, limit)(improvement))
    return (colours[..., :3] * 255).round().astype(np.uint8)


def _save_crop(folder: Path, file: str, image: np.ndarray, title: str, detail: str) -> Panel:
    """Write `image` (height, width[, channels]) as a lossless PNG and describe it as a panel."""
    iio.imwrite(folder / file, image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    return Panel(file, title, detail)


def _plain(text: str) -> str:
    """`text` for a matplotlib label, shown as written: dollar signs escaped so that no mathtext is parsed."""
    return str(text).replace("$", r"\$")
