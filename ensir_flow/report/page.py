"""The report's HTML: the inline style, the document skeleton, its sections and tables, escaping and number formatting.

The page is self-contained: inline CSS, no JavaScript, no network resources, figures referenced
by relative file names.
"""

import html
import math

import numpy as np

import ensir_flow
from ensir_flow.blend import AVERAGE, ZZPM
from ensir_flow.lut import Lut

from .figures import CROP_SIZE, Panel
from .summary import Methods, per_image_gains

MOST_IMAGES_SHOWN_OPEN = 20  # the per-image table starts folded beyond this many images

STYLE = """
body { margin: 0; background: #f4f5f7; color: #1d2330; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 28px 32px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 0 0 12px; }
h3 { font-size: 15px; margin: 18px 0 8px; }
section { background: #fff; border-radius: 10px; padding: 20px 24px; margin: 18px 0;
          box-shadow: 0 1px 3px rgba(20, 30, 50, .08); }
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
tr.model td:first-child::after { content: "model"; margin-left: 8px; font-size: 11px; color: #5b6475;
                                 border: 1px solid #c9ced8; border-radius: 8px; padding: 0 6px; }
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


def document(title: str, context: str, sections: list[str], sources: dict) -> str:
    """The HTML document: `title`, the `context` line, `sections`, and the `sources` ({role:
    location or None}) it was made from."""
    made_from = "; ".join(f"{role} {location}" for role, location in sources.items() if location is not None)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_escape(title)}</title><style>{STYLE}</style></head>\n<body><main>\n"
        f'<header><h1>{_escape(title)}</h1><p class="context">{_escape(context)}</p></header>\n'
        + "\n".join(sections)
        + f"\n<footer>Made by ensir-flow {_escape(ensir_flow.__version__)} from {_escape(made_from)}.</footer>"
        "\n</main></body></html>\n"
    )


def context(summary: dict, methods: Methods, n_channels: int, lut_reference: str | None, lut_fitted_here: bool) -> str:
    """One line: how many images, which colour space and border, in-sample or held out.

    `lut_reference` is the reference store the LUT was fitted on (None when unknown or without a
    LUT), `lut_fitted_here` whether that is the evaluated store.
    """
    options = summary.get("options", {})
    colour = "Y channel (BT.601 luma)" if options.get("y_channel") else ("grayscale" if n_channels == 1 else "RGB")
    return (
        f"{summary['images']} images · PSNR and SSIM on {colour} · crop border {options.get('crop_border', 0)} · "
        f"{_scoring(summary, methods, lut_reference, lut_fitted_here)}"
    )


def _scoring(summary: dict, methods: Methods, lut_reference: str | None, lut_fitted_here: bool) -> str:
    """Whether the scores are held out (cross-validation, or a LUT fitted elsewhere) or in-sample."""
    if "cv" in summary:
        return f"held out: {summary['cv']['folds']}-fold cross-validation by image, each fold scored by LUTs fitted on the others"
    if set(methods.combinations) <= {AVERAGE, ZZPM}:
        return "no fitted combination (the average and ZZPM learn nothing from these images)"
    if lut_reference is None:
        return "in-sample unless the LUT was fitted on other images"
    if lut_fitted_here:
        return "in-sample: the LUT was fitted on these images, so its gains are optimistic"
    return f"LUT fitted on another store ({lut_reference}): scores are on images it did not see unless the stores share some"


def verdict_section(summary: dict, methods: Methods) -> str:
    """The headline: how the ranked combination fares against the best model and the average."""
    psnr, best, ranked = summary["psnr"], methods.best_model, methods.ranked_by
    versus = [(best, f"the best single model ({best})")] + ([(AVERAGE, "the average")] if ranked != AVERAGE else [])
    gains = ", ".join(f"{_signed_span(psnr[ranked] - psnr[other])} dB over {_escape(label)}" for other, label in versus)
    per_image = per_image_gains(summary, ranked, best)
    wins = int(np.sum(per_image > 0))
    strongest = max(methods.combinations, key=psnr.get)
    also = (
        ""
        if strongest == ranked
        else f" The strongest combination is <strong>{_escape(strongest)}</strong>: "
        f"{_signed_span(psnr[strongest] - psnr[best])} dB over {_escape(best)}."
    )
    return (
        f'<section class="verdict"><strong>{_escape(ranked)}</strong>: {gains}; better than {_escape(best)} on '
        f"{wins} of {len(per_image)} images.{also}</section>"
    )


def _signed_span(value: float) -> str:
    """A signed dB figure, green when positive and red when negative."""
    kind = "up" if value > 0 else "down" if value < 0 else ""
    return f'<span class="{kind}">{_number(value, "+.3f")}</span>'


def means_section(summary: dict, methods: Methods) -> str:
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
    return (
        "<section><h2>Mean scores</h2>"
        + table
        + f'<p class="note">Best value of each column highlighted. Best single model: {_escape(best)} '
        f"(highest mean PSNR). Every method that is not a model combines the models.</p></section>"
    )


def cross_validation_section(cv: dict, methods: Methods) -> str:
    """Held-out mean PSNR and SSIM of every fold and over all images."""
    folds = cv["per_fold"]
    columns = []
    for metric, style in (("psnr", ".3f"), ("ssim", ".4f")):
        columns += [(f"fold {fold['fold']}", [fold[metric][m] for m in methods.all], style) for fold in folds]
        columns.append(("mean", [cv[metric][m] for m in methods.all], style))
    span = len(folds) + 1
    head = (
        f'<tr><th rowspan="2">method</th><th colspan="{span}">held-out PSNR (dB)</th><th colspan="{span}">held-out SSIM</th></tr>'
        "<tr>" + "".join(f"<th>{_escape(name)}</th>" for name, _, _ in columns) + "</tr>"
    )
    return (
        f"<section><h2>Cross-validation ({cv['folds']} folds, held out)</h2>"
        + _table("cross-validation", head, methods, columns)
        + '<p class="note">Each fold\'s images are scored by LUTs fitted on the other folds only, so every score on '
        "this page is held out. Best value of each column highlighted.</p></section>"
    )


def _table(table_id: str, head: str, methods: Methods, columns: list[tuple[str, list[float], str]]) -> str:
    """A table with one row per method and the largest value of each column highlighted."""
    best_rows = [_best_indices(values) for _, values, _ in columns]
    rows = []
    for row, method in enumerate(methods.all):
        kind = "model" if method in methods.models else "combination"
        cells = "".join(_cell(values[row], style, row in best) for (_, values, style), best in zip(columns, best_rows))
        rows.append(f'<tr class="{kind}"><td>{_escape(method)}</td>{cells}</tr>')
    return (
        f'<div class="table-scroll"><table id="{table_id}"><thead>{head}</thead><tbody>'
        + "".join(rows)
        + "</tbody></table></div>"
    )


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


def per_image_section(summary: dict, methods: Methods, sizes: dict[str, str]) -> str:
    """Every image's PSNR per method (best of each row highlighted), sorted by the ranked gain; `sizes` by image name."""
    entries = summary["per_image"]
    gains = per_image_gains(summary, methods.ranked_by, methods.best_model)
    with_folds = "fold" in entries[0]
    head = (
        "<tr><th>image</th><th>size</th>"
        + ("<th>fold</th>" if with_folds else "")
        + "".join(f"<th>{_escape(m)}</th>" for m in methods.all)
        + f"<th>{_escape(methods.ranked_by)} − {_escape(methods.best_model)}</th></tr>"
    )
    rows = []
    for position in np.argsort(-gains, kind="stable"):
        entry = entries[position]
        values = [entry["psnr"][m] for m in methods.all]
        best = _best_indices(values)
        cells = "".join(_cell(v, ".3f", i in best) for i, v in enumerate(values))
        fold = f"<td>{entry['fold']}</td>" if with_folds else ""
        rows.append(
            f"<tr><td>{_escape(entry['image'])}</td><td>{_escape(sizes.get(entry['image'], ''))}</td>{fold}"
            f"{cells}{_cell(float(gains[position]), '+.3f', False)}</tr>"
        )
    state = " open" if len(entries) <= MOST_IMAGES_SHOWN_OPEN else ""
    return (
        f"<section><details{state}><summary>PSNR of every image (dB), {len(entries)} images</summary>"
        f'<div class="table-scroll"><table id="per-image"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table></div>'
        "</details></section>"
    )


