"""Export: one lossless PNG per image of a pixel store, one task per batch of images.

Each task reads the pixels of a batch of consecutive images (`batches.consecutive_runs`: tens of MB,
or one larger image) once, every chunk checked against its checksum, and encodes each image
at the zlib level asked (`--png-compression`, level 1 by default: the same pixels as any other
level, encoded several times faster than level 6) straight into its file
(`ensir_flow.images.write_png`), so batches are encoded in parallel on the scheduler in use. A
store replaced or changed during the export is refused before the folder is moved into place.

The export folder is written as a whole: staged beside it, then moved into place. Two things are
never done, whatever the store holds or the options say:
- writing outside the folder: every stem of the store is checked (`ensir_flow.images.check_stem`)
  before anything is written, since a store can be crafted (a stem `../../x` is refused);
- deleting what ensir-flow did not write: `--overwrite` replaces an existing folder only when it
  holds nothing but files an export writes, i.e. `<stem>.png` for this store's stems, or PNGs that
  carry ensir-flow's export mark (the tEXt chunk `Software: ensir-flow ... export` every exported
  PNG has, so an export of another store is recognised too). Any other entry (a file, a folder, a
  link) refuses the run, naming it; nothing is deleted.

`check_export_target` makes every check that needs no computation, so that `apply` can run it
before computing anything.
"""

import os

import dask
import fsspec
import numpy as np
import xarray as xr
from fsspec.implementations.local import LocalFileSystem

import ensir_flow
from ensir_flow import schema
from ensir_flow.errors import InputError
from ensir_flow.images import DEFAULT_PNG_COMPRESSION, check_stem, png_text, printable, write_png

from .batches import chunk_reads, consecutive_runs, pixel_range
from .chunks import PixelSource, pixel_array, read_pixels, task_argument
from .commit import staged_output, staged_update
from .executor import Compute
from .integrity import refuse_changed, store_identity
from .plan import Plan, Stage
from .stores import open_store
from .targets import EXPORT_FOLDER, refuse_link, refuse_replacing

#: tEXt keyword of the mark every exported PNG carries, and the prefix of its value.
MARK_KEY, MARK_PREFIX = "Software", "ensir-flow"
#: How much of a PNG is read to find the mark (ours is written right after the header).
MARK_BYTES = 4096


def export_text(store, variable: str) -> dict[str, str]:
    """The tEXt chunks of an exported PNG: ensir-flow's mark, the store and the variable it shows."""
    return {MARK_KEY: f"{MARK_PREFIX} {ensir_flow.__version__} export", "Source": str(store), "Variable": variable}


def _export_images(source: PixelSource, layout: np.ndarray, paths: list, text: dict | None, compression: int) -> None:
    """One task: read the pixels of a batch of consecutive images once (each chunk checked:
    `chunks.read_pixels`) and write each image's PNG; `layout` holds (offset, height, width) per image."""
    start, stop = int(layout[0, 0]), int(layout[-1, 0] + layout[-1, 1] * layout[-1, 2])
    pixels = read_pixels(source, start, stop)
    for (offset, height, width), path in zip(layout.tolist(), paths):
        image = pixels[offset - start : offset - start + height * width]
        try:
            write_png(path, image.reshape(height, width, -1), text, compression)
        except OSError as error:  # a full disk names no file: name the PNG, in the export folder's staging
            if error.filename is not None:
                raise
            raise OSError(error.errno, error.strerror or str(error), str(path)) from None


def _batches(index: schema.ImageIndex, channels: int, first_image: int) -> list[range]:
    """The images from `first_image` on, in the batches export's tasks write (`batches.consecutive_runs`)."""
    return [
        range(first_image + images.start, first_image + images.stop)
        for images in consecutive_runs(index.counts[first_image:], channels)
    ]


