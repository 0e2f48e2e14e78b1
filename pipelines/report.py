"""Report: an HTML page, with PNG figures beside it, that shows how the combinations compare.

`write_report` turns the summary of `evaluate` (`Evaluation.to_json()`) into `DIR/index.html`:
the mean scores with the best value of each column highlighted and the gains over the best single
model and the average; cross-validation folds when the scores are held out; a bar chart of each
combination's per-image PSNR gain; crops of the worst and the best image, every model side by
side with the combination and the ground truth; and, given a LUT, heat maps of its weights.

The page is self-contained: inline CSS, no JavaScript, no network resources, figures referenced
by relative file names. Figures are drawn with matplotlib's object-oriented API on the Agg canvas,
so no display and no pyplot state are involved. The directory is written staged beside DIR and
moved into place when complete; DIR is a local folder (a browser opens it).
"""

import html
import math
import os
from dataclasses import dataclass
from pathlib import Path

import imageio.v3 as iio
import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

import ensir_flow
from ensir_flow import schema
from ensir_flow.binning import ranges_per_model
from ensir_flow.blend import AVERAGE, ENSEMBLE, ZZPM, average
from ensir_flow.lut import Lut

from .storage import exists, open_store, read_lut, staged_output

INPUT = "input"
CROP_SIZE = 128
FIGURE_DPI = 110
GAIN_CHART = "gain.png"
LUT_MAPS = "lut-weights.png"
MOST_LABELLED_IMAGES = 40  # beyond this many images the gain chart drops the image names
MOST_IMAGES_SHOWN_OPEN = 20  # the per-image table starts folded beyond this many images

STYLE = """
body { margin: 0; background: #f4f5f7; color: #1d2330; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 28px 32px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 0 0 12px; }
h3 { font-size: 15px; margin: 18px 0 8px; }
section { background: #fff; border-radius: 10px; padding: 20px 24px; margin: 18px 0; box-shadow: 0 1px 3px rgba(20, 30, 50, .08); }
.context { color: #5b6475; margin: 0; }
.verdict { font-size: 17px; border-left: 5px solid #3b6fd8; }
.verdict .up { color: #157347; font-weight: 600; }
.verdict .down { color: #b02a37; font-weight: 600; }
.note { color: #5b6475; font-size: 13px; margin: 10px 0 0; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 5px 12px; text-align: right; border-bottom: 1px solid #e3e6eb; white-space: nowrap; }
th { background: #eef1f6; font-weight: 600; }
th:first-child, td:first-child { text-align: left; }
td.best { background: #d9f2e1; font-weight: 700; }
td.negative { color: #b02a37; }
td.positive { color: #157347; }
tr.model td:first-child::after { content: "model"; margin-left: 8px; font-size: 11px; color: #5b6475; border: 1px solid #c9ced8; border-radius: 8px; padding: 0 6px; }
tr.combination td:first-child { font-weight: 600; }
.table-scroll { overflow-x: auto; }
img.figure { max-width: 100%; height: auto; display: block; }
.crops { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 12px; }
.crops figure { margin: 0; }
.crops img { width: 100%; height: auto; image-rendering: pixelated; border-radius: 4px; background: #ddd; display: block; }
.crops figcaption { font-size: 13px; color: #1d2330; margin-top: 4px; }
.crops figcaption span { color: #5b6475; display: block; }
details summary { cursor: pointer; font-weight: 600; font-size: 17px; }
details table { margin-top: 12px; }
footer { color: #5b6475; font-size: 12px; margin-top: 24px; }
"""


@dataclass(frozen=True)
class Methods:
    """The methods of a summary, split into base models and combinations of them."""

    models: list[str]
    combinations: list[str]
    best_model: str  # highest mean PSNR among the models
    ranked_by: str  # the combination whose gain orders the images: the ensemble, else the average

    @classmethod
    def of(cls, summary: dict, store_models: list[str]) -> "Methods":
        psnr = summary["psnr"]
        models = [m for m in psnr if m in store_models]
        combinations = [m for m in psnr if m not in store_models]
        ranked_by = ENSEMBLE if ENSEMBLE in psnr else AVERAGE
        return cls(models, combinations, max(models, key=psnr.get), ranked_by)

    @property
    def all(self) -> list[str]:
        return self.models + self.combinations


@dataclass(frozen=True)
class Panel:
    """One picture of the best/worst-image comparison: a crop saved as `file`, with its caption."""

    file: str
    title: str
    detail: str


