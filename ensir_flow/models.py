"""Base models as files: loading them safely, and running one on an image (whole or in tiles).

What `ensir-flow predict` runs on its workers; no Dask and no stores here.

Model files are `torch.export` programs (`.pt2`, from `torch.export.save`) or TorchScript archives
(`torch.jit.save`: deprecated by torch, still loaded, and torch's deprecation warning is not passed
on to a user who has nothing to change while the file loads). Both are zip archives that hold
pickles, and unpickling can run code: `torch.jit.load` unpickles with TorchScript's own (C++)
unpickler, which only builds tensors and TorchScript classes, but `torch.export.load` unpickles
weights and constants with `torch.load(weights_only=False)` and `pickle.loads` (torch 2.13,
`torch/export/pt2_archive/_package.py`). So every file is checked before torch sees it
(`check_model_file`): it must be a zip archive of one of the two kinds, and every pickle in it
(nested archives included) may name only the globals that `torch.load(weights_only=True)` allows,
TorchScript's own `__torch__` classes and `torch.jit._pickle` helpers; the check reads the
pickles' opcodes, it never unpickles. A plain pickle or a `torch.save` checkpoint is refused.

Each process keeps the models it loaded (`loaded_model`), keyed by (path, SHA-256, device), so a
worker loads each model once, however many images it runs; the least recently used are dropped
when the next would not fit in half of the device's memory.
"""

import hashlib
import io
import pickletools
import threading
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError, first_line
from .images import file_sha256

#: Scales of a model's input and output pixels, by the names `--range` takes: what 255 becomes.
VALUE_RANGES = {"0-1": 255.0, "0-255": 1.0}

#: What torch.jit.load warns on every call (torch 2.13: deprecated; Python 3.14: unsupported).
TORCHSCRIPT_LOAD_WARNING = r"`torch\.jit\.load` is "

#: Globals TorchScript's unpickler resolves itself (never imported as Python): its classes and helpers.
TORCHSCRIPT_PREFIXES = ("__torch__.", "torch.jit._pickle.")

#: Opcodes that push a string argument on the unpickler's stack (module and name of STACK_GLOBAL).
_STRING_OPCODES = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}
_MEMO_GETS = {"GET", "BINGET", "LONG_BINGET"}
_MEMO_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}
_MARK = object()
_UNKNOWN = object()


@dataclass(frozen=True)
class ModelFile:
    """A base model: its name (as a member of the ensemble), file and the file's SHA-256."""

    name: str
    path: str
    sha256: str


def _allowed_globals() -> set[str]:
    """'module.name' of every global `torch.load(weights_only=True)` may build."""
    from torch import _weights_only_unpickler

    return set(_weights_only_unpickler._get_allowed_globals())


def _pickle_globals_problem(data: bytes, allowed: set[str]) -> str | None:
    """Why the pickle `data` could run code when unpickled, or None: a global outside `allowed`,
    one named by values this reading cannot know, or an extension-registry reference. The stack is
    followed opcode by opcode (pickletools' stack effects) so that STACK_GLOBAL's operands are the
    strings the unpickler would really use. A pickle that does not parse is a problem too."""
    stack, memo = [], {}
    try:
        for opcode, argument, _ in pickletools.genops(data):
            name = opcode.name
            if name in ("GLOBAL", "INST"):
                module, _, attribute = str(argument).partition(" ")
                found = f"{module}.{attribute}"
            elif name == "STACK_GLOBAL":
                module, attribute = (stack[-2] if len(stack) > 1 else _UNKNOWN), (stack[-1] if stack else _UNKNOWN)
                if not (isinstance(module, str) and isinstance(attribute, str)):
                    return "a global named by computed values"
                found = f"{module}.{attribute}"
            elif name.startswith("EXT"):
                return "a reference to the copyreg extension registry"
            else:
                found = None
            if found is not None and found not in allowed and not found.startswith(TORCHSCRIPT_PREFIXES):
                return f"a reference to {found}"
            if name in _MEMO_PUTS or name == "MEMOIZE":  # the top of the stack is remembered, not moved
                memo[len(memo) if name == "MEMOIZE" else argument] = stack[-1] if stack else _UNKNOWN
                continue
            _pop(stack, opcode)
            for pushed in opcode.stack_after:
                if pushed is pickletools.markobject:
                    stack.append(_MARK)
                elif name in _STRING_OPCODES:
                    stack.append(argument if isinstance(argument, str) else argument.decode("latin-1"))
                elif name in _MEMO_GETS:
                    stack.append(memo.get(argument, _UNKNOWN))
                else:
                    stack.append(_UNKNOWN)
    except (ValueError, KeyError, IndexError, UnicodeDecodeError) as error:
        return f"a pickle that does not parse ({error})"
    return None