def export_graph(
    store: str,
    ds: xr.Dataset,
    variable: str,
    directory,
    text: dict | None = None,
    first_image: int = 0,
    compression: int = DEFAULT_PNG_COMPRESSION,
) -> list:
    """Delayed writes of one lossless PNG per image of `variable` of `store` (opened as `ds`) from
    `first_image` on, named by stem (each checked), at zlib level `compression`: one task per
    batch of consecutive images (`batches.consecutive_runs`)."""
    index = schema.ImageIndex.from_dataset(ds)
    source = task_argument(pixel_array(store, variable))
    layout = np.stack([index.offsets, index.heights, index.widths], axis=1).astype(np.int64)
    return [
        dask.delayed(_export_images, pure=True)(
            source,
            layout[images.start : images.stop],
            [f"{directory}/{check_stem(index.stems[i], directory)}.png" for i in images],
            text,
            compression,
        )
        for images in _batches(index, ds.sizes["channel"], first_image)
    ]


def export_stages(ds: xr.Dataset, variable: str = schema.ENSEMBLE, first_image: int = 0) -> list[Stage]:
    """The stage of exporting `variable` of a store (opened, or planned, as `ds`) from `first_image`
    on, as `export` runs it: one task per batch (`export_graph`), the chunks and bytes they read,
    and the bytes of pixels they encode."""
    index = schema.ImageIndex.from_dataset(ds)
    channels = ds.sizes["channel"]
    batches = _batches(index, channels, first_image)
    ranges = [pixel_range(index.offsets, index.counts, images) for images in batches]
    chunks, pixels = chunk_reads(ranges, ds[variable].chunks[-2][0], ds.sizes["pixel"])
    return [Stage("export PNGs", len(batches), chunks, pixels * channels, int(index.counts[first_image:].sum()) * channels)]


def plan_export(
    store: str,
    directory: str,
    variable: str = schema.ENSEMBLE,
    overwrite: bool = False,
    compression: int = DEFAULT_PNG_COMPRESSION,
) -> Plan:
    """Plan writing every image of `variable` of `store` as a PNG into `directory` (`export`):
    refused before anything runs when the store lacks the variable or holds one image per model."""
    ds = open_store(store)
    schema.check_store(ds, store, require=(variable,))
    if "model" in ds[variable].dims:
        raise InputError(
            f"{store}: '{variable}' holds one image per model; export writes '{schema.ENSEMBLE}', "
            f"'{schema.GROUND_TRUTH}' or '{schema.INPUT}'"
        )
    n_images = ds.sizes["image"]

    def execute(compute) -> int:
        export(store, directory, compute, overwrite, variable, compression=compression)
        return n_images

    details = {"store": store, "variable": variable, "directory": directory}
    return Plan(f"export {n_images} images", details, execute, stages=export_stages(ds, variable))


def check_export_target(directory, stems, overwrite: bool, source=None) -> None:
    """Refuse, before any work, an export of images named `stems` into `directory` that could not
    complete or would do harm: a stem that is not a plain file name (or is used twice); a
    `directory` that is a symbolic link (`targets.refuse_link`) or a file, that exists without
    `overwrite`, that holds anything but PNGs with the export's mark (the first such entry named: a
    folder of the store's images named as an export names them, such as a corpus's gt/, is not an
    export); a folder that cannot be created because a file stands in its path (or, on a
    local disk, because its parent cannot be written). `source` (the store) names the stems'
    origin in messages."""
    where = directory if source is None else source
    seen = set()
    for stem in stems:
        check_stem(stem, where)
        if stem in seen:
            raise InputError(
                f"{printable(where)}: image name {stem!r} is used by two images; their PNGs would overwrite each other"
            )
        seen.add(stem)
    refuse_link(directory)
    fs, root = fsspec.core.url_to_fs(str(directory))
    root = root.rstrip("/") or root
    if fs.exists(root):
        if not fs.isdir(root):
            raise InputError(f"{directory}: is a file, not a folder; refusing to export into it or to replace it")
        if not overwrite:
            raise InputError(f"{directory}: already exists (pass --overwrite to replace it)")
        foreign = first_foreign_entry(fs, root)
        if foreign is not None:
            raise InputError(
                f"{directory}: holds {foreign!r}, which ensir-flow's export did not write; "
                f"refusing to replace the folder (move that away, or export elsewhere)"
            )
        refuse_replacing(directory, EXPORT_FOLDER)
    ancestor = _nearest_existing(fs, _parent(root))
    if ancestor is not None:
        if not fs.isdir(ancestor):
            raise InputError(f"{directory}: cannot be created: {_location(fs, ancestor, directory)} is a file, not a folder")
        if isinstance(fs, LocalFileSystem) and not os.access(ancestor, os.W_OK | os.X_OK):
            raise InputError(f"{directory}: cannot be written: no permission to write in {ancestor}")