def write_report(directory, summary: dict, store: str, ensemble_store: str | None = None, lut_path: str | None = None,
                 overwrite: bool = False) -> Path:
    """Write an HTML report of `summary` (from `Evaluation.to_json()`) and its figures to `directory`.

    `store` is the evaluated reference store (its pixels give the crops), `ensemble_store` the
    output of `apply` that was scored (its `ensemble` is shown in the crops) and `lut_path` the LUT
    whose weights are drawn as heat maps (default: the LUT recorded in `ensemble_store`, if it is
    still there). Refuses an existing `directory` unless `overwrite`.
    Returns the path of `index.html`.
    """
    ds = open_store(store)
    methods = Methods.of(summary, schema.check_store(ds, store, require=(schema.PREDICTION, schema.GROUND_TRUTH)))
    ensemble = None
    if ensemble_store is not None:
        ensemble = open_store(ensemble_store)
        schema.check_store(ensemble, ensemble_store, require=(schema.ENSEMBLE,))
    if lut_path is None and ensemble is not None:
        lut_path = ensemble.attrs.get("lut")  # the LUT the scored output was made with
    lut = None if lut_path is None or not exists(lut_path) else read_lut(lut_path)
    with staged_output(str(directory), overwrite) as staging:
        folder = Path(staging)
        folder.mkdir(parents=True)
        sections = [_verdict_section(summary, methods), _means_section(summary, methods)]
        if "cv" in summary:
            sections.append(_cross_validation_section(summary["cv"], methods))
        sections.append(_gain_section(summary, methods, folder))
        sections.append(_crops_section(summary, methods, ds, ensemble, folder))
        if lut is not None and len(lut.models) > 1:  # a one-model LUT weighs everything 1
            sections.append(_lut_section(lut, folder))
        sections.append(_per_image_section(summary, methods, ds))
        sources = {"store": store, "ensemble": ensemble_store, "LUT": lut_path}
        page = _page(f"Ensemble report: {_name_of(store)}", _context(summary, methods, ds, store, lut), sections, sources)
        (folder / "index.html").write_text(page, encoding="utf-8")
    return Path(directory) / "index.html"


# ---------------------------------------------------------------------------------------------
# Page and tables


def _page(title: str, context: str, sections: list[str], sources: dict) -> str:
    """The HTML document: `title`, the `context` line, `sections`, and the `sources` ({role: location or None}) it was made from."""
    made_from = "; ".join(f"{role} {location}" for role, location in sources.items() if location is not None)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_escape(title)}</title><style>{STYLE}</style></head>\n<body><main>\n"
        f"<header><h1>{_escape(title)}</h1><p class=\"context\">{_escape(context)}</p></header>\n"
        + "\n".join(sections)
        + f"\n<footer>Made by ensir-flow {_escape(ensir_flow.__version__)} from {_escape(made_from)}.</footer>"
        "\n</main></body></html>\n"
    )


def _context(summary: dict, methods: Methods, ds, store: str, lut: Lut | None) -> str:
    """One line: how many images, which colour space and border, in-sample or held out."""
    options = summary.get("options", {})
    colour = "Y channel (BT.601 luma)" if options.get("y_channel") else ("grayscale" if ds.sizes["channel"] == 1 else "RGB")
    return (f"{summary['images']} images · PSNR and SSIM on {colour} · crop border {options.get('crop_border', 0)} · "
            f"{_scoring(summary, methods, store, lut)}")


def _scoring(summary: dict, methods: Methods, store: str, lut: Lut | None) -> str:
    """Whether the scores are held out (cross-validation, or a LUT fitted elsewhere) or in-sample."""
    if "cv" in summary:
        return f"held out: {summary['cv']['folds']}-fold cross-validation by image, each fold scored by LUTs fitted on the others"
    if set(methods.combinations) <= {AVERAGE, ZZPM}:
        return "no fitted combination (the average and ZZPM learn nothing from these images)"
    reference = None if lut is None else lut.attrs.get("reference_store")
    if reference is None:
        return "in-sample unless the LUT was fitted on other images"
    if _same_location(reference, store):
        return "in-sample: the LUT was fitted on these images, so its gains are optimistic"
    return f"LUT fitted on another store ({reference}): scores are on images it did not see unless the stores share some"


def _same_location(first: str, second: str) -> bool:
    """Whether two store locations name the same place (local paths resolved, URLs compared as written)."""

    def normal(location):
        location = str(location).rstrip("/")
        return location if "://" in location else os.path.realpath(location)

    return normal(first) == normal(second)


