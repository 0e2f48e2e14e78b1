"""Evaluate: PSNR and SSIM of every base model, the plain average and the ensemble, per image."""

import math
from dataclasses import dataclass

import dask
import numpy as np

from ensir_flow import metrics, schema
from ensir_flow.binning import DEFAULT_BIN_WIDTH
from ensir_flow.blend import AVERAGE, ENSEMBLE, ZZPM, average, blend, zzpm
from ensir_flow.devices import resolve_device
from ensir_flow.errors import InputError
from ensir_flow.images import check_model_names

from .chunks import image_folds, pixel_array, read_pixels, task_argument
from .plan import Plan
from .storage import open_store_index



def image_scores(predictions, truth, ensemble, offset: int, height: int, width: int, names: list[str],
                 crop_border: int, y_channel: bool, luts: dict | None = None) -> dict:
    """One task: PSNR and SSIM for the image at pixel `offset` of each model, the average, ZZPM,
    the ensemble if given, and each LUT of `luts` ({method: (weights, bin_width)}) applied to the
    image here; all scored in one pass against the ground truth (`metrics.scores`).

    `predictions`, `truth` and `ensemble` (or None) are the stores' opened pixel arrays: the task
    reads its image itself (`chunks.read_pixels`), so the graph holds no slices of dask arrays,
    whose building took longer than the scoring of small images, and imported distributed."""
    stop = offset + height * width
    predictions = read_pixels(predictions, offset, stop)
    shape = (height, width, -1)
    truth = read_pixels(truth, offset, stop).reshape(shape)
    candidates = {name: p.reshape(shape) for name, p in zip(names, predictions)}
    candidates[AVERAGE] = average(predictions).reshape(shape)
    candidates[ZZPM] = zzpm(predictions).reshape(shape)
    if ensemble is not None:
        candidates[ENSEMBLE] = read_pixels(ensemble, offset, stop).reshape(shape)
    for method, (weights, bin_width) in (luts or {}).items():
        candidates[method] = blend(predictions, weights, bin_width).reshape(shape)
    psnrs, ssims = metrics.scores(list(candidates.values()), truth, crop_border=crop_border, y_channel=y_channel)
    return {"psnr": dict(zip(candidates, psnrs)), "ssim": dict(zip(candidates, ssims))}


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
        return [{"fold": f, **{m: _means([s for s, g in zip(self.per_image, self.fold_of_image) if g == f], m)
                               for m in ("psnr", "ssim")}} for f in folds]

    def to_json(self) -> dict:
        result = {"images": len(self.images), "psnr": self.means("psnr"), "ssim": self.means("ssim"), "options": self.options,
                  "per_image": [{"image": stem, **scores} for stem, scores in zip(self.images, self.per_image)]}
        if self.fold_of_image is not None:
            result["cv"] = {"folds": len(set(self.fold_of_image)), "per_fold": self.fold_means(),
                            "psnr": result["psnr"], "ssim": result["ssim"]}
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
            lines = [f"{len(self.images)} images, {len(folds)}-fold cross-validation by image (held-out scores), {setting}",
                     f"{'method'.ljust(width)}  {'PSNR (dB)':>9}  {'SSIM':>6}  " + "  ".join(f"{'fold ' + str(f['fold']):>8}" for f in folds)]
            lines += [f"{name.ljust(width)}  {psnr[name]:9.3f}  {_ssim_cell(ssim[name])}  " + "  ".join(f"{f['psnr'][name]:8.3f}" for f in folds)
                      for name in psnr]
        else:
            lines = [f"{len(self.images)} images, {setting}", f"{'method'.ljust(width)}  {'PSNR (dB)':>9}  {'SSIM':>6}"]
            lines += [f"{name.ljust(width)}  {psnr[name]:9.3f}  {_ssim_cell(ssim[name])}" for name in psnr]
        unscored = sum(any(math.isnan(value) for value in s["ssim"].values()) for s in self.per_image)
        if unscored:
            lines.append(f"SSIM over {len(self.images) - unscored} of {len(self.images)} images "
                         f"({unscored} smaller than the 11x11 SSIM window after the crop border)")
        best = max(self.models, key=psnr.get)
        for method in psnr:
            if method not in self.models and method not in (AVERAGE, ZZPM) and math.isfinite(psnr[method]):
                lines.append(f"{method} vs best single model ({best}): {psnr[method] - psnr[best]:+.3f} dB; "
                             f"vs average: {psnr[method] - psnr[AVERAGE]:+.3f} dB")
        return "\n".join(lines)