def gain_section(methods: Methods, chart: str) -> str:
    """The section of the per-image gain chart, saved as the file `chart` beside the page."""
    return (
        "<section><h2>Where the combinations gain</h2>"
        f'<img class="figure" src="{chart}" alt="{_escape(f"Per-image PSNR gain over {methods.best_model}")}">'
        f'<p class="note">Bars above zero: the combination beats {_escape(methods.best_model)}, the best single model, '
        "on that image.</p></section>"
    )


def lut_section(lut: Lut, maps: str) -> str:
    """The section of the LUT's weight maps, saved as the file `maps` beside the page."""
    if len(lut.models) == 2:
        averaged = ""
    elif lut.bin_count.any():
        averaged = (
            f" Each cell averages the weights over the value ranges of {', '.join(lut.models[2:])}, weighted by "
            "their reference pixel counts."
        )
    else:
        averaged = (
            f" This LUT records no reference pixel counts (it was imported), so each cell averages the weights "
            f"over the value ranges of {', '.join(lut.models[2:])} uniformly."
        )
    return (
        "<section><h2>The LUT's weights</h2>"
        f'<img class="figure" src="{maps}" alt="Heat maps of the LUT weights per channel and model">'
        f'<p class="note">Solver {_escape(lut.solver)}, bin width {lut.bin_width}, '
        f"{lut.filled_cells:,} of {lut.n_bins * lut.n_channels:,} "
        f"(bin, channel) cells with reference pixels. Axes: the values of {_escape(lut.models[0])} (vertical) and "
        f"{_escape(lut.models[1])} (horizontal).{_escape(averaged)} Blank cells had no reference pixels.</p></section>"
    )


