"""Fit: one pass of per-chunk statistics, a tree reduction, then EM on the reduced table."""

import dask

import ensir_flow
from ensir_flow import schema
from ensir_flow.binning import bin_count
from ensir_flow.devices import resolve_device
from ensir_flow.lut import fit_lut
from ensir_flow.stats import chunk_statistics, merge

from .plan import Plan
from .storage import open_store, refuse_existing, staged_output, write_dataset

SOLVERS = ("em",)
MERGE_FAN_IN = 8


def tree_reduce(parts: list, combine, fan_in: int = MERGE_FAN_IN):
    """Combine delayed parts in a tree of `fan_in`-way merges (bounded memory per merge task)."""
    while len(parts) > 1:
        parts = [dask.delayed(combine, pure=True)(*parts[i: i + fan_in]) for i in range(0, len(parts), fan_in)]
    return parts[0]


def statistics_graph(ds, bin_width: int, device: str = "cpu"):
    """Delayed merged CellStatistics of a store's prediction/ground-truth pairs."""
    predictions = ds[schema.PREDICTION].data
    truth = ds[schema.GROUND_TRUTH].data.rechunk({0: predictions.chunks[1]})
    parts = [
        dask.delayed(chunk_statistics, pure=True)(p, g, bin_width, device)
        for p, g in zip(predictions.to_delayed().reshape(-1), truth.to_delayed().reshape(-1))
    ]
    return tree_reduce(parts, merge)


def plan_fit(store: str, lut_path: str, bin_width: int = 32, solver: str = "em",
             device: str = "auto", overwrite: bool = False) -> Plan:
    """Plan fitting a LUT on the reference store `store` (which must hold ground truth).

    `device` is where the statistics tasks run ('auto' resolved on each worker) and where EM runs
    (resolved here); the LUT is the same bits on any device.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r} (choose from {', '.join(SOLVERS)})")
    refuse_existing(lut_path, overwrite)
    ds = open_store(store)
    models = schema.check_store(ds, store, require=(schema.PREDICTION, schema.GROUND_TRUTH))
    total = statistics_graph(ds, bin_width, device)
    em_device = resolve_device(device)

    def execute(compute):
        (statistics,) = compute(total, label="statistics")
        lut = fit_lut(statistics, models, em_device)
        lut.attrs.update({"created_by": f"ensir-flow {ensir_flow.__version__} fit", "reference_store": str(store),
                          "reference_images": int(ds.sizes["image"])})
        with staged_output(lut_path, overwrite) as staging:
            compute(write_dataset(lut.to_dataset(), staging), label="write LUT")
        return lut

    n_bins = bin_count(len(models), bin_width)
    details = {
        "store": str(store), "LUT": str(lut_path), "models": ", ".join(models), "solver": solver,
        "bin width": f"{bin_width} ({n_bins:,} bins x {ds.sizes['channel']} channels)",
        "statistics tasks": f"{ds[schema.PREDICTION].data.numblocks[1]} chunks, merged {MERGE_FAN_IN} at a time",
        "devices": f"statistics on {device}, EM batched on {em_device}",
    }
    return Plan(f"fit an EnsIR LUT on {ds.sizes['image']} reference images", details, execute)
