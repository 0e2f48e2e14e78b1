"""`info`: what a store or LUT holds and what made it (sizes, models, provenance)."""

import numpy as np

from ensir_flow import schema
from ensir_flow.fit_status import FLAG_MEANINGS, FitStatus
from ensir_flow.lut import Lut

from .integrity import CHUNK_CHECKSUMS
from .stores import open_store


def describe(path: str) -> dict:
    """What `path` holds and what made it: kind, sizes, models and every provenance attribute."""
    ds = open_store(path)
    attrs = {key: value for key, value in ds.attrs.items()}
    if "weights" in ds:
        lut = Lut.from_dataset(ds.load(), source=str(path))
        status = [int(n) for n in np.bincount(lut.bin_status.reshape(-1).astype(np.int64), minlength=len(FitStatus))]
        status[lut.fallback_status] += (lut.n_bins - len(lut.bin_digits)) * lut.n_channels  # cells of bins not stored
        return {
            "path": str(path),
            "kind": "lut",
            "models": lut.models,
            "bin_width": lut.bin_width,
            "solver": lut.solver,
            "bins": lut.n_bins,
            "bins_stored": len(lut.bin_digits),
            "channels": lut.n_channels,
            "cells_with_reference_pixels": lut.filled_cells,
            "reference_pixels": int(lut.bin_count.sum()),
            "fit_status": {name: int(n) for name, n in zip(FLAG_MEANINGS.split(), status) if n},
            "sha256": lut.digest(),
            "attributes": attrs,
        }
    models = schema.check_store(ds, str(path), require=())
    kind = "ensemble" if schema.ENSEMBLE in ds else "corpus"
    summary = {
        "path": str(path),
        "kind": kind,
        "models": models,
        "images": int(ds.sizes["image"]),
        "pixels": int(ds.sizes["pixel"]),
        "channels": int(ds.sizes["channel"]),
        "ground_truth": schema.GROUND_TRUTH in ds,
        "chunks_verified": (
            "by their XXH3-64 hashes"
            if CHUNK_CHECKSUMS in ds
            else "for presence only (written before chunk hashes: write the store again to verify its contents)"
        ),
        "compression": schema.compression_of(ds[schema.ENSEMBLE if kind == "ensemble" else schema.PREDICTION].encoding),
        "attributes": attrs,
    }
    if "source_sha256" in ds:
        summary["sources"] = {
            str(source): {
                str(stem): {"file": str(name), "sha256": str(digest)}
                for stem, name, digest in zip(
                    ds["image"].values, ds["source_file"].sel(source=source).values, ds["source_sha256"].sel(source=source).values
                )
            }
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