def first_foreign_entry(fs, root: str) -> str | None:
    """The first entry (by name) of the folder `root` that an export did not write, or None: one
    that is not a PNG carrying the export's mark (a PNG named as one of the store's images is not
    enough: a corpus's gt/ holds such PNGs)."""
    for entry in sorted(fs.ls(root, detail=True), key=lambda e: e["name"]):
        name = entry["name"].rstrip("/").rpartition("/")[2]
        if entry.get("type") != "file" or entry.get("islink"):
            return name + ("/" if entry.get("type") == "directory" else "")
        if not (name.lower().endswith(".png") and carries_mark(fs, entry["name"])):
            return name
    return None


def carries_mark(fs, path: str) -> bool:
    try:
        with fs.open(path, "rb") as file:
            head = file.read(MARK_BYTES)
    except OSError:
        return False
    return png_text(head).get(MARK_KEY, "").startswith(f"{MARK_PREFIX} ")


def _parent(path: str) -> str | None:
    parent = path.rstrip("/").rpartition("/")[0]
    return parent or None


def _nearest_existing(fs, path: str | None) -> str | None:
    """`path` or its nearest ancestor that exists (None when none of those named exists)."""
    while path is not None and not fs.exists(path):
        path = _parent(path)
    return path


def _location(fs, path: str, like) -> str:
    """`path` (an ancestor of `like` as fsspec strips it) spelt as the user spelt `like`."""
    text, root = str(like).rstrip("/"), fsspec.core.url_to_fs(str(like))[1].rstrip("/")
    suffix = root[len(path) :] if root.startswith(path) else None
    if suffix and text.endswith(suffix):
        return text[: -len(suffix)]
    return fs.unstrip_protocol(path) if "://" in str(like) else path


def export(
    store: str,
    directory: str,
    compute: Compute,
    overwrite: bool = False,
    variable: str = schema.ENSEMBLE,
    first_image: int = 0,
    compression: int = DEFAULT_PNG_COMPRESSION,
) -> None:
    """Write every image of `store` as PNG (zlib level `compression`) into `directory`, staged so it
    appears complete or not at all.

    Refused before anything is written when `check_export_target` refuses; checked again just
    before the folder is moved into place, so that nothing that appeared meanwhile is deleted.
    With `first_image` > 0, `directory` already holds the export of the images before it (an
    update after the store grew): only the images from `first_image` on are written, added to the
    folder in one step (`commit.staged_update`); the files already there are not rewritten.
    """
    planned = store_identity(store)
    ds = open_store(store)
    if variable not in ds:
        raise InputError(f"{store}: no '{variable}' variable to export")
    stems = schema.ImageIndex.from_dataset(ds).stems
    if first_image:
        check_export_target(directory, stems[:first_image], overwrite=True, source=store)
        with staged_update(str(directory)) as staging:
            compute(
                *export_graph(store, ds, variable, staging, export_text(store, variable), first_image, compression),
                label="export",
            )
            refuse_changed(store, planned)
        return
    check_export_target(directory, stems, overwrite, source=store)
    with staged_output(str(directory), overwrite) as staging:
        fs, root = fsspec.core.url_to_fs(staging)
        fs.makedirs(root, exist_ok=True)
        compute(
            *export_graph(store, ds, variable, staging, export_text(store, variable), compression=compression), label="export"
        )
        refuse_changed(store, planned)
        check_export_target(directory, stems, overwrite, source=store)
