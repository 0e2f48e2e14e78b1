"""Report: an HTML page, with PNG figures beside it, that shows how the combinations compare.

`write_report` turns the summary of `evaluate` (`Evaluation.to_json()`) into `DIR/index.html`:
the mean scores with the best value of each column highlighted and the gains over the best single
model and the average; cross-validation folds when the scores are held out; a bar chart of each
combination's per-image PSNR gain; crops of the worst and the best image, every model side by
side with the combination and the ground truth; and, given a LUT, heat maps of its weights.

This module reads the stores and the LUT and lays out the directory; the HTML and the figures
come from `ensir_flow.report` (`page`, `figures`). The directory is written staged beside DIR and
moved into place when complete; DIR is a local folder (a browser opens it).
"""

import os
from pathlib import Path

from ensir_flow import schema
from ensir_flow.blend import AVERAGE, ENSEMBLE, average
from ensir_flow.errors import InputError
from ensir_flow.report import figures, page
from ensir_flow.report.summary import Methods, per_image_gains, worst_and_best

from .commit import exists, staged_output
from .lut_io import read_lut
from .stores import open_store

INPUT = "input"
GAIN_CHART = "gain.png"
LUT_MAPS = "lut-weights.png"


def check_report_target(directory, overwrite: bool = False) -> None:
    """Refuse, before any work, a report folder that `write_report` could not write: one that
    exists (unless `overwrite`), one under a regular file, or one whose nearest existing folder
    cannot be written to (staging is created beside it)."""
    target = Path(directory)
    if target.exists() and not overwrite:
        raise InputError(f"{directory}: already exists; name a new folder for the report (or remove this one)")
    ancestor = target.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"{directory}: cannot be created: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"{directory}: cannot be created: {ancestor}: permission denied")


def write_report(
    directory, summary: dict, store: str, ensemble_store: str | None = None, lut_path: str | None = None, overwrite: bool = False
) -> Path:
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
        sections = [page.verdict_section(summary, methods), page.means_section(summary, methods)]
        if "cv" in summary:
            sections.append(page.cross_validation_section(summary["cv"], methods))
        figures.gain_chart(summary, methods, folder / GAIN_CHART)
        sections.append(page.gain_section(methods, GAIN_CHART))
        sections.append(_crops_section(summary, methods, ds, ensemble, folder))
        if lut is not None and len(lut.models) > 1:  # a one-model LUT weighs everything 1
            figures.lut_maps(lut, folder / LUT_MAPS)
            sections.append(page.lut_section(lut, LUT_MAPS))
        sections.append(page.per_image_section(summary, methods, _image_sizes(ds)))
        lut_reference = None if lut is None else lut.attrs.get("reference_store")
        context = page.context(
            summary,
            methods,
            ds.sizes["channel"],
            lut_reference,
            lut_reference is not None and _same_location(lut_reference, store),
        )
        sources = {"store": store, "ensemble": ensemble_store, "LUT": lut_path}
        text = page.document(f"Ensemble report: {_name_of(store)}", context, sections, sources)
        (folder / "index.html").write_text(text, encoding="utf-8")
    return Path(directory) / "index.html"


def _image_sizes(ds) -> dict[str, str]:
    """'height×width' of each image of the store, by stem."""
    index = schema.ImageIndex.from_dataset(ds)
    return {stem: f"{h}×{w}" for stem, h, w in zip(index.stems, index.heights, index.widths)}


def _crops_section(summary: dict, methods: Methods, ds, ensemble, folder: Path) -> str:
    """The worst and the best image by the ranked gain, each model beside the combination and the truth."""
    gains = per_image_gains(summary, methods.ranked_by, methods.best_model)
    rows = []
    for label, position in worst_and_best(gains):
        entry = summary["per_image"][position]
        panels = _image_crops(label, entry, methods, ds, ensemble, folder)
        rows.append(page.crops_row(label, entry["image"], gains[position], methods, panels))
    return page.crops_section(methods, rows)


def _image_crops(label: str, entry: dict, methods: Methods, ds, ensemble, folder: Path) -> list[figures.Panel]:
    """Read the pictures of one image from the stores and save their crops (`label` 'worst' or 'best')."""
    index = schema.ImageIndex.from_dataset(ds)
    position = index.stems.index(entry["image"])
    shape = (int(index.heights[position]), int(index.widths[position]), ds.sizes["channel"])
    pixels = slice(int(index.offsets[position]), int(index.offsets[position] + index.counts[position]))
    predictions = ds[schema.PREDICTION][:, pixels].values
    images = {str(model): p.reshape(shape) for model, p in zip(ds.attrs["models"], predictions)}
    truth = ds[schema.GROUND_TRUTH][pixels].values.reshape(shape)
    if ensemble is not None:
        combined_name, combined = ENSEMBLE, ensemble[schema.ENSEMBLE][pixels].values.reshape(shape)
    else:
        combined_name, combined = AVERAGE, average(predictions).reshape(shape)
    pictures = []
    if INPUT in ds.variables:
        pictures.append((ds[INPUT][pixels].values.reshape(shape), INPUT, ""))
    pictures += [(images[m], m, page.psnr_caption(entry, m)) for m in methods.models]
    pictures.append((combined, combined_name, page.psnr_caption(entry, combined_name)))
    pictures.append((truth, "ground truth", ""))
    return figures.save_crops(
        folder, label, pictures, truth, (combined_name, combined), (methods.best_model, images[methods.best_model])
    )


def _same_location(first: str, second: str) -> bool:
    """Whether two store locations name the same place (local paths resolved, URLs compared as written)."""

    def normal(location):
        location = str(location).rstrip("/")
        return location if "://" in location else os.path.realpath(location)

    return normal(first) == normal(second)


def _name_of(location: str) -> str:
    """The last component of a path or URL."""
    return str(location).rstrip("/").rpartition("/")[2] or str(location)
