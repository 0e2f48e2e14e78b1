"""Moving LUTs in and out of ensir-flow: import the paper's .pth files, export NPZ or JSON."""

import hashlib
import io
import json
import zipfile

import fsspec
import numpy as np

from ensir_flow.errors import InputError
from ensir_flow.fit_status import FLAG_MEANINGS
from ensir_flow.lut import Lut, read_paper_lut

from .commit import exists, refuse_existing, staged_output
from .lut_io import read_lut, write_lut
from .stores import open_group_as_committed
from .targets import refuse_link

EXPORT_FORMATS = (".npz", ".json")
#: Largest integer every JSON reader holds exactly (JSON numbers are often parsed as doubles).
JSON_EXACT_INTEGER = 2**53


#: LUT attribute: the digest of what `lut import` made it from (`import_inputs`).
IMPORT_INPUTS = "import_inputs"


def import_paper_lut(source: str, output: str, models: list[str], bin_width: int, overwrite: bool = False) -> tuple[Lut, str]:
    """Convert a LUT published with the paper's code (.pth, safe loader only) into a LUT store:
    the LUT and 'written', or 'unchanged' where `output` is already the LUT this import makes (it
    records `import_inputs`: e.g. the import run again)."""
    inputs = import_inputs(source, models, bin_width)
    if not overwrite and inputs is not None and _recorded_import_inputs(output) == inputs:
        return read_lut(output), "unchanged"
    refuse_existing(output, overwrite)
    lut = read_paper_lut(source, models, bin_width)
    lut.attrs[IMPORT_INPUTS] = inputs
    with staged_output(output, overwrite) as staging:
        write_lut(lut, staging)
    return lut, "written"


def import_inputs(source: str, models: list[str], bin_width: int) -> str | None:
    """The digest of what an import makes its LUT from: the bytes of the .pth file, the models it
    is read for, in order, and the bin width (None: the file cannot be read, which reading it as
    a LUT then reports)."""
    try:
        with fsspec.open(source, "rb") as file:
            content = hashlib.sha256(file.read()).hexdigest()
    except OSError:
        return None
    return hashlib.sha256(repr((content, list(models), int(bin_width))).encode()).hexdigest()


def _recorded_import_inputs(path: str) -> str | None:
    """The `import_inputs` recorded by the LUT at `path`, if `lut import` wrote one there."""
    if not exists(path):
        return None
    try:
        return open_group_as_committed(str(path)).attrs.get(IMPORT_INPUTS)
    except Exception:  # noqa: BLE001 - anything unreadable there is not this import's LUT
        return None


def export_lut(lut_path: str, output: str, overwrite: bool = False) -> str:
    """Write a LUT as NPZ (arrays + metadata) or JSON (nested lists), by `output`'s extension:
    'written', or 'unchanged' where `output` already holds what this export writes (`_same_file`:
    e.g. the export run again), so that running it again is not an error.

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
    refuse_link(output)
    lut = read_lut(lut_path)
    contents = _lut_file(lut, extension)
    if not overwrite and exists(output) and _same_file(output, contents, extension):
        return "unchanged"
    refuse_existing(output, overwrite)
    with staged_output(output, overwrite) as staging, fsspec.open(staging, "wb") as file:
        file.write(contents)
    return "written"


def _lut_file(lut: Lut, extension: str) -> bytes:
    """The bytes of `lut`'s export file in the format of `extension` (see `export_lut`)."""
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
    if extension == ".npz":
        file = io.BytesIO()
        np.savez_compressed(file, **arrays, metadata=np.array(json.dumps(metadata)))
        return file.getvalue()
    if "bin" in arrays and len(arrays["bin"]) and int(arrays["bin"].max()) > JSON_EXACT_INTEGER:
        del arrays["bin"]  # readers parse JSON numbers as doubles: bin_digits say the same exactly
        metadata["bin_omitted"] = "flat bin indices above 2^53 are not exact as JSON numbers; use bin_digits"
    return json.dumps({**metadata, **{name: array.tolist() for name, array in arrays.items()}}).encode()


def _same_file(path: str, contents: bytes, extension: str) -> bool:
    """Whether the file at `path` holds `contents`: a JSON byte for byte; an NPZ entry for entry,
    each entry's bytes (the archive's own bytes differ from run to run: it stamps every entry with
    the time it was written)."""
    try:
        with fsspec.open(path, "rb") as file:
            found = file.read()
    except (OSError, ValueError):
        return False
    if extension == ".json":
        return found == contents
    entries = _npz_entries(found)
    return entries is not None and entries == _npz_entries(contents)


def _npz_entries(contents: bytes) -> dict[str, bytes] | None:
    """The entries of an NPZ archive by name, each as its uncompressed bytes (None: not an archive)."""
    try:
        with zipfile.ZipFile(io.BytesIO(contents)) as archive:
            return {name: archive.read(name) for name in archive.namelist()}
    except (zipfile.BadZipFile, OSError, ValueError):
        return None