def _pop(stack: list, opcode) -> None:
    """Remove what `opcode` takes from the stack: everything down to the topmost mark where it takes
    a stack slice, and its other operands."""
    before = opcode.stack_before
    if pickletools.stackslice in before:
        while stack and stack.pop() is not _MARK:
            pass
        del stack[len(stack) - before.index(pickletools.markobject) :]
    elif before:
        del stack[max(0, len(stack) - len(before)) :]


def _looks_like_pickle(data: bytes) -> bool:
    return len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5


def _archive_problem(archive: zipfile.ZipFile, allowed: set[str], depth: int = 0) -> str | None:
    """The first member of `archive` (nested archives included) that could run code, and why.
    Only members that are pickles or archives are read whole (not the tensors' bytes)."""
    for member in archive.namelist():
        with archive.open(member) as file:
            head = file.read(4)
        if not (head.startswith(b"PK\x03\x04") or member.endswith("pkl") or _looks_like_pickle(head)):
            continue
        data = archive.read(member)
        if data.startswith(b"PK\x03\x04") and depth < 2:
            with zipfile.ZipFile(io.BytesIO(data)) as nested:
                problem = _archive_problem(nested, allowed, depth + 1)
        elif member.endswith("pkl") or _looks_like_pickle(data):
            problem = _pickle_globals_problem(data, allowed)
            if problem and problem.startswith("a pickle that does not parse") and not member.endswith("pkl"):
                problem = None  # raw tensor bytes that happen to start like a pickle: torch does not unpickle them
        else:
            problem = None
        if problem:
            return f"{member} holds {problem}"
    return None


def model_kind(names: list[str]) -> str | None:
    """'export' or 'torchscript' for the members of a zip archive, or None for any other zip."""
    if any(name.endswith("archive_format") or name.endswith("serialized_exported_program.json") for name in names):
        return "export"
    if any(name.endswith("/data.pkl") for name in names) and any("/code/" in name for name in names):
        return "torchscript"
    return None


def check_model_file(path, content: io.BytesIO | None = None) -> str:
    """Refuse, with an InputError naming `path`, a file that is not a torch.export program or a
    TorchScript archive (a damaged or truncated one included), or that holds a pickle naming a
    global outside what torch's safe loaders build; return its kind ('torchscript' or 'export').
    Nothing in the file is run or unpickled. `content`: the file's bytes already read (checked
    instead of reading `path`)."""
    source = path if content is None else content
    if content is None and not Path(path).is_file():
        raise InputError(f"{path}: {'not a file' if Path(path).exists() else 'model file not found'}")
    if not zipfile.is_zipfile(source):
        if _head(source).startswith(b"PK\x03\x04"):
            raise InputError(f"{path}: a damaged or truncated zip archive, not a loadable model; copy or save it again")
        raise InputError(
            f"{path}: not a torch.export program or TorchScript archive (a plain pickle? refused: loading "
            "it could run code); save the model with torch.export.save"
        )
    with zipfile.ZipFile(source) as archive:
        kind = model_kind(archive.namelist())
        if kind is None:
            raise InputError(
                f"{path}: a zip archive but neither a torch.export program nor TorchScript (a torch.save "
                "checkpoint? refused: it needs the model's Python code); save the model with "
                "torch.export.save"
            )
        problem = _archive_problem(archive, _allowed_globals())
    if problem:
        raise InputError(f"{path}: refused, loading it could run code: {problem}")
    return kind


def _head(source) -> bytes:
    """The first four bytes of a path or a bytes buffer (left at its start)."""
    if isinstance(source, io.BytesIO):
        return source.getvalue()[:4]
    with open(source, "rb") as file:
        return file.read(4)


