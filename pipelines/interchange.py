"""Moving LUTs in and out of ensir-flow: import the paper's .pth files, export NPZ or JSON."""

import json

import fsspec
import numpy as np

from ensir_flow.errors import InputError
from ensir_flow.fit_status import FLAG_MEANINGS
from ensir_flow.lut import Lut, read_paper_lut

from .commit import refuse_existing, staged_output
from .lut_io import read_lut, write_lut

EXPORT_FORMATS = (".npz", ".json")
#: Largest integer every JSON reader holds exactly (JSON numbers are often parsed as doubles).
JSON_EXACT_INTEGER = 2**53


def import_paper_lut(source: str, output: str, models: list[str], bin_width: int, overwrite: bool = False) -> Lut:
    """Convert a LUT published with the paper's code (.pth, safe loader only) into a LUT store."""
    refuse_existing(output, overwrite)
    lut = read_paper_lut(source, models, bin_width)
    with staged_output(output, overwrite) as staging:
        write_lut(lut, staging)
    return lut


def export_lut(lut_path: str, output: str, overwrite: bool = False) -> None:
    """Write a LUT as NPZ (arrays + metadata) or JSON (nested lists), by `output`'s extension.

    Both carry the store's layout (format version 2): models (LUT order), bin_width, bin_index (the
    flat-index rule), the stored bins' bin_digits [bin][model] (and flat index bin where it fits 64
    bits, and in JSON only where every such index is at most 2^53), weights [bin][channel][model],
    count [bin][channel], fit_status [bin][channel] and its meanings, and fallback_weights
    [channel][model] for every cell of a bin not stored. The file is written beside `output` and
    moved into place when complete (`staged_output`).
    """
    extension = next((e for e in EXPORT_FORMATS if str(output).endswith(e)), None)
    if extension is None:
        raise InputError(f"{output}: export format unknown; name it *.npz or *.json")
    refuse_existing(output, overwrite)
    lut = read_lut(lut_path)
    ds = lut.to_dataset()
    metadata = {
        "format_version": ds.attrs["format_version"],
        "models": lut.models,
        "bin_width": lut.bin_width,
        "solver": lut.solver,
        "bin_index": ds.attrs["bin_index"],
        "fit_status_meanings": FLAG_MEANINGS.split(),
        "fallback_fit_status": lut.fallback_status,
        "sha256": lut.digest(),
    }
    arrays = {
        "bin_digits": lut.bin_digits,
        "weights": lut.bin_weights,
        "count": lut.bin_count,
        "fit_status": lut.bin_status,
        "fallback_weights": lut.fallback,
    }
    if "bin" in ds.coords:
        arrays["bin"] = ds["bin"].values
    with staged_output(output, overwrite) as staging, fsspec.open(staging, "wb") as file:
        if extension == ".npz":
            np.savez_compressed(file, **arrays, metadata=np.array(json.dumps(metadata)))
        else:
            if "bin" in arrays and len(arrays["bin"]) and int(arrays["bin"].max()) > JSON_EXACT_INTEGER:
                del arrays["bin"]  # readers parse JSON numbers as doubles: bin_digits say the same exactly
                metadata["bin_omitted"] = "flat bin indices above 2^53 are not exact as JSON numbers; use bin_digits"
            file.write(json.dumps({**metadata, **{name: array.tolist() for name, array in arrays.items()}}).encode())
