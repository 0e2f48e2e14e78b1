"""Evaluate: PSNR and SSIM of every base model, the plain average and the ensemble, per image."""

import math
from dataclasses import dataclass

import dask
import numpy as np

from ensir_flow import metrics, schema
from ensir_flow.blend import average
from ensir_flow.errors import InputError

from .plan import Plan
from .storage import open_store

AVERAGE = "average"
ENSEMBLE = "ensemble"


def image_scores(predictions, truth, ensemble, height: int, width: int, names: list[str],
                 crop_border: int, y_channel: bool) -> dict:
    """PSNR and SSIM of each model, the average (and the ensemble if given) for one image."""
    shape = (height, width, -1)
    truth = np.asarray(truth).reshape(shape)
    candidates = {name: np.asarray(p).reshape(shape) for name, p in zip(names, predictions)}
    candidates[AVERAGE] = average(np.asarray(predictions)).reshape(shape)
    if ensemble is not None:
        candidates[ENSEMBLE] = np.asarray(ensemble).reshape(shape)
    options = {"crop_border": crop_border, "y_channel": y_channel}
    return {
        "psnr": {name: metrics.psnr(image, truth, **options) for name, image in candidates.items()},
        "ssim": {name: metrics.ssim(image, truth, **options) for name, image in candidates.items()},
    }


@dataclass
class Evaluation:
    """Per-image scores and their means over images."""

    images: list[str]
    per_image: list[dict]
    options: dict

    def means(self, metric: str) -> dict[str, float]:
        names = self.per_image[0][metric].keys()
        return {name: float(np.mean([scores[metric][name] for scores in self.per_image])) for name in names}

    def to_json(self) -> dict:
        return {
            "images": len(self.images),
            "psnr": self.means("psnr"),
            "ssim": self.means("ssim"),
            "options": self.options,
            "per_image": [{"image": stem, **scores} for stem, scores in zip(self.images, self.per_image)],
        }

    def table(self) -> str:
        """Mean PSNR/SSIM per method, best single model and ensemble gains underneath."""
        psnr, ssim = self.means("psnr"), self.means("ssim")
        width = max(len(name) for name in psnr)
        lines = [f"{len(self.images)} images, {'Y channel' if self.options['y_channel'] else 'RGB'}, crop border {self.options['crop_border']}",
                 f"{'method'.ljust(width)}  {'PSNR (dB)':>9}  {'SSIM':>6}"]
        lines += [f"{name.ljust(width)}  {psnr[name]:9.3f}  {ssim[name]:6.4f}" for name in psnr]
        singles = {k: v for k, v in psnr.items() if k not in (AVERAGE, ENSEMBLE)}
        best = max(singles, key=singles.get)
        if ENSEMBLE in psnr and math.isfinite(psnr[ENSEMBLE]):
            lines.append(f"ensemble vs best single model ({best}): {psnr[ENSEMBLE] - singles[best]:+.3f} dB; "
                         f"vs average: {psnr[ENSEMBLE] - psnr[AVERAGE]:+.3f} dB")
        return "\n".join(lines)


def plan_evaluate(store: str, ensemble_store: str | None = None, y_channel: bool = False, crop_border: int = 0) -> Plan:
    """Plan scoring every image of the reference store (and of an `apply` output, if given)."""
    ds = open_store(store)
    models = schema.check_store(ds, store, require=(schema.PREDICTION, schema.GROUND_TRUTH))
    index = schema.ImageIndex.from_dataset(ds)
    ensemble = None
    if ensemble_store is not None:
        ens = open_store(ensemble_store)
        schema.check_store(ens, ensemble_store, require=(schema.ENSEMBLE,))
        other = schema.ImageIndex.from_dataset(ens)
        if other.stems != index.stems or not np.array_equal(other.counts, index.counts):
            raise InputError(f"{ensemble_store}: its images (names or sizes) differ from those of {store}")
        ensemble = ens[schema.ENSEMBLE].data
    predictions, truth = ds[schema.PREDICTION].data, ds[schema.GROUND_TRUTH].data
    tasks = [
        dask.delayed(image_scores, pure=True)(
            predictions[:, off: off + n], truth[off: off + n], None if ensemble is None else ensemble[off: off + n],
            int(h), int(w), models, crop_border, y_channel)
        for h, w, off, n in zip(index.heights, index.widths, index.offsets, index.counts)
    ]
    options = {"y_channel": y_channel, "crop_border": crop_border}

    def execute(compute):
        return Evaluation(index.stems, list(compute(*tasks, label="evaluate")), options)

    details = {"store": str(store), "ensemble": str(ensemble_store) if ensemble_store else "none (models and average only)",
               "images": len(index.stems), "metrics": f"PSNR, SSIM on {'Y' if y_channel else 'RGB'}, crop border {crop_border}"}
    return Plan(f"evaluate {len(index.stems)} images", details, execute)