def _load(model: ModelFile, device: str):
    """Load `model` onto `device`, in evaluation mode. The file is read once: its bytes are hashed
    (a file changed since the run was planned is refused), checked and handed to torch, so what
    torch loads is what was checked."""
    import torch

    content = Path(model.path).read_bytes()
    if hashlib.sha256(content).hexdigest() != model.sha256:
        raise InputError(f"{model.path}: model '{model.name}' changed while the run was under way; run it again")
    kind = check_model_file(model.path, io.BytesIO(content))
    try:
        if kind == "torchscript":
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=TORCHSCRIPT_LOAD_WARNING, category=DeprecationWarning)
                module = torch.jit.load(io.BytesIO(content), map_location=device)
        else:
            module = torch.export.load(io.BytesIO(content)).module().to(device)
    except Exception as error:  # noqa: BLE001 - whatever torch raises on a file it cannot load
        raise InputError(f"{model.path}: model '{model.name}' cannot be loaded ({first_line(error)})") from None
    if hasattr(module, "eval") and kind == "torchscript":
        module.eval()
    return module


def _module_bytes(module) -> int:
    """Bytes of a loaded model's parameters and buffers."""
    tensors = [*module.parameters(), *module.buffers()] if hasattr(module, "parameters") else []
    return sum(t.numel() * t.element_size() for t in tensors)


def _memory_budget(device: str) -> int:
    """How many bytes of models a process keeps loaded on `device`: half of its memory."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_properties(torch.device(device)).total_memory // 2
    import psutil

    return psutil.virtual_memory().total // 2


class _ModelCache:
    """The models this process loaded, least recently used first, within `_memory_budget`."""

    def __init__(self):
        self.models: OrderedDict[tuple, tuple] = OrderedDict()
        self.loads = 0
        self.lock = threading.Lock()

    def get(self, model: ModelFile, device: str):
        key = (model.path, model.sha256, device)
        with self.lock:
            if key in self.models:
                self.models.move_to_end(key)
                return self.models[key][0]
            module = _load(model, device)
            size, budget = _module_bytes(module), _memory_budget(device)
            while self.models and sum(s for _, s in self.models.values()) + size > budget:
                self.models.popitem(last=False)
            self.models[key] = (module, size)
            self.loads += 1
            return module


_CACHE = _ModelCache()


def loaded_model(model: ModelFile, device: str):
    """`model` loaded on `device`, from this process's cache (loaded and checked on first use)."""
    return _CACHE.get(model, device)


def models_loaded() -> int:
    """How many model loads this process has done (a worker loads each model once)."""
    return _CACHE.loads


def model_file(name: str, path) -> ModelFile:
    """A ModelFile for `path`, checked (`check_model_file`) and hashed. The path is made absolute:
    workers elsewhere read it there (a shared file system), whatever their working folder."""
    check_model_file(path)
    return ModelFile(name, str(Path(path).resolve()), file_sha256(path))


def sample_seed(stem: str, sample: int) -> int:
    """The random seed of sample `sample` of image `stem`: the same on every run and machine."""
    return int.from_bytes(hashlib.sha256(f"{stem}\0{sample}".encode()).digest()[:8], "big") >> 1


@dataclass(frozen=True)
class Inference:
    """How to run a model on an image: where, in which value range, at which scale, in tiles of
    `tile` pixels overlapping by `overlap` (None: whole images), `batch` tiles per call."""

    device: str = "cpu"
    value_range: str = "0-1"
    scale: int = 1
    tile: int | None = None
    overlap: int = 0
    batch: int = 1


def tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Along one axis of `length` pixels: (start, stop) of each tile read and (start, stop) of the
    part of its output kept. The kept parts cover the axis once, and each lies at least `overlap`
    pixels inside its tile except where the tile reaches the image's edge, so it sees all the
    context a model whose receptive field reaches `overlap` pixels needs: it equals the model's
    whole-image output there. Every tile is `tile` long (the last one is widened inwards) unless
    the axis is shorter: one shape to batch, and none smaller than a model exported for sizes from
    `tile` accepts."""
    if tile <= 2 * overlap:
        raise ValueError(f"tile {tile} leaves no centre with overlap {overlap} on each side (tile > 2 x overlap)")
    spans, start = [], 0
    while start < length:
        read_stop = min(length, max(0, start - overlap) + tile)
        keep_stop = length if read_stop == length else read_stop - overlap
        spans.append((max(0, min(start - overlap, read_stop - tile)), read_stop, start, keep_stop))
        start = keep_stop
    return spans


_RNG_LOCK = threading.Lock()


def predict_image(module, image: np.ndarray, how: Inference, seed: int, label: str) -> np.ndarray:
    """Run `module` on the uint8 image (H, W, C); return its output as uint8 (H*s, W*s, C), rounded
    half up and clipped as a PNG writer would store it.

    Torch's global random generators are seeded with `seed` and the whole image runs under one
    lock, so a stochastic model draws the same numbers whatever the other threads do (TorchScript
    models draw from the global generators). A model that raises, returns another shape or channel
    count, values that are not floating point (an integer tensor is not in the value range the
    model was given: uint8 0..255 read as 0..1 would saturate every pixel), or NaN/inf, is an
    InputError naming `label` (model and image)."""
    import torch

    height, width, channels = image.shape
    s = how.scale
    x = torch.from_numpy(np.ascontiguousarray(image)).to(how.device).permute(2, 0, 1)[None].float()
    x = x / VALUE_RANGES[how.value_range]
    out = torch.empty((channels, height * s, width * s), dtype=torch.uint8, device=how.device)
    if how.tile is None:
        jobs = [((0, height, 0, height), (0, width, 0, width))]
    else:
        jobs = [
            (rows, cols)
            for rows in tile_spans(height, how.tile, how.overlap)
            for cols in tile_spans(width, how.tile, how.overlap)
        ]
    if how.device.startswith("cuda"):  # the same bytes on every run: no algorithm chosen by timing
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    with _RNG_LOCK, torch.inference_mode():
        torch.manual_seed(seed)  # every device's generators
        for group in _batches(jobs, how.batch):
            (r0, r1, _, _), (c0, c1, _, _) = group[0]
            tiles = torch.cat([x[..., rows[0] : rows[1], cols[0] : cols[1]] for rows, cols in group])
            try:
                result = module(tiles)
            except Exception as error:  # noqa: BLE001 - a model's failure, whatever it is
                raise InputError(f"{label}: the model failed ({_model_error(error)})") from None
            expected = (len(group), channels, (r1 - r0) * s, (c1 - c0) * s)
            if not isinstance(result, torch.Tensor) or tuple(result.shape) != expected:
                got = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
                raise InputError(
                    f"{label}: the model returned {got} for an input of {tuple(tiles.shape)}, expected "
                    f"{expected}"
                    + (f" (--scale {s})" if s != 1 else "")
                    + (
                        " (wrong channel count)"
                        if isinstance(result, torch.Tensor) and result.ndim == 4 and result.shape[1] != channels
                        else ""
                    )
                )
            if not result.is_floating_point():
                raise InputError(
                    f"{label}: the model returned {result.dtype} values, expected floating point in "
                    f"0..{255 // int(VALUE_RANGES[how.value_range])} (--range {how.value_range}); "
                    "return a float tensor"
                )
            if not torch.isfinite(result).all():
                raise InputError(f"{label}: the model returned NaN or infinite values")
            for k, (rows, cols) in enumerate(group):
                keep = result[
                    k, :, (rows[2] - rows[0]) * s : (rows[3] - rows[0]) * s, (cols[2] - cols[0]) * s : (cols[3] - cols[0]) * s
                ]
                out[:, rows[2] * s : rows[3] * s, cols[2] * s : cols[3] * s] = _to_uint8(keep, how.value_range)
    return out.permute(1, 2, 0).contiguous().cpu().numpy()


def _to_uint8(values, value_range: str):
    """A model's float output as the uint8 a PNG of it holds: scaled to 0..255, rounded half up, clipped."""
    import torch

    return torch.floor(values.float() * VALUE_RANGES[value_range] + 0.5).clamp_(0, 255).to(torch.uint8)


def _batches(jobs: list, size: int) -> list[list]:
    """Consecutive tiles of one shape, at most `size` per group (a model call takes one shape)."""
    groups: list[list] = []
    for job in jobs:
        shape = (job[0][1] - job[0][0], job[1][1] - job[1][0])
        last = groups[-1] if groups else None
        if last and len(last) < size and (last[0][0][1] - last[0][0][0], last[0][1][1] - last[0][1][0]) == shape:
            last.append(job)
        else:
            groups.append([job])
    return groups


def _model_error(error: BaseException) -> str:
    """What a model's exception says, on one line: TorchScript's interpreter puts its own header
    first and the model's message (e.g. 'builtins.RuntimeError: boom') last."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if lines and lines[0].startswith("The following operation failed in the TorchScript interpreter"):
        return lines[-1]
    return lines[0] if lines else type(error).__name__