def _verdict_section(summary: dict, methods: Methods) -> str:
    """The headline: how the ranked combination fares against the best model and the average."""
    psnr, best, ranked = summary["psnr"], methods.best_model, methods.ranked_by
    versus = [(best, f"the best single model ({best})")] + ([(AVERAGE, "the average")] if ranked != AVERAGE else [])
    gains = ", ".join(f"{_signed_span(psnr[ranked] - psnr[other])} dB over {_escape(label)}" for other, label in versus)
    per_image = _per_image_gains(summary, ranked, best)
    wins = int(np.sum(per_image > 0))
    strongest = max(methods.combinations, key=psnr.get)
    also = ("" if strongest == ranked else
            f" The strongest combination is <strong>{_escape(strongest)}</strong>: "
            f"{_signed_span(psnr[strongest] - psnr[best])} dB over {_escape(best)}.")
    return (f'<section class="verdict"><strong>{_escape(ranked)}</strong>: {gains}; better than {_escape(best)} on '
            f"{wins} of {len(per_image)} images.{also}</section>")


def _signed_span(value: float) -> str:
    """A signed dB figure, green when positive and red when negative."""
    kind = "up" if value > 0 else "down" if value < 0 else ""
    return f'<span class="{kind}">{_number(value, "+.3f")}</span>'


def _means_section(summary: dict, methods: Methods) -> str:
    """Mean PSNR/SSIM per method with the gains over the best single model and over the average."""
    psnr, ssim, best = summary["psnr"], summary["ssim"], methods.best_model
    columns = [
        ("PSNR (dB)", [psnr[m] for m in methods.all], ".3f"),
        ("SSIM", [ssim[m] for m in methods.all], ".4f"),
        (f"ΔPSNR vs {best}", [psnr[m] - psnr[best] for m in methods.all], "+.3f"),
        ("ΔPSNR vs average", [psnr[m] - psnr[AVERAGE] for m in methods.all], "+.3f"),
        (f"ΔSSIM vs {best}", [ssim[m] - ssim[best] for m in methods.all], "+.4f"),
        ("ΔSSIM vs average", [ssim[m] - ssim[AVERAGE] for m in methods.all], "+.4f"),
    ]
    head = "<tr><th>method</th>" + "".join(f"<th>{_escape(name)}</th>" for name, _, _ in columns) + "</tr>"
    table = _table("means", head, methods, columns)
    return ("<section><h2>Mean scores</h2>" + table +
            f'<p class="note">Best value of each column highlighted. Best single model: {_escape(best)} '
            f"(highest mean PSNR). Every method that is not a model combines the models.</p></section>")


def _cross_validation_section(cv: dict, methods: Methods) -> str:
    """Held-out mean PSNR and SSIM of every fold and over all images."""
    folds = cv["per_fold"]
    columns = []
    for metric, style in (("psnr", ".3f"), ("ssim", ".4f")):
        columns += [(f"fold {fold['fold']}", [fold[metric][m] for m in methods.all], style) for fold in folds]
        columns.append(("mean", [cv[metric][m] for m in methods.all], style))
    span = len(folds) + 1
    head = (f'<tr><th rowspan="2">method</th><th colspan="{span}">held-out PSNR (dB)</th><th colspan="{span}">held-out SSIM</th></tr>'
            "<tr>" + "".join(f"<th>{_escape(name)}</th>" for name, _, _ in columns) + "</tr>")
    return (f"<section><h2>Cross-validation ({cv['folds']} folds, held out)</h2>" + _table("cross-validation", head, methods, columns) +
            '<p class="note">Each fold\'s images are scored by LUTs fitted on the other folds only, so every score on '
            "this page is held out. Best value of each column highlighted.</p></section>")


def _table(table_id: str, head: str, methods: Methods, columns: list[tuple[str, list[float], str]]) -> str:
    """A table with one row per method and the largest value of each column highlighted."""
    best_rows = [_best_indices(values) for _, values, _ in columns]
    rows = []
    for row, method in enumerate(methods.all):
        kind = "model" if method in methods.models else "combination"
        cells = "".join(_cell(values[row], style, row in best) for (_, values, style), best in zip(columns, best_rows))
        rows.append(f'<tr class="{kind}"><td>{_escape(method)}</td>{cells}</tr>')
    return (f'<div class="table-scroll"><table id="{table_id}"><thead>{head}</thead><tbody>' + "".join(rows) +
            "</tbody></table></div>")


