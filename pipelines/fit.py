"""Fit: one pass of per-chunk statistics, a tree reduction, then a solver on the reduced table."""

import dask

import ensir_flow
from ensir_flow import schema
from ensir_flow.binning import DEFAULT_BIN_WIDTH, bin_count
from ensir_flow.devices import resolve_device
from ensir_flow.lsq import SHRINKAGE_GRID, choose_shrinkage
from ensir_flow.lut import DEFAULT_SOLVER, check_solver, fit_lut, moments_for
from ensir_flow.stats import ALL_MOMENTS, fold_statistics, merge, merge_folds

from .chunks import (MERGE_FAN_IN, Span, chunk_ranges, chunk_spans, image_folds, pixel_array, pixel_chunk_lengths, read_pixels,
                     task_argument, tree_reduce)
from .plan import Plan
from .storage import open_store_index, refuse_existing, staged_output, write_lut

SHRINKAGE_FOLDS = 5
#: Used by lsq when there is a single reference image, so nothing to hold out.
DEFAULT_SHRINKAGE = 1e3


def _chunk_statistics(predictions, truth, start: int, stop: int, bin_width: int, spans: list[Span], n_folds: int,
                      device: str, moments_kind: str) -> list:
    """One task: read a chunk of the arrays of predictions and ground truth, return its statistics per fold."""
    return fold_statistics(read_pixels(predictions, start, stop), read_pixels(truth, start, stop), bin_width, spans,
                           n_folds, device, moments_kind)


def statistics_graph(store: str, ds, bin_width: int, device: str = "cpu", n_folds: int = 1, moments_kind: str = ALL_MOMENTS):
    """Delayed list of merged CellStatistics (moments of `moments_kind`), one per fold of images,
    of the store `store` (opened as `ds` by `open_store` or `open_store_index`, with ground truth):
    one task per chunk, then a tree of merges."""
    index = schema.ImageIndex.from_dataset(ds)
    spans = chunk_spans(index.offsets, index.counts, image_folds(len(index.stems), n_folds), pixel_chunk_lengths(ds))
    predictions, truth = (task_argument(pixel_array(store, name)) for name in (schema.PREDICTION, schema.GROUND_TRUTH))
    parts = [dask.delayed(_chunk_statistics, pure=True)(predictions, truth, start, stop, bin_width, chunk, n_folds, device,
                                                        moments_kind)
             for (start, stop), chunk in zip(chunk_ranges(ds), spans)]
    return tree_reduce(parts, merge_folds)


def lut_from_folds(fold_statistics: list, models: list[str], device: str, solver: str, shrinkage: float | None = None):
    """Fit on the union of the folds. For lsq with `shrinkage=None`, the strength with the lowest
    held-out error over the folds is used (with a single fold there is nothing to hold out:
    DEFAULT_SHRINKAGE); the choice is recorded in the LUT's attributes."""
    provenance = {}
    if solver == "lsq" and shrinkage is None:
        if len(fold_statistics) > 1:
            shrinkage, errors = choose_shrinkage(fold_statistics)
            pixel_channels = sum(f.n_pixels for f in fold_statistics)
            provenance["shrinkage_choice"] = f"{len(fold_statistics)}-fold cross-validation by image over {list(SHRINKAGE_GRID)}"
            provenance["shrinkage_held_out_mse"] = {str(k): v / pixel_channels for k, v in errors.items()}
        else:
            shrinkage = DEFAULT_SHRINKAGE
            provenance["shrinkage_choice"] = "default: a single fold of reference images, nothing to hold out"
    lut = fit_lut(merge(*fold_statistics), models, device, solver, 0.0 if shrinkage is None else shrinkage)
    lut.attrs.update(provenance)
    return lut


def plan_fit(store: str, lut_path: str, bin_width: int = DEFAULT_BIN_WIDTH, solver: str = DEFAULT_SOLVER,
             device: str = "auto", overwrite: bool = False, shrinkage: float | None = None) -> Plan:
    """Plan fitting a LUT on the reference store `store` (which must hold ground truth).

    `device` is where the statistics tasks run ('auto' resolved on each worker) and where EM runs
    (resolved here); the LUT is the same bits on any device. For `lsq`, `shrinkage=None` picks the
    strength by cross-validation over images (folds gathered in the same single pass).
    """
    check_solver(solver)
    refuse_existing(lut_path, overwrite)
    ds = open_store_index(store)
    models = schema.check_store(ds, store, require=(schema.PREDICTION, schema.GROUND_TRUTH))
    n_images = ds.sizes["image"]
    n_folds = min(SHRINKAGE_FOLDS, n_images) if solver == "lsq" and shrinkage is None and n_images > 1 else 1
    folds = statistics_graph(store, ds, bin_width, device, n_folds, moments_for([solver]))
    em_device = resolve_device(device)

    def execute(compute):
        (fold_statistics,) = compute(folds, label="statistics")
        lut = lut_from_folds(fold_statistics, models, em_device, solver, shrinkage)
        lut.attrs.update({"created_by": f"ensir-flow {ensir_flow.__version__} fit", "reference_store": str(store),
                          "reference_images": int(n_images)})
        with staged_output(lut_path, overwrite) as staging:
            compute(dask.delayed(write_lut)(lut, staging), label="write LUT")
        return lut

    n_bins = bin_count(len(models), bin_width)
    details = {
        "store": str(store), "LUT": str(lut_path), "models": ", ".join(models), "solver": solver,
        "bin width": f"{bin_width} ({n_bins:,} bins x {ds.sizes['channel']} channels)",
        "statistics tasks": f"{len(pixel_chunk_lengths(ds))} chunks, merged {MERGE_FAN_IN} at a time"
                            + (f", kept in {n_folds} folds of images" if n_folds > 1 else ""),
        "devices": f"statistics on {device}, EM batched on {em_device}",
    }
    if solver == "lsq":
        details["shrinkage"] = f"{shrinkage}" if shrinkage is not None else f"chosen by {n_folds}-fold cross-validation"
    return Plan(f"fit a {solver} LUT on {n_images} reference images", details, execute)
