"""What a command may write: ensir-flow's own kinds of target, and where a target may be.

Every command resolves its paths once, on the client, before anything is planned (`absolute`):
a relative local path becomes absolute, since workers of a cluster resolve relative paths against
their own working folders; URLs (s3://, memory://, ...) are left as they are.

Three rules keep a command from destroying what it should not:

- `--overwrite` replaces only what ensir-flow wrote and recognises as the kind of target the
  command writes (`kind_of`, `refuse_replacing`): a pixel store (ingest, predict), a LUT (fit, lut
  import), an apply output, an export folder of marked PNGs, a report folder, a `lut export`
  file, the demo folder. Anything else (a plain folder or file, a store of another kind) is
  refused, naming it and what it is. The writers check again under their lock, just before they
  replace the target (`commit.staged_output`), so a target swapped meanwhile is not deleted.
- No command writes to a path equal to, inside or containing one of its inputs, or another of its
  own outputs (`refuse_overlap`): local paths are compared resolved through symbolic links
  (`os.path.realpath`), URLs as normalised text.
- A target that is a symbolic link is refused (`refuse_link`), never written through and never
  replaced: replacing the link would leave what it points to stale, and writing through it would
  replace data found elsewhere than the path named. Name the real target instead.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Mapping

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ensir_flow.errors import InputError

PIXEL_STORE = "an ensir-flow pixel store (ingest, predict)"
APPLY_OUTPUT = "an ensir-flow apply output"
LUT = "an ensir-flow LUT"
EXPORT_FOLDER = "a folder of PNGs exported by ensir-flow"
REPORT_FOLDER = "an ensir-flow report folder"
LUT_FILE = "a LUT file written by `ensir-flow lut export`"
DEMO_FOLDER = "an ensir-flow demo folder"

#: The command of a store's `created_by` attribute ("ensir-flow X.Y COMMAND") -> the kind it makes.
KIND_OF_COMMAND = {"ingest": PIXEL_STORE, "predict": PIXEL_STORE, "apply": APPLY_OUTPUT, "fit": LUT}
#: What the demo writes in its folder, which `pipelines.demo.plan_demo` names its paths from.
DEMO_ENTRIES = frozenset(
    {
        "corpus",
        "models",
        "reference",
        "heldout",
        "corpus.zarr",
        "reference.zarr",
        "heldout.zarr",
        "lut.zarr",
        "ensemble.zarr",
        "ensemble-png",
        "ensir-flow-demo.json",
    }
)
#: The file the demo writes first in its folder, which tells its folder from a user's that holds
#: entries of the same names (a `corpus/` of their own images, say).
DEMO_MARK = "ensir-flow-demo.json"
#: The keys every file of `lut export` carries (in its JSON object, or the NPZ's `metadata`).
LUT_FILE_KEYS = frozenset({"format_version", "models", "bin_width", "bin_index", "fit_status_meanings", "sha256"})
#: What a writer leaves beside its target (`sibling`): staging, a retired copy, its lock.
SIBLING = re.compile(r"^\..+\.(partial|replaced|lock)$")
#: The attribute of a resumable output's staging (`.NAME.partial`) saying that its arrays are
#: written in place, under the target itself, which has no root `zarr.json` until the commit
#: (`resumable.resumable_location`): what is there is that run's, not a target.
WRITTEN_IN_PLACE = "written_in_place"
#: The footer of every report page (`ensir_flow.report.page`).
REPORT_FOOTER = "Made by ensir-flow "


def is_url(path) -> bool:
    return "://" in str(path)


def sibling(root: str, tag: str) -> str:
    """`.NAME.tag` beside `root` (a path as fsspec strips it): where a writer of `root` keeps its
    staging (`partial`), its retired copy (`replaced`) or its lock (`lock`)."""
    parent, _, name = root.rstrip("/").rpartition("/")
    return f"{parent}/.{name}.{tag}" if parent else f".{name}.{tag}"


def staged_in_place(fs, root: str) -> bool:
    """Whether `root` (object storage) holds no store but the arrays of a resumable output being
    written in place, not yet committed: no root `zarr.json`, and a staging beside it that says
    so (`WRITTEN_IN_PLACE`). Such a prefix is no target: no reader finds a store there, and the
    run that wrote it resumes it or removes it (`resumable.resumable_marks`)."""
    if isinstance(fs, LocalFileSystem):
        return False
    fs.invalidate_cache(root)  # s3fs answers from listings it cached, which the commit's write outdates
    if fs.exists(f"{root}/zarr.json"):
        return False
    try:
        attrs = json.loads(fs.cat_file(f"{sibling(root, 'partial')}/zarr.json")).get("attributes") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return attrs.get(WRITTEN_IN_PLACE) is True


def as_location(fs, path: str, like: str) -> str:
    """`path` (as fsspec strips it) in the form of `like`: a URL if `like` is one."""
    return fs.unstrip_protocol(path) if is_url(like) else path


def absolute(path):
    """`path` as every worker reads it: a local path made absolute (symbolic links kept, so that
    a link is still seen as one); a URL, or None, as it is."""
    if path is None or is_url(path):
        return path
    return os.path.abspath(os.fspath(path))


def resolved(path) -> str:
    """Where `path` really is: a local path through every symbolic link; a URL normalised (its
    scheme in lower case, no repeated or trailing slashes)."""
    text = str(path)
    if not is_url(text):
        return os.path.realpath(text)
    scheme, _, rest = text.partition("://")
    return f"{scheme.lower()}://{re.sub('/+', '/', rest).rstrip('/')}"


def _relation(output: str, other: str) -> str | None:
    """How the resolved `output` lies against the resolved `other`: 'is', 'lies inside', 'contains' or None."""
    if output == other:
        return "is"
    if output.startswith(other.rstrip("/") + "/"):
        return "lies inside"
    if other.startswith(output.rstrip("/") + "/"):
        return "contains"
    return None


def refuse_overlap(outputs: Mapping[str, object], inputs: Mapping[str, object]) -> None:
    """Refuse, in one line naming both paths, an output (label -> path; None: not given) that is,
    lies inside or contains one of the `inputs` (label -> path) or another of the `outputs`. Paths
    are named as given (relative ones are resolved against the working folder)."""
    named = [(label, path) for label, path in outputs.items() if path is not None]
    read = [(label, path) for label, path in inputs.items() if path is not None]
    for position, (label, path) in enumerate(named):
        where = resolved(path)
        for other_label, other in [*((f"input {name}", other) for name, other in read), *named[position + 1 :]]:
            relation = _relation(where, resolved(other))
            if relation is not None:
                raise InputError(
                    f"{path}: the {label} {relation} the {other_label} {other}; a command never writes onto "
                    f"what it reads or writes: name another {label}"
                )


def refuse_link(path) -> None:
    """Refuse a target that is a symbolic link (see the module's docstring)."""
    if not is_url(path) and os.path.islink(path):
        raise InputError(
            f"{path}: is a symbolic link (to {os.readlink(path)}); ensir-flow neither replaces links nor "
            f"writes through them: name the real target ({os.path.realpath(path)})"
        )


def check_target(path, kind: str, overwrite: bool) -> None:
    """Before any work: refuse a target that is a symbolic link, or that `overwrite` would replace
    while it is not `kind` (one of this module's kinds). A target that exists without `overwrite`
    is left to the command (it may be the finished output of the same run: 'unchanged')."""
    refuse_link(path)
    if overwrite:
        refuse_replacing(path, kind)


def replaced_half_way(fs, root: str) -> bool:
    """Whether a run replacing the Zarr store at `root` on object storage was killed half-way
    through its move (`commit._finish_interrupted_replacement`): its retired copy `.NAME.replaced`
    is complete (its root `zarr.json` is written last) while the target has no root `zarr.json`
    (the old one's goes first when it is moved aside; the new one's comes last)."""
    if isinstance(fs, LocalFileSystem):
        return False
    return fs.exists(f"{sibling(root, 'replaced')}/zarr.json") and not fs.exists(f"{root}/zarr.json")


def refuse_replacing(path, kind: str | None = None) -> None:
    """Refuse to replace the existing target `path` unless ensir-flow wrote it and it is of `kind`
    (None: any of ensir-flow's kinds); the message names it and says what it is. A target whose
    replacement was killed half-way is judged by its retired copy, which the next writer puts
    back (`replaced_half_way`)."""
    fs, root = fsspec.core.url_to_fs(str(path))
    if not fs.exists(root) and not (not is_url(path) and os.path.islink(path)):
        return
    if staged_in_place(fs, root):
        return
    if replaced_half_way(fs, root):
        path = as_location(fs, sibling(root, "replaced"), str(path))
    found = kind_of(path)
    if found is not None and (kind is None or found == kind):
        return
    wanted = "ensir-flow's own output" if kind is None else kind
    raise InputError(
        f"{path}: is {found or describe(path)}, not {wanted}; refusing to replace it (move it away, or name another output)"
    )


def describe(path) -> str:
    """What `path` is, in words, when ensir-flow does not recognise it as its own."""
    if not is_url(path) and os.path.islink(path):
        return f"a symbolic link (to {os.readlink(path)})"
    fs, root = fsspec.core.url_to_fs(str(path))
    if fs.isdir(root):
        if fs.exists(f"{root.rstrip('/')}/zarr.json"):
            return "a Zarr store that ensir-flow did not write"
        if not _entries(fs, root):
            return "an empty folder"
        from .export import first_foreign_entry

        entry = first_foreign_entry(fs, root.rstrip("/"))
        return "a folder that ensir-flow did not write" + (f" (it holds {entry!r})" if entry else "")
    if not is_url(path) and not os.path.isfile(path):
        return "neither a file nor a folder"
    return "a file that ensir-flow did not write"


def kind_of(path) -> str | None:
    """Which of ensir-flow's kinds of target `path` is, or None (not one, or not ensir-flow's).

        Zarr stores by the `created_by` attribute of their root metadata (a LUT also by its own
        attributes: `lut import` writes `imported_from`); an export folder holds PNG files only, each
        with the export's mark; a report folder an `index.html` with the report's footer and its PNG
        figures; a `lut export` file is a JSON object, or an NPZ with a `metadata` entry, holding
        `LUT_FILE_KEYS`; the demo folder holds only what the demo writes there, its `DEMO_MARK` first.

    An export folder is recognised only if every PNG in it carries the mark, and the demo folder by
    its mark file, never by names alone: a folder of a user's images with one exported PNG copied
    in, or a user's `corpus/` and `models/`, is not ensir-flow's to replace."""
    if not is_url(path) and os.path.islink(path):
        return None
    fs, root = fsspec.core.url_to_fs(str(path))
    root = root.rstrip("/") or root
    try:
        if fs.isdir(root):
            return _folder_kind(fs, root)
        if fs.isfile(root):
            return LUT_FILE if _is_lut_file(fs, root) else None
    except (OSError, ValueError):
        return None
    return None


def _entries(fs, root: str) -> list[dict]:
    return [{**entry, "base": entry["name"].rstrip("/").rpartition("/")[2]} for entry in fs.ls(root, detail=True)]


def _store_kind(fs, root: str) -> str | None:
    try:
        attrs = json.loads(fs.cat_file(f"{root}/zarr.json")).get("attributes") or {}
    except (OSError, ValueError, AttributeError):
        return None
    made_by = str(attrs.get("created_by", "")).split()
    if len(made_by) == 3 and made_by[0] == "ensir-flow" and made_by[2] in KIND_OF_COMMAND:
        return KIND_OF_COMMAND[made_by[2]]
    if "imported_from" in attrs and {"bin_width", "solver", "models"} <= set(attrs):
        return LUT
    return None


def _folder_kind(fs, root: str) -> str | None:
    if fs.exists(f"{root}/zarr.json"):
        return _store_kind(fs, root)
    entries = [entry for entry in _entries(fs, root) if not SIBLING.match(entry["base"])]
    if not entries:
        return None
    names = {entry["base"] for entry in entries}
    files = all(entry.get("type") == "file" and not entry.get("islink") for entry in entries)
    if files and all(name.lower().endswith(".png") for name in names):
        from .export import carries_mark

        return EXPORT_FOLDER if all(carries_mark(fs, entry["name"]) for entry in entries) else None
    if files and "index.html" in names and all(name == "index.html" or name.lower().endswith(".png") for name in names):
        with fs.open(f"{root}/index.html", "rb") as page:
            return REPORT_FOLDER if REPORT_FOOTER.encode() in page.read() else None
    if (
        names <= DEMO_ENTRIES
        and _is_demo_mark(fs, f"{root}/{DEMO_MARK}")
        and all(_store_kind(fs, f"{root}/{name}") is not None for name in names if name.endswith(".zarr"))
    ):
        return DEMO_FOLDER
    return None


def demo_mark() -> str:
    """What the demo writes in its `DEMO_MARK` file."""
    import ensir_flow

    return json.dumps({"created_by": f"ensir-flow {ensir_flow.__version__} demo"})


def _is_demo_mark(fs, path: str) -> bool:
    try:
        made_by = str(json.loads(fs.cat_file(path)).get("created_by", "")).split()
    except (OSError, ValueError, AttributeError):
        return False
    return len(made_by) == 3 and made_by[0] == "ensir-flow" and made_by[2] == "demo"


def _is_lut_file(fs, root: str) -> bool:
    with fs.open(root, "rb") as file:
        head = file.read(2)
        file.seek(0)
        if head == b"PK":
            with zipfile.ZipFile(file) as archive:
                if "metadata.npy" not in archive.namelist():
                    return False
                import numpy as np

                with archive.open("metadata.npy") as entry:
                    metadata = json.loads(str(np.lib.format.read_array(entry, allow_pickle=False)))
        elif head[:1] == b"{":
            metadata = json.loads(file.read())
        else:
            return False
    return isinstance(metadata, dict) and LUT_FILE_KEYS <= set(metadata)