def _cell(value: float, style: str, best: bool) -> str:
    """A table cell of `value` formatted with `style`; gains (styles with a sign) coloured by sign."""
    classes = ["best"] if best else []
    if style.startswith("+") and math.isfinite(value) and value != 0:
        classes.append("positive" if value > 0 else "negative")
    attribute = f' class="{" ".join(classes)}"' if classes else ""
    return f"<td{attribute}>{_number(value, style)}</td>"


def _best_indices(values: list[float]) -> set[int]:
    """Indices of the largest value, ties included (infinity counts, NaN does not)."""
    numbers = [v for v in values if not math.isnan(v)]
    if not numbers:
        return set()
    largest = max(numbers)
    return {i for i, v in enumerate(values) if v == largest}


def _number(value: float, style: str) -> str:
    """`value` formatted with `style`, with a true minus sign, '∞' and '–' (NaN)."""
    if math.isnan(value):
        return "–"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    return format(value, style).replace("-", "−")


def _per_image_section(summary: dict, methods: Methods, ds) -> str:
    """Every image's PSNR per method (best of each row highlighted), sorted by the ranked gain."""
    entries = summary["per_image"]
    sizes = _image_sizes(ds)
    gains = _per_image_gains(summary, methods.ranked_by, methods.best_model)
    with_folds = "fold" in entries[0]
    head = ("<tr><th>image</th><th>size</th>" + ("<th>fold</th>" if with_folds else "") +
            "".join(f"<th>{_escape(m)}</th>" for m in methods.all) +
            f"<th>{_escape(methods.ranked_by)} − {_escape(methods.best_model)}</th></tr>")
    rows = []
    for position in np.argsort(-gains, kind="stable"):
        entry = entries[position]
        values = [entry["psnr"][m] for m in methods.all]
        best = _best_indices(values)
        cells = "".join(_cell(v, ".3f", i in best) for i, v in enumerate(values))
        fold = f"<td>{entry['fold']}</td>" if with_folds else ""
        rows.append(f"<tr><td>{_escape(entry['image'])}</td><td>{_escape(sizes.get(entry['image'], ''))}</td>{fold}"
                    f"{cells}{_cell(float(gains[position]), '+.3f', False)}</tr>")
    state = " open" if len(entries) <= MOST_IMAGES_SHOWN_OPEN else ""
    return (f"<section><details{state}><summary>PSNR of every image (dB), {len(entries)} images</summary>"
            f'<div class="table-scroll"><table id="per-image"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table></div>'
            "</details></section>")


def _image_sizes(ds) -> dict[str, str]:
    """'height×width' of each image of the store, by stem."""
    index = schema.ImageIndex.from_dataset(ds)
    return {stem: f"{h}×{w}" for stem, h, w in zip(index.stems, index.heights, index.widths)}


# ---------------------------------------------------------------------------------------------
# Figures


def _new_figure(width: float, height: float) -> Figure:
    """A matplotlib figure on the Agg canvas (no display, no pyplot)."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _per_image_gains(summary: dict, method: str, reference: str) -> np.ndarray:
    """PSNR of `method` minus that of `reference`, image by image (NaN where both are infinite)."""
    with np.errstate(invalid="ignore"):
        return np.array([e["psnr"][method] - e["psnr"][reference] for e in summary["per_image"]], dtype=float)


def _method_colours(methods: Methods) -> dict[str, tuple]:
    """One colour per combination method, the same in every figure."""
    palette = matplotlib.colormaps["tab10"]
    return {method: palette(i % palette.N) for i, method in enumerate(methods.combinations)}


def _gain_section(summary: dict, methods: Methods, folder: Path) -> str:
    """Bar chart of every combination's per-image PSNR gain over the best single model."""
    stems = [entry["image"] for entry in summary["per_image"]]
    order = np.argsort(_per_image_gains(summary, methods.ranked_by, methods.best_model), kind="stable")
    figure = _new_figure(11, 4.2)
    axes = figure.add_subplot()
    colours = _method_colours(methods)
    bar_width = 0.8 / len(methods.combinations)
    positions = np.arange(len(stems))
    for i, method in enumerate(methods.combinations):
        gains = _per_image_gains(summary, method, methods.best_model)[order]
        axes.bar(positions + (i - (len(methods.combinations) - 1) / 2) * bar_width, gains, bar_width,
                 label=_plain(method), color=colours[method])
    axes.axhline(0, color="#1d2330", linewidth=0.8)
    axes.set_ylabel(_plain(f"PSNR gain over {methods.best_model} (dB)"))
    axes.set_title(_plain(f"Per-image PSNR gain over the best single model, images sorted by the gain of {methods.ranked_by}"),
                   fontsize=11)
    if len(stems) <= MOST_LABELLED_IMAGES:
        axes.set_xticks(positions, [_plain(stems[i]) for i in order], rotation=45 if len(stems) > 8 else 0,
                        ha="right" if len(stems) > 8 else "center", fontsize=9)
    else:
        axes.set_xticks([])
        axes.set_xlabel(_plain(f"{len(stems)} images, from the worst to the best gain of {methods.ranked_by}"))
    axes.grid(axis="y", color="#e3e6eb")
    axes.set_axisbelow(True)
    axes.spines[["top", "right"]].set_visible(False)
    axes.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.savefig(folder / GAIN_CHART, dpi=FIGURE_DPI)
    return ("<section><h2>Where the combinations gain</h2>"
            f'<img class="figure" src="{GAIN_CHART}" alt="{_escape(f"Per-image PSNR gain over {methods.best_model}")}">'
            f'<p class="note">Bars above zero: the combination beats {_escape(methods.best_model)}, the best single model, '
            "on that image.</p></section>")