def plan_evaluate(store: str, ensemble_store: str | None = None, y_channel: bool = False, crop_border: int = 0) -> Plan:
    """Plan scoring every image of the reference store (and of an `apply` output, if given)."""
    ds = open_store_index(store)
    models = schema.check_store(ds, store, require=(schema.PREDICTION, schema.GROUND_TRUTH))
    check_model_names(models, store)  # a store written before ingest refused such names
    index = schema.ImageIndex.from_dataset(ds)
    ensemble = None
    if ensemble_store is not None:
        ens = open_store_index(ensemble_store)
        schema.check_store(ens, ensemble_store, require=(schema.ENSEMBLE,))
        other = schema.ImageIndex.from_dataset(ens)
        if other.stems != index.stems or not np.array_equal(other.counts, index.counts):
            raise InputError(f"{ensemble_store}: its images (names or sizes) differ from those of {store}")
        ensemble = task_argument(pixel_array(ensemble_store, schema.ENSEMBLE))
    predictions, truth = (task_argument(pixel_array(store, variable)) for variable in (schema.PREDICTION, schema.GROUND_TRUTH))
    tasks = [dask.delayed(image_scores, pure=True)(predictions, truth, ensemble, int(off), int(h), int(w), models, crop_border, y_channel)
             for h, w, off in zip(index.heights, index.widths, index.offsets)]
    options = {"y_channel": y_channel, "crop_border": crop_border}

    def execute(compute):
        return Evaluation(index.stems, models, list(compute(*tasks, label="evaluate")), options)

    details = {"store": str(store), "ensemble": str(ensemble_store) if ensemble_store else "none (models and average only)",
               "images": len(index.stems), "metrics": f"PSNR, SSIM on {'Y' if y_channel else 'RGB'}, crop border {crop_border}"}
    return Plan(f"evaluate {len(index.stems)} images", details, execute)


def plan_cross_validation(store: str, n_folds: int, solvers=("em", "lsq"), bin_widths=(DEFAULT_BIN_WIDTH,), y_channel: bool = False,
                          crop_border: int = 0, device: str = "auto") -> Plan:
    """Plan N-fold cross-validation by image: for each fold, LUTs fitted on the other folds (one
    statistics pass per bin width keeps the folds apart), scored on the fold's held-out images."""
    from ensir_flow.lut import moments_for  # the LUT solvers: cross-validation only

    from .fit import lut_from_folds, statistics_graph

    ds = open_store_index(store)
    models = schema.check_store(ds, store, require=(schema.PREDICTION, schema.GROUND_TRUTH))
    check_model_names(models, store)  # a store written before ingest refused such names
    index = schema.ImageIndex.from_dataset(ds)
    if not 2 <= n_folds <= len(index.stems):
        raise InputError(f"{store}: --cv {n_folds} needs between 2 and {len(index.stems)} folds (one image at least per fold)")
    folds = image_folds(len(index.stems), n_folds)
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
            dask.delayed(image_scores, pure=True)(predictions, truth, None, int(off), int(h), int(w), models, crop_border,
                                                  y_channel, luts[int(fold)])
            for h, w, off, fold in zip(index.heights, index.widths, index.offsets, folds)
        ]
        return Evaluation(index.stems, models, list(compute(*tasks, label="held-out scores")), options, folds.tolist())

    details = {"store": str(store), "images": len(index.stems), "folds": f"{n_folds} (image i in fold i % {n_folds})",
               "solvers": ", ".join(solvers), "bin widths": ", ".join(map(str, bin_widths)),
               "metrics": f"PSNR, SSIM on {'Y' if y_channel else 'RGB'}, crop border {crop_border}",
               "lsq shrinkage": "chosen by nested cross-validation on the training folds (default 1e3 with one training fold)"}
    return Plan(f"{n_folds}-fold cross-validation of {', '.join(solvers)}", details, execute)
