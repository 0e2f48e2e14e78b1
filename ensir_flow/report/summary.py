"""The numbers of an evaluation summary (`Evaluation.to_json()`) that the report shows: methods and per-image gains."""

import math
from dataclasses import dataclass

import numpy as np

from ensir_flow.blend import AVERAGE, ENSEMBLE


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


def per_image_gains(summary: dict, method: str, reference: str) -> np.ndarray:
    """PSNR of `method` minus that of `reference`, image by image (NaN where both are infinite)."""
    with np.errstate(invalid="ignore"):
        return np.array([e["psnr"][method] - e["psnr"][reference] for e in summary["per_image"]], dtype=float)


def worst_and_best(gains: np.ndarray) -> list[tuple[str, int]]:
    """('worst', position) and ('best', position) of the smallest and largest finite gain; only 'worst' when they coincide."""
    order = np.argsort(gains, kind="stable")  # NaN last: a NaN gain is neither the best nor the worst
    finite = [i for i in order if math.isfinite(gains[i])] or list(order)
    return [("worst", finite[0])] if finite[0] == finite[-1] else [("worst", finite[0]), ("best", finite[-1])]