def _lut_section(lut: Lut, folder: Path) -> str:
    """Heat maps of the LUT's weights over the value ranges of the first two models."""
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
            image = axes.imshow(weights[:, :, channel, model], origin="lower", extent=(0, edge, 0, edge), cmap=colour_map,
                                vmin=0, vmax=1, interpolation="nearest")
            axes.set_xlim(0, 256)
            axes.set_ylim(0, 256)
            axes.set_title(_plain(f"weight of {lut.models[model]} · {channel_names[channel]}"), fontsize=10)
            if channel == n_channels - 1:
                axes.set_xlabel(_plain(f"{lut.models[1]} value"))
            if model == 0:
                axes.set_ylabel(_plain(f"{lut.models[0]} value"))
    figure.colorbar(image, ax=grid, shrink=0.8, label="weight")
    figure.savefig(folder / LUT_MAPS, dpi=FIGURE_DPI)
    filled = int((lut.count > 0).sum())
    if n_models == 2:
        averaged = ""
    elif lut.count.any():
        averaged = (f" Each cell averages the weights over the value ranges of {', '.join(lut.models[2:])}, weighted by "
                    "their reference pixel counts.")
    else:
        averaged = (f" This LUT records no reference pixel counts (it was imported), so each cell averages the weights "
                    f"over the value ranges of {', '.join(lut.models[2:])} uniformly.")
    return ("<section><h2>The LUT's weights</h2>"
            f'<img class="figure" src="{LUT_MAPS}" alt="Heat maps of the LUT weights per channel and model">'
            f'<p class="note">Solver {_escape(lut.solver)}, bin width {lut.bin_width}, {filled:,} of {lut.count.size:,} '
            f"(bin, channel) cells with reference pixels. Axes: the values of {_escape(lut.models[0])} (vertical) and "
            f"{_escape(lut.models[1])} (horizontal).{_escape(averaged)} Blank cells had no reference pixels.</p></section>")


def lut_weight_maps(lut: Lut) -> np.ndarray:
    """Weights (nb, nb, channel, model) over the bins of the first two models, count-weighted over the others' bins.

    NaN where no reference pixel fell in any of the averaged bins. A LUT without counts (imported)
    is averaged uniformly.
    """
    nb, n_models = ranges_per_model(lut.bin_width), len(lut.models)
    weights = lut.weights.reshape(nb, nb, -1, lut.n_channels, n_models)
    count = lut.count if lut.count.any() else np.ones_like(lut.count)
    count = count.reshape(nb, nb, -1, lut.n_channels).astype(np.float64)
    weighted = np.einsum("abrc,abrck->abck", count, weights)
    total = count.sum(axis=2)[..., None]
    return np.divide(weighted, total, out=np.full(weighted.shape, np.nan), where=total > 0)


def _channel_names(n_channels: int) -> list[str]:
    """Readable names of the store's channels."""
    if n_channels == 3:
        return ["red", "green", "blue"]
    if n_channels == 1:
        return ["gray"]
    return [f"channel {c}" for c in range(n_channels)]


