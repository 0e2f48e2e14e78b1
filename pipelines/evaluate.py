"""Evaluate: PSNR and SSIM of every base model, the plain average and the ensemble, per image."""

import math
from dataclasses import dataclass

import dask
import numpy as np

from ensir_flow import metrics, schema
from ensir_flow.binning import DEFAULT_BIN_WIDTH
from ensir_flow.blend import (
    AVERAGE,
    ENSEMBLE,
    PAIRWISE_BLOCK,
    ZZPM,
    average,
    blend,
    blend_spans,
    squared_distance_sums,
    zzpm,
    zzpm_weights,
)
from ensir_flow.devices import resolve_device
from ensir_flow.errors import InputError
from ensir_flow.images import check_model_names

from .chunks import image_folds, pixel_array, read_pixels, task_argument
from .fingerprint import store_fingerprint
from .integrity import refuse_changed, store_identity
from .plan import Plan
from .stores import StoreIndex, open_store_index

#: Pixels of its image a task holds at a time: strips of rows of about this many pixels (a chunk
#: of the store's default size), so that memory is bounded by the strip, not the image.
STRIP_PIXELS = schema.DEFAULT_CHUNK_PIXELS


def image_scores(
    predictions,
    truth,
    ensemble,
    offset: int,
    shape: tuple[int, int, int],
    names: list[str],
    crop_border: int,
    y_channel: bool,
    luts: dict | None = None,
    strip_pixels: int = STRIP_PIXELS,
) -> dict:
    """One task: PSNR and SSIM for the image of `shape` (H, W, C) at pixel `offset` of each model,
    the average, ZZPM, the ensemble if given, and each LUT of `luts` ({method: (weights,
    bin_width)}) applied to the image here; all scored against the ground truth.

    The image is read, blended and scored in horizontal strips of rows of about `strip_pixels`
    pixels (`metrics.StripScorer`: the scores of the whole image, see there), so a task holds a
    strip of each candidate, never a whole image. ZZPM weighs each image as a whole: an image of
    several strips has its weights gathered first (`_squared_distance_sums`). An image that fits
    one strip is read once, whole.

    `predictions`, `truth` and `ensemble` (or None) are the stores' opened pixel arrays: the task
    reads its pixels itself (`chunks.read_pixels`), so the graph holds no slices of dask arrays,
    whose building took longer than the scoring of small images, and imported distributed."""
    height, width, channels = shape
    rows = max(1, strip_pixels // width)
    strips = metrics.strip_bounds(height, crop_border, rows)
    if len(strips) == 1:
        reads, weights = [(0, height)], None
    else:
        sums = _squared_distance_sums(predictions, offset, shape, max(strip_pixels * channels, PAIRWISE_BLOCK))
        reads, weights = strips, zzpm_weights(sums / (height * width * channels))
    scorer = None
    for (start, stop), (first, last) in zip(strips, reads):
        pixels = (offset + first * width, offset + last * width)
        block = read_pixels(predictions, *pixels)
        candidates = dict(zip(names, block))
        candidates[AVERAGE] = average(block)
        candidates[ZZPM] = zzpm(block) if weights is None else blend_spans(block, weights[None], [(0, block.shape[1])])
        if ensemble is not None:
            candidates[ENSEMBLE] = read_pixels(ensemble, *pixels)
        for method, (lut, bin_width) in (luts or {}).items():
            candidates[method] = blend(block, lut, bin_width)

        rows_read = (last - first, width, channels)
        in_strip = slice(start - first, stop - first)
        if scorer is None:
            scorer = metrics.StripScorer(len(candidates), shape, crop_border, y_channel, rows)
        scorer.add(
            [values.reshape(rows_read)[in_strip] for values in candidates.values()],
            read_pixels(truth, *pixels).reshape(rows_read)[in_strip],
        )
    psnrs, ssims = scorer.scores()
    return {"psnr": dict(zip(candidates, psnrs)), "ssim": dict(zip(candidates, ssims))}


def _squared_distance_sums(predictions, offset: int, shape: tuple[int, int, int], piece_values: int) -> np.ndarray:
    """`blend.squared_distance_sums` (K,) of the image of `shape` at pixel `offset`, for ZZPM's
    weights, reading a piece of at most `piece_values` values (at least the 128 of a pairwise
    block) at a time.

    `squared_distance_sums` adds the values of the whole image in numpy's pairwise order: halves
    (the first a multiple of 8) down to blocks of 128 values. The pieces here are nodes of that
    tree, added as the tree adds them, so the sums are the bits it gives on the whole image."""
    channels = shape[2]

    def sums(start: int, n: int) -> np.ndarray:
        if n > piece_values:
            half = n // 2
            half -= half % 8
            return sums(start, half) + sums(start + half, n - half)
        first, stop = start // channels, -(-(start + n) // channels)
        values = read_pixels(predictions, offset + first, offset + stop)
        skip = start - first * channels
        return squared_distance_sums(values.reshape(len(values), -1)[:, skip : skip + n])

    return sums(0, shape[0] * shape[1] * channels)


def _check_crop_border(store: str, index: schema.ImageIndex, crop_border: int) -> None:
    """Refuse a crop border that leaves no pixels of some image of the store, naming its smallest."""
    sides = np.minimum(index.heights, index.widths)
    smallest = int(np.argmin(sides))
    if 2 * crop_border >= sides[smallest]:
        raise InputError(
            f"{store}: --crop-border {crop_border} leaves no pixels of its smallest image "
            f"'{index.stems[smallest]}' ({index.heights[smallest]}x{index.widths[smallest]}): "
            f"at most {(sides[smallest] - 1) // 2}"
        )


def _check_made_from(ensemble: StoreIndex, ensemble_store: str, ds: StoreIndex, store: str) -> None:
    """Refuse an `apply` output that was not made from the store as it is now.

    apply records the fingerprint of the store it blended (`fingerprint.store_fingerprint`: models,
    stems, sizes, chunking and source files' SHA-256) and how many images it had; where both
    stores carry a `store_id` (the output as `source_store_id`), those must agree too. An output
    made before the store grew by appends covers only its first images: it is refused as well,
    saying so (apply, run again, adds the new images to it), rather than scored on part of the set."""
    attrs, n_images = ensemble.attrs, ds.sizes["image"]
    made_from = attrs.get("source", "another store")
    recorded, made_images = attrs.get("source_fingerprint"), attrs.get("source_images")
    if recorded is None:
        raise InputError(
            f"{ensemble_store}: records no source store (no source_fingerprint: not made by apply, or by "
            f"an older version), so it cannot be checked against {store}: run apply on {store} again"
        )
    ids = (attrs.get("source_store_id"), ds.attrs.get("store_id"))
    if None not in ids and ids[0] != ids[1]:
        raise InputError(f"{ensemble_store}: made from {made_from} (store_id {ids[0]}), not from {store} (store_id {ids[1]})")
    if recorded == store_fingerprint(ds):
        return
    if isinstance(made_images, int) and 0 < made_images < n_images and recorded == store_fingerprint(ds, made_images):
        raise InputError(
            f"{ensemble_store}: made from the first {made_images} images of {store}, which has "
            f"{n_images} since it grew: run apply again to add the others"
        )
    raise InputError(
        f"{ensemble_store}: made from {made_from}, not from {store} (their models, images, chunking or "
        f"source files differ): score it against the store it was made from, or run apply on {store}"
    )


def _means(scores: list[dict], metric: str) -> dict[str, float]:
    """Mean per method over the images that have the metric (SSIM is NaN for images smaller than
    its 11x11 window); NaN when none has it."""
    means = {}
    for name in scores[0][metric]:
        values = np.array([s[metric][name] for s in scores], dtype=np.float64)
        scored = values[~np.isnan(values)]
        means[name] = float(scored.mean()) if len(scored) else float("nan")
    return means


def _ssim_cell(value: float) -> str:
    return f"{value:6.4f}" if math.isfinite(value) else f"{'n/a':>6}"


@dataclass
class Evaluation:
    """Per-image scores, their means over images and, for cross-validation, per-fold means."""

    images: list[str]
    models: list[str]
    per_image: list[dict]
    options: dict
    fold_of_image: list[int] | None = None

    def means(self, metric: str) -> dict[str, float]:
        return _means(self.per_image, metric)

    def fold_means(self) -> list[dict]:
        """Mean PSNR/SSIM of the held-out images of each fold."""
        folds = sorted(set(self.fold_of_image or []))
        return [
            {
                "fold": f,
                **{m: _means([s for s, g in zip(self.per_image, self.fold_of_image) if g == f], m) for m in ("psnr", "ssim")},
            }
            for f in folds
        ]

    def to_json(self) -> dict:
        result = {
            "images": len(self.images),
            "psnr": self.means("psnr"),
            "ssim": self.means("ssim"),
            "options": self.options,
            "per_image": [{"image": stem, **scores} for stem, scores in zip(self.images, self.per_image)],
        }
        if self.fold_of_image is not None:
            result["cv"] = {
                "folds": len(set(self.fold_of_image)),
                "per_fold": self.fold_means(),
                "psnr": result["psnr"],
                "ssim": result["ssim"],
            }
            for entry, fold in zip(result["per_image"], self.fold_of_image):
                entry["fold"] = fold
        return result

    def table(self) -> str:
        """Mean PSNR/SSIM per method (and per fold under cross-validation), gains underneath."""
        psnr, ssim = self.means("psnr"), self.means("ssim")
        width = max(len(name) for name in psnr)
        setting = f"{'Y channel' if self.options['y_channel'] else 'RGB'}, crop border {self.options['crop_border']}"
        if self.fold_of_image is not None:
            folds = self.fold_means()
            lines = [
                f"{len(self.images)} images, {len(folds)}-fold cross-validation by image (held-out scores), {setting}",
                f"{'method'.ljust(width)}  {'PSNR (dB)':>9}  {'SSIM':>6}  "
                + "  ".join(f"{'fold ' + str(f['fold']):>8}" for f in folds),
            ]
            lines += [
                f"{name.ljust(width)}  {psnr[name]:9.3f}  {_ssim_cell(ssim[name])}  "
                + "  ".join(f"{f['psnr'][name]:8.3f}" for f in folds)
                for name in psnr
            ]
        else:
            lines = [f"{len(self.images)} images, {setting}", f"{'method'.ljust(width)}  {'PSNR (dB)':>9}  {'SSIM':>6}"]
            lines += [f"{name.ljust(width)}  {psnr[name]:9.3f}  {_ssim_cell(ssim[name])}" for name in psnr]
        unscored = sum(any(math.isnan(value) for value in s["ssim"].values()) for s in self.per_image)
        if unscored:
            lines.append(
                f"SSIM over {len(self.images) - unscored} of {len(self.images)} images "
                f"({unscored} smaller than the 11x11 SSIM window after the crop border)"
            )
        best = max(self.models, key=psnr.get)
        for method in psnr:
            if method not in self.models and method not in (AVERAGE, ZZPM) and math.isfinite(psnr[method]):
                lines.append(
                    f"{method} vs best single model ({best}): {psnr[method] - psnr[best]:+.3f} dB; "
                    f"vs average: {psnr[method] - psnr[AVERAGE]:+.3f} dB"
                )
        return "\n".join(lines)


def plan_evaluate(store: str, ensemble_store: str | None = None, y_channel: bool = False, crop_border: int = 0) -> Plan:
    """Plan scoring every image of the reference store (and of an `apply` output, if given). Either
    store replaced or changed while it is read is refused (exit 75: `integrity.refuse_changed`)."""
    planned = {path: store_identity(path) for path in (store, ensemble_store) if path is not None}
    ds = open_store_index(store)
    models = schema.check_store(ds, store, require=(schema.PREDICTION, schema.GROUND_TRUTH))
    check_model_names(models, store)  # a store written before ingest refused such names
    index = schema.ImageIndex.from_dataset(ds)
    _check_crop_border(store, index, crop_border)
    ensemble = None
    if ensemble_store is not None:
        ens = open_store_index(ensemble_store)
        schema.check_store(ens, ensemble_store, require=(schema.ENSEMBLE,))
        _check_made_from(ens, ensemble_store, ds, store)
        other = schema.ImageIndex.from_dataset(ens)
        if other.stems != index.stems or not np.array_equal(other.counts, index.counts):
            raise InputError(f"{ensemble_store}: its images (names or sizes) differ from those of {store}")
        ensemble = task_argument(pixel_array(ensemble_store, schema.ENSEMBLE))
    predictions, truth = (task_argument(pixel_array(store, variable)) for variable in (schema.PREDICTION, schema.GROUND_TRUTH))
    channels = ds.sizes["channel"]
    tasks = [
        dask.delayed(image_scores, pure=True)(
            predictions, truth, ensemble, int(off), (int(h), int(w), channels), models, crop_border, y_channel
        )
        for h, w, off in zip(index.heights, index.widths, index.offsets)
    ]
    options = {"y_channel": y_channel, "crop_border": crop_border}

    def execute(compute):
        scores = list(compute(*tasks, label="evaluate"))
        for path, identity in planned.items():
            refuse_changed(path, identity)
        return Evaluation(index.stems, models, scores, options)

    details = {
        "store": str(store),
        "ensemble": str(ensemble_store) if ensemble_store else "none (models and average only)",
        "images": len(index.stems),
        "metrics": f"PSNR, SSIM on {'Y' if y_channel else 'RGB'}, crop border {crop_border}",
    }
    return Plan(f"evaluate {len(index.stems)} images", details, execute)


def plan_cross_validation(
    store: str,
    n_folds: int,
    solvers=("em", "lsq"),
    bin_widths=(DEFAULT_BIN_WIDTH,),
    y_channel: bool = False,
    crop_border: int = 0,
    device: str = "auto",
) -> Plan:
    """Plan N-fold cross-validation by image: for each fold, LUTs fitted on the other folds (one
    statistics pass per bin width keeps the folds apart), scored on the fold's held-out images."""
    from ensir_flow.lut import moments_for  # the LUT solvers: cross-validation only
    from ensir_flow.solvers import fittable

    from .fit import lut_from_folds, statistics_graph

    planned = store_identity(store)
    ds = open_store_index(store)
    models = schema.check_store(ds, store, require=(schema.PREDICTION, schema.GROUND_TRUTH))
    check_model_names(models, store)  # a store written before ingest refused such names
    index = schema.ImageIndex.from_dataset(ds)
    if not 2 <= n_folds <= len(index.stems):
        raise InputError(f"{store}: --cv {n_folds} needs between 2 and {len(index.stems)} folds (one image at least per fold)")
    _check_crop_border(store, index, crop_border)
    folds = image_folds(len(index.stems), n_folds)
    tunings = {solver: fittable(solver).tuning for solver in solvers}
    graphs = [statistics_graph(store, ds, width, device, n_folds, moments_for(solvers)) for width in bin_widths]
    em_device = resolve_device(device)
    name = (lambda solver, width: solver) if len(bin_widths) == 1 else (lambda solver, width: f"{solver}@{width}")
    predictions, truth = (task_argument(pixel_array(store, variable)) for variable in (schema.PREDICTION, schema.GROUND_TRUTH))
    options = {"y_channel": y_channel, "crop_border": crop_border, "solvers": list(solvers), "bin_widths": list(bin_widths)}

    def execute(compute):
        per_width = compute(*graphs, label="statistics")
        luts = {fold: {} for fold in range(n_folds)}
        for width, fold_statistics in zip(bin_widths, per_width):
            for fold in range(n_folds):
                training = [s for f, s in enumerate(fold_statistics) if f != fold]
                for solver in solvers:
                    lut = lut_from_folds(training, models, em_device, solver)
                    luts[fold][name(solver, width)] = (dask.delayed(lut.lookup_table(), pure=True), width)
        tasks = [
            dask.delayed(image_scores, pure=True)(
                predictions,
                truth,
                None,
                int(off),
                (int(h), int(w), ds.sizes["channel"]),
                models,
                crop_border,
                y_channel,
                luts[int(fold)],
            )
            for h, w, off, fold in zip(index.heights, index.widths, index.offsets, folds)
        ]
        scores = list(compute(*tasks, label="held-out scores"))
        refuse_changed(store, planned)
        return Evaluation(index.stems, models, scores, options, folds.tolist())

    details = {
        "store": str(store),
        "images": len(index.stems),
        "folds": f"{n_folds} (image i in fold i % {n_folds})",
        "solvers": ", ".join(solvers),
        "bin widths": ", ".join(map(str, bin_widths)),
        "metrics": f"PSNR, SSIM on {'Y' if y_channel else 'RGB'}, crop border {crop_border}",
        **{
            f"{solver} {tuning.parameter}": f"chosen by nested cross-validation on the training folds (default "
            f"{tuning.default:g} with one training fold)"
            for solver, tuning in tunings.items()
            if tuning is not None
        },
    }
    return Plan(f"{n_folds}-fold cross-validation of {', '.join(solvers)}", details, execute)
