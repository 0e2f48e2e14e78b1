"""Reading what a store or LUT is (`info`), and moving LUTs in and out of ensir-flow."""

import json

import fsspec
import numpy as np

from ensir_flow import schema
from ensir_flow.errors import InputError
from ensir_flow.fit_status import FLAG_MEANINGS, FitStatus
from ensir_flow.lut import Lut, read_paper_lut

from .storage import open_store, read_lut, refuse_existing, staged_output, write_dataset

EXPORT_FORMATS = (".npz", ".json")


def describe(path: str) -> dict:
    """What `path` holds and what made it: kind, sizes, models and every provenance attribute."""
    ds = open_store(path)
    attrs = {key: value for key, value in ds.attrs.items()}
    if "weights" in ds:
        lut = Lut.from_dataset(ds.load(), source=str(path))
        status = np.bincount(lut.fit_status.reshape(-1).astype(np.int64), minlength=len(FitStatus))
        return {"path": str(path), "kind": "lut", "models": lut.models, "bin_width": lut.bin_width, "solver": lut.solver,
                "bins": int(lut.weights.shape[0]), "channels": lut.n_channels,
                "cells_with_reference_pixels": int((lut.count > 0).sum()), "reference_pixels": int(lut.count.sum()),
                "fit_status": {name: int(n) for name, n in zip(FLAG_MEANINGS.split(), status) if n},
                "sha256": lut.digest(), "attributes": attrs}
    models = schema.check_store(ds, str(path), require=())
    kind = "ensemble" if schema.ENSEMBLE in ds else "corpus"
    summary = {"path": str(path), "kind": kind, "models": models, "images": int(ds.sizes["image"]),
               "pixels": int(ds.sizes["pixel"]), "channels": int(ds.sizes["channel"]),
               "ground_truth": schema.GROUND_TRUTH in ds,
               "compression": schema.compression_of(ds[schema.ENSEMBLE if kind == "ensemble" else schema.PREDICTION].encoding),
               "attributes": attrs}
    if "source_sha256" in ds:
        summary["sources"] = {
            str(source): {str(stem): {"file": str(name), "sha256": str(digest)}
                          for stem, name, digest in zip(ds["image"].values, ds["source_file"].sel(source=source).values,
                                                        ds["source_sha256"].sel(source=source).values)}
            for source in ds["source"].values
        }
    return summary


def format_description(summary: dict) -> str:
    """The human form of `describe`."""
    skip = {"attributes", "sources", "path", "kind"}
    lines = [f"{summary['path']}: {summary['kind']}"]
    lines += [f"  {key}: {value}" for key, value in summary.items() if key not in skip]
    lines += [f"  {key}: {value}" for key, value in summary["attributes"].items() if key not in summary]
    if "sources" in summary:
        files = sum(len(per_stem) for per_stem in summary["sources"].values())
        lines.append(f"  sources: {files} files with SHA-256 ({', '.join(summary['sources'])}; --json lists them)")
    return "\n".join(lines)


def import_paper_lut(source: str, output: str, models: list[str], bin_width: int, overwrite: bool = False) -> Lut:
    """Convert a LUT published with the paper's code (.pth, safe loader only) into a LUT store."""
    refuse_existing(output, overwrite)
    lut = read_paper_lut(source, models, bin_width)
    with staged_output(output, overwrite) as staging:
        write_dataset(lut.to_dataset(), staging).compute()
    return lut


def export_lut(lut_path: str, output: str, overwrite: bool = False) -> None:
    """Write a LUT as NPZ (arrays + metadata) or JSON (nested lists), by `output`'s extension.

    Both carry: models (LUT order), bin_width, bin_index (the flat-index rule), weights
    [bin][channel][model], count [bin][channel], fit_status [bin][channel] and its meanings.
    """
    extension = next((e for e in EXPORT_FORMATS if str(output).endswith(e)), None)
    if extension is None:
        raise InputError(f"{output}: export format unknown; name it *.npz or *.json")
    refuse_existing(output, overwrite)
    lut = read_lut(lut_path)
    ds = lut.to_dataset()
    metadata = {"models": lut.models, "bin_width": lut.bin_width, "solver": lut.solver, "bin_index": ds.attrs["bin_index"],
                "fit_status_meanings": FLAG_MEANINGS.split(), "sha256": lut.digest()}
    with fsspec.open(str(output), "wb") as file:
        if extension == ".npz":
            np.savez_compressed(file, weights=lut.weights, count=lut.count, fit_status=lut.fit_status,
                                metadata=np.array(json.dumps(metadata)))
        else:
            file.write(json.dumps({**metadata, "weights": lut.weights.tolist(), "count": lut.count.tolist(),
                                   "fit_status": lut.fit_status.tolist()}).encode())