def crops_section(methods: Methods, rows: list[str]) -> str:
    """The section of the worst and the best image: `rows` from `crops_row`."""
    return (
        f"<section><h2>Worst and best image for {_escape(methods.ranked_by)}</h2>"
        + "".join(rows)
        + f'<p class="note">Crops of at most {CROP_SIZE}×{CROP_SIZE} pixels where {_escape(methods.ranked_by)} and '
        f"{_escape(methods.best_model)} differ most, shown enlarged without smoothing.</p></section>"
    )


def crops_row(label: str, stem: str, gain: float, methods: Methods, panels: list[Panel]) -> str:
    """The captioned crops of one image (`label` 'worst' or 'best') under a heading with its gain."""
    figures = "".join(
        f'<figure><img src="{p.file}" alt="{_escape(p.title)}"><figcaption>{_escape(p.title)}'
        f"<span>{_escape(p.detail)}</span></figcaption></figure>"
        for p in panels
    )
    return (
        f"<h3>{_escape(label.capitalize())}: {_escape(stem)} ({_escape(methods.ranked_by)} "
        f'{_escape(_number(gain, "+.3f"))} dB vs {_escape(methods.best_model)})</h3><div class="crops">{figures}</div>'
    )


def psnr_caption(entry: dict, method: str) -> str:
    """A crop caption's PSNR of `method` on the image of `entry`, empty when it was not scored."""
    return f"{_number(entry['psnr'][method], '.2f')} dB" if method in entry["psnr"] else ""


def _escape(text) -> str:
    """`text` safe inside HTML text and attribute values."""
    return html.escape(str(text))