# ---------------------------------------------------------------------------------------------
# Crops of the worst and the best image


def _crops_section(summary: dict, methods: Methods, ds, ensemble, folder: Path) -> str:
    """The worst and the best image by the ranked gain, each model beside the combination and the truth."""
    gains = _per_image_gains(summary, methods.ranked_by, methods.best_model)
    order = np.argsort(gains, kind="stable")  # NaN last: a NaN gain is neither the best nor the worst
    finite = [i for i in order if math.isfinite(gains[i])] or list(order)
    picks = [("worst", finite[0])] if finite[0] == finite[-1] else [("worst", finite[0]), ("best", finite[-1])]
    blocks = [_image_crops(label, summary["per_image"][position], gains[position], methods, ds, ensemble, folder)
              for label, position in picks]
    return (f"<section><h2>Worst and best image for {_escape(methods.ranked_by)}</h2>" + "".join(blocks) +
            f'<p class="note">Crops of at most {CROP_SIZE}×{CROP_SIZE} pixels where {_escape(methods.ranked_by)} and '
            f"{_escape(methods.best_model)} differ most, shown enlarged without smoothing.</p></section>")


def _image_crops(label: str, entry: dict, gain: float, methods: Methods, ds, ensemble, folder: Path) -> str:
    """Save the crops of one image (`label` 'worst' or 'best') and return their captioned HTML row."""
    stem = entry["image"]
    index = schema.ImageIndex.from_dataset(ds)
    position = index.stems.index(stem)
    shape = (int(index.heights[position]), int(index.widths[position]), ds.sizes["channel"])
    pixels = slice(int(index.offsets[position]), int(index.offsets[position] + index.counts[position]))
    predictions = ds[schema.PREDICTION][:, pixels].values
    images = {str(model): p.reshape(shape) for model, p in zip(ds.attrs["models"], predictions)}
    truth = ds[schema.GROUND_TRUTH][pixels].values.reshape(shape)
    if ensemble is not None:
        combined_name, combined = ENSEMBLE, ensemble[schema.ENSEMBLE][pixels].values.reshape(shape)
    else:
        combined_name, combined = AVERAGE, average(predictions).reshape(shape)
    improvement = _error(images[methods.best_model], truth) - _error(combined, truth)
    top, left = _crop_corner(improvement if label == "best" else -improvement)
    window = (slice(top, top + min(CROP_SIZE, shape[0])), slice(left, left + min(CROP_SIZE, shape[1])))
    pictures = []
    if INPUT in ds.variables:
        pictures.append((ds[INPUT][pixels].values.reshape(shape), INPUT, ""))
    pictures += [(images[m], m, _score(entry, m)) for m in methods.models]
    pictures.append((combined, combined_name, _score(entry, combined_name)))
    pictures.append((truth, "ground truth", ""))
    panels = [_save_crop(folder, f"{label}-{i:02d}.png", image[window], title, detail)
              for i, (image, title, detail) in enumerate(pictures)]
    panels.append(_save_crop(folder, f"{label}-difference.png", _difference_picture(improvement[window]),
                             "where it differs", f"blue: {combined_name} closer to the truth than {methods.best_model}; red: farther"))
    figures = "".join(f'<figure><img src="{p.file}" alt="{_escape(p.title)}"><figcaption>{_escape(p.title)}'
                      f"<span>{_escape(p.detail)}</span></figcaption></figure>" for p in panels)
    return (f"<h3>{_escape(label.capitalize())}: {_escape(stem)} ({_escape(methods.ranked_by)} "
            f"{_escape(_number(gain, '+.3f'))} dB vs {_escape(methods.best_model)})</h3><div class=\"crops\">{figures}</div>")


def _score(entry: dict, method: str) -> str:
    """The caption's PSNR of `method` on this image, empty when it was not scored."""
    return f"{_number(entry['psnr'][method], '.2f')} dB" if method in entry["psnr"] else ""


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


# ---------------------------------------------------------------------------------------------


def _escape(text) -> str:
    """`text` safe inside HTML text and attribute values."""
    return html.escape(str(text))


def _plain(text: str) -> str:
    """`text` for a matplotlib label, shown as written: dollar signs escaped so that no mathtext is parsed."""
    return str(text).replace("$", r"\$")


def _name_of(location: str) -> str:
    """The last component of a path or URL."""
    return str(location).rstrip("/").rpartition("/")[2] or str(location)
