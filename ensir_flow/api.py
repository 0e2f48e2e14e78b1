"""ensir-flow's Python API: the functions the command line itself calls, for notebooks and scripts.

    import ensir_flow

    ensir_flow.ingest("corpus/", "ref.zarr")
    ensir_flow.fit("ref.zarr", "lut.zarr", bin_width=32)
    ensir_flow.apply("ref.zarr", "lut.zarr", "out.zarr")
    scores = ensir_flow.evaluate("ref.zarr", ensemble="out.zarr").table   # a pandas DataFrame
    ds = ensir_flow.open_store("out.zarr")                                # an xarray Dataset
    first = ensir_flow.image(ds, 0)                                       # (H, W, C) uint8

Each command takes the options of its CLI command as keyword arguments, with the same defaults
and the same refusals (`--bin-width` is `bin_width=`); a keyword it does not know is a TypeError
naming it, as for any Python function. `config=` is the CLI's `--config`: an installed config's
name or a YAML file whose values are the defaults of the keywords not given. Each returns a
small result object: its status (`written`, `updated`, `resumed`, `unchanged`, `scored`, or
`planned` for `dry_run=True`), what it wrote, its counts and the seconds per stage; `to_json()`
is the CLI's `--json` object.

Where the work runs (`RunOptions`): on `client=` when given; else on the active
`dask.distributed.Client` when there is one (as other Dask code in a notebook does); else on
dask's threads in this process, unless `scheduler=` names a cluster: 'local' (a cluster sized to
this machine, started by the first call that asks for it and kept for the later ones until the
process ends; its dashboard link printed once on stderr), tcp://host:port or a scheduler file.
(The CLI's own default is $ENSIR_FLOW_SCHEDULER, else 'local'.) Progress is a bar on stderr
when it is a terminal, else timestamped lines, as the CLI shows it.

Bad input raises `errors.InputError` (one line naming the file and the problem), a retryable
failure `errors.TransientError`, conflicting options `UsageError`; nothing is then half-written.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict, Unpack

import numpy as np

from . import schema
from .binning import DEFAULT_BIN_WIDTH
from .errors import InputError
from .images import DEFAULT_PNG_COMPRESSION
from .lut import DEFAULT_PASS_MEMORY_MIB, DEFAULT_SOLVER, check_solver
from .pipelines.executor import DEFAULT_DASHBOARD_ADDRESS, DEFAULT_WORKER_TIMEOUT
from .solvers import REGISTRY

if TYPE_CHECKING:  # each command imports what it uses: evaluate, for one, needs no xarray
    import xarray as xr

    from .lut import Lut

#: Solvers `evaluate` always reports without fitting them (so `solvers=` need not name them).
ALWAYS_REPORTED = tuple(name for name, solver in REGISTRY.items() if solver.baseline)


class UsageError(ValueError):
    """Options that cannot go together or a malformed value (the CLI's exit 2); `option` names
    the CLI option at fault, when one is."""

    def __init__(self, message: str, option: str | None = None):
        super().__init__(message)
        self.option = option


class RunOptions(TypedDict, total=False):
    """Where and how a command runs: the CLI's shared options, keyword arguments of every command
    that computes (defaults in `RUN_DEFAULTS`).

    scheduler: where, when neither `client` nor an active distributed Client is there: None
        (default) dask's threads in this process; 'threads' the same; 'local' this process's
        local cluster (started once, reused by later calls); tcp://host:port or a scheduler file
        a running cluster (`--scheduler`, whose default is another: $ENSIR_FLOW_SCHEDULER, else
        'local').
    client: a `distributed.Client` to run on (wins over `scheduler`).
    progress: True (default) a bar on stderr when it is a terminal, else timestamped lines every
        30 s (for logs); a number of seconds the same, with lines at most that often
        (`--progress-interval`); False none (`--no-progress`).
    worker_timeout: on a cluster, give up (TransientError) when no worker has been connected for
        this many seconds; 0 or None: wait for ever (`--worker-timeout`, default 600).
    dashboard_address: where a local cluster serves its Dask dashboard (`--dashboard-address`,
        default 127.0.0.1:8787, another free port when taken; None: no dashboard).
    dry_run: describe what would be read, computed and written, and do nothing (`--dry-run`).
    """

    scheduler: str | None
    client: Any
    progress: bool | float
    worker_timeout: float | None
    dashboard_address: str | None
    dry_run: bool


#: The defaults of `RunOptions`, keyword by keyword.
RUN_DEFAULTS: RunOptions = {
    "scheduler": None,
    "client": None,
    "progress": True,
    "worker_timeout": DEFAULT_WORKER_TIMEOUT,
    "dashboard_address": DEFAULT_DASHBOARD_ADDRESS,
    "dry_run": False,
}


def _command(function):
    """`function`, a command, with the keywords of a Python function that knows them all: its own,
    `config=` (`config_defaults`) and, in place of its `**run: Unpack[RunOptions]`, each run
    option as a keyword of its own with its default (`RUN_DEFAULTS`), all in its signature (which
    the reference documentation shows). Any other keyword is a TypeError naming it: a misspelt
    option must not run the command with a default the caller did not choose."""
    signature = inspect.signature(function)
    own = [parameter for parameter in signature.parameters.values() if parameter.kind is not parameter.VAR_KEYWORD]
    runs = len(own) < len(signature.parameters)
    keyword = inspect.Parameter.KEYWORD_ONLY
    parameters = [*own, inspect.Parameter("config", keyword, default=None, annotation="str | os.PathLike | None")]
    if runs:
        parameters += [
            inspect.Parameter(
                name, keyword, default=RUN_DEFAULTS[name], annotation=getattr(annotation, "__forward_arg__", annotation)
            )
            for name, annotation in RunOptions.__annotations__.items()
        ]
    full = signature.replace(parameters=parameters)
    keywords = [name for name, parameter in full.parameters.items() if parameter.kind is not parameter.POSITIONAL_ONLY]

    @functools.wraps(function)
    def command(*args, **kwargs):
        for name in kwargs:
            if name not in keywords:
                close = difflib.get_close_matches(name, keywords, n=1)
                raise TypeError(
                    f"{function.__name__}() got an unexpected keyword argument {name!r}"
                    + (f" (did you mean {close[0]!r}?)" if close else "")
                )
        try:
            given = full.bind(*args, **kwargs).arguments
        except TypeError as error:
            raise TypeError(f"{function.__name__}() {error}") from None
        config = given.pop("config", None)
        defaults = config_defaults(function.__name__, config) if config is not None else {}
        values = {**defaults, **given}
        run = {name: values.pop(name) for name in RunOptions.__annotations__ if name in values}
        return function(**values, **run)

    command.__signature__ = full
    return command


def config_defaults(command: str, config) -> dict[str, Any]:
    """The keyword defaults that the task config `config` (an installed config's name or a YAML
    file: `config.load_config`) sets for `command`, as `--config` sets the CLI's option defaults
    (`config.command_defaults`); a config that cannot be used is a UsageError naming it."""
    from .config import command_defaults, load_config

    try:
        return command_defaults(load_config(config)).get(command, {})
    except InputError as error:
        raise UsageError(str(error), option="--config") from None


@dataclass(kw_only=True)
class Result:
    """What a command did: `status`, the paths it wrote (`outputs`), seconds per stage, and for
    `dry_run=True` the description of what it would do (`plan`, status 'planned') with its stages'
    tasks, chunks and bytes (`stages`, as `Stage.to_json`)."""

    command: str
    status: str
    outputs: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    plan: str | None = None
    stages: list[dict] = field(default_factory=list)

    def counts(self) -> dict[str, Any]:
        """The command's counts, as `--json` reports them."""
        return {}

    def to_json(self) -> dict[str, Any]:
        """The CLI's `--json` object: command, status, outputs, counts, seconds per stage."""
        if self.plan is not None:
            return {
                "command": self.command,
                "status": self.status,
                "outputs": self.outputs,
                "plan": self.plan,
                "stages": self.stages,
            }
        return {"command": self.command, "status": self.status, "outputs": self.outputs, **self.counts(), "seconds": self.seconds}


@dataclass(kw_only=True)
class Ingested(Result):
    """`ingest`: the store (`dataset`, lazy), its images, pixels and models; the chunks written
    (fewer than `chunks_total` when a killed run was resumed); for `append=True`, `images_added`."""

    dataset: xr.Dataset | None = field(default=None, repr=False)
    images: int = 0
    pixels: int = 0
    models: list[str] = field(default_factory=list)
    chunks_total: int = 0
    chunks_written: int = 0
    images_added: int | None = None

    def counts(self) -> dict[str, Any]:
        if self.images_added is not None:
            return {"images_added": self.images_added}
        return {
            "images": self.images,
            "pixels": self.pixels,
            "chunks_total": self.chunks_total,
            "chunks_written": self.chunks_written,
        }


@dataclass(kw_only=True)
class Predicted(Ingested):
    """`predict`: as `Ingested`, the store written as ingest writes one; `models` are the
    ensemble's members (each model's name, or NAME#0 ... NAME#N-1 with `samples=N`)."""


@dataclass(kw_only=True)
class Fitted(Result):
    """`fit`: the LUT written (`lut`), its bins, channels and cells that had reference pixels."""

    lut: Lut | None = field(default=None, repr=False)
    bins: int = 0
    channels: int = 0
    filled_cells: int = 0

    def counts(self) -> dict[str, Any]:
        return {"bins": self.bins, "channels": self.channels, "filled_cells": self.filled_cells}


@dataclass(kw_only=True)
class Applied(Result):
    """`apply`: the output store (`dataset`, lazy), its images, the new ones of an update, and the
    chunks computed of the total."""

    dataset: xr.Dataset | None = field(default=None, repr=False)
    images: int = 0
    images_added: int = 0
    chunks_total: int = 0
    chunks_computed: int = 0

    def counts(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "images_added": self.images_added,
            "chunks_total": self.chunks_total,
            "chunks_computed": self.chunks_computed,
        }


@dataclass(kw_only=True)
class Evaluated(Result):
    """`evaluate`: the scores (`evaluation`), as tables (`table`: mean PSNR/SSIM per method;
    `per_image`: one row per image and method), as the CLI's text (`text`), and the report page
    written, if any (`report`)."""

    evaluation: Any = field(default=None, repr=False)
    report: str | None = None

    @property
    def table(self):
        """Mean PSNR (dB) and SSIM per method (models, average, zzpm, ensemble or fitted solvers):
        a pandas DataFrame indexed by method."""
        import pandas as pd

        psnr, ssim = self.evaluation.means("psnr"), self.evaluation.means("ssim")
        return pd.DataFrame({"psnr": psnr, "ssim": ssim}).rename_axis("method")

    @property
    def per_image(self):
        """PSNR and SSIM per image and method (and the held-out fold under cross-validation): a
        pandas DataFrame with an (image, method) index."""
        import pandas as pd

        folds = self.evaluation.fold_of_image or [None] * len(self.evaluation.images)
        rows = [
            {
                "image": stem,
                "method": method,
                "psnr": scores["psnr"][method],
                "ssim": scores["ssim"][method],
                **({"fold": fold} if fold is not None else {}),
            }
            for stem, scores, fold in zip(self.evaluation.images, self.evaluation.per_image, folds)
            for method in scores["psnr"]
        ]
        return pd.DataFrame(rows).set_index(["image", "method"])

    @property
    def text(self) -> str:
        """The table the CLI prints."""
        return self.evaluation.table()

    def to_json(self) -> dict[str, Any]:
        if self.plan is not None:
            return super().to_json()
        return {"command": self.command, "status": self.status, **self.evaluation.to_json(), "seconds": self.seconds}


@dataclass(kw_only=True)
class Exported(Result):
    """`export`: one PNG per image written to `directory`."""

    directory: str = ""
    images: int = 0

    def counts(self) -> dict[str, Any]:
        return {"images": self.images}


@dataclass(kw_only=True)
class LutImported(Result):
    """`import_lut`: the LUT converted (`lut`), with its bins and channels."""

    lut: Lut | None = field(default=None, repr=False)

    def counts(self) -> dict[str, Any]:
        return {"bins": self.lut.n_bins, "channels": self.lut.n_channels}


@dataclass(kw_only=True)
class Demo(Result):
    """`demo`: the summary the demo prints (the held-out table and the cross-validation)."""

    summary: str = ""


# ---------------------------------------------------------------------------------------------
# Where plans run


def _active_client():
    """The distributed Client this process made current (`Client()` in a notebook), if any."""
    try:
        from distributed import default_client
    except ImportError:
        return None
    try:
        return default_client()
    except ValueError:
        return None


def _where(run: RunOptions) -> tuple[Any, str | None]:
    """(client, None) to run on a Client (`client=`, else with no `scheduler=` the active one),
    else (None, scheduler): `scheduler=`, by default 'threads'."""
    client, scheduler = run.get("client"), run.get("scheduler")
    if scheduler is not None and not isinstance(scheduler, str | os.PathLike):
        hint = " (a distributed Client goes in client=)" if type(scheduler).__name__ == "Client" else ""
        raise TypeError(
            "scheduler= takes 'threads', 'local', a scheduler's address or its scheduler file, "
            f"not a {type(scheduler).__name__}{hint}"
        )
    if client is not None and not hasattr(client, "scheduler"):
        raise TypeError(f"client= takes a distributed Client, not a {type(client).__name__} (an address goes in scheduler=)")
    if client is None and scheduler is None:
        client = _active_client()
    if client is not None:
        return client, None
    return None, os.fspath(scheduler) if scheduler else "threads"


@contextlib.contextmanager
def _compute(run: RunOptions) -> Iterator:
    """The `Compute` a command runs its plan with (see `RunOptions` for the choice). The library
    warnings and log records a run raises and nobody can act on are silenced first
    (`executor.quiet_libraries`), as the CLI silences them."""
    from .pipelines.executor import check_workers, compute_function, local_client, progress_on_stderr, quiet_libraries, session

    quiet_libraries()
    progress = progress_on_stderr(run.get("progress", RUN_DEFAULTS["progress"]))
    worker_timeout = run.get("worker_timeout", RUN_DEFAULTS["worker_timeout"]) or None
    dashboard_address = run.get("dashboard_address", RUN_DEFAULTS["dashboard_address"])
    client, scheduler = _where(run)
    if client is not None:
        address = client.scheduler.address
        check_workers(client, address, worker_timeout)
        yield compute_function(client, progress, worker_timeout, address)
    elif scheduler == "local":
        yield compute_function(local_client(dashboard_address), progress, worker_timeout, scheduler)
    else:
        with session(scheduler, progress, worker_timeout, dashboard_address) as compute:
            yield compute


def _timed(compute, seconds: dict):
    """`compute`, adding each labelled call's wall time to `seconds` (by label: the stages of --json)."""

    def timed(*collections, label: str = ""):
        start = time.perf_counter()
        try:
            return compute(*collections, label=label)
        finally:
            seconds[label or "compute"] = round(seconds.get(label or "compute", 0.0) + time.perf_counter() - start, 3)

    return timed


def _refuse_memory_on_a_cluster(locations, run: RunOptions) -> None:
    """A memory:// store exists in one process only: workers of a cluster would write it where
    nobody reads it back, so it is refused unless the run is on this process's threads."""
    in_memory = [str(path) for path in locations if path is not None and str(path).startswith("memory://")]
    if in_memory and _where(run)[1] != "threads":
        raise UsageError(
            f"{in_memory[0]}: memory:// exists in this process only; use --scheduler threads with it "
            "(scheduler='threads' in Python)"
        )


@dataclass
class Outcome:
    """A plan's return value, its seconds per stage, its description and stages when it was only
    planned, and the status it knew ahead (`Plan.status`)."""

    value: Any
    seconds: dict
    plan: str | None
    status: str | None = None
    stages: list[dict] = field(default_factory=list)


def run_plan(plan_factory, locations: Sequence, run: RunOptions, reads: Sequence = ()) -> Outcome:
    """Build the plan (which validates the inputs), then describe it (`dry_run`) or run it where
    `run` says. Every command runs its pipeline through here. `locations`: the stores and folders
    it reads or writes (None for an option not given); `reads`: the stores whose chunks it reads,
    each said on stderr if its chunks cannot be verified (`_say_unverified`)."""
    _refuse_memory_on_a_cluster(locations, run)
    plan = plan_factory()
    if plan.status != "unchanged":  # an output found already made reads nothing
        _say_unverified(reads)
    if run.get("dry_run"):
        return Outcome(None, {}, plan.describe(), plan.status, [stage.to_json() for stage in plan.stages])
    seconds: dict[str, float] = {}
    with _compute(run) as compute:
        return Outcome(plan.run(_timed(compute, seconds)), seconds, None, plan.status)


def _say_unverified(stores: Sequence) -> None:
    """Say on stderr, one line each, which of `stores` (None: not given) were written without
    chunk checksums (before ensir-flow recorded them): their chunks are checked for presence only,
    where those of every other store are checked against what their writer committed."""
    from .pipelines.integrity import CHUNK_CHECKSUMS
    from .pipelines.stores import open_group_as_committed

    for store in dict.fromkeys(str(store) for store in stores if store is not None):
        if CHUNK_CHECKSUMS not in open_group_as_committed(store):
            print(
                f"{store}: written without chunk checksums: its chunks are checked for presence only; write it "
                "again (the command that made it, with --overwrite) to have them verified",
                file=sys.stderr,
                flush=True,
            )


def _names(value: str | Sequence[str] | None) -> list[str] | None:
    """A list of names from a comma-separated string (the CLI's form) or a sequence."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value
    return [str(item).strip() for item in items if str(item).strip()]


def _written(paths) -> list[str]:
    return [str(path) for path in paths if path is not None]


def _check_targets(outputs: Mapping[str, tuple[Any, str]], inputs: Mapping[str, Any], overwrite: bool) -> None:
    """Before anything is planned: refuse an output (label -> (path, the kind of target written
    there)) that is, lies inside or contains an input (label -> path) or another output, that is a
    symbolic link, or that `overwrite` would replace while it is not that kind of ensir-flow
    output (`pipelines.targets`). Paths None (an option not given) are left out."""
    from .pipelines import targets

    targets.refuse_overlap({label: path for label, (path, _) in outputs.items()}, inputs)
    for path, kind in outputs.values():
        if path is not None:
            targets.check_target(path, kind, overwrite)


def _absolute(path):
    """`path` as every worker reads it (`pipelines.targets.absolute`): relative local paths made
    absolute, once, on the client; URLs and None as they are."""
    from .pipelines.targets import absolute

    return absolute(path)


# ---------------------------------------------------------------------------------------------
# Commands


@_command
def ingest(
    source_dir,
    store,
    *,
    models: str | Sequence[str] | None = None,
    chunk_pixels: int | None = None,
    append: bool = False,
    compression: str | None = None,
    overwrite: bool = False,
    **run: Unpack[RunOptions],
) -> Ingested:
    """Read the corpus folder `source_dir` (gt/, lq/, one folder per model) into the Zarr store
    `store` (`ensir-flow ingest`).

    `models`: the model folders in LUT order (default: sorted folder names); `chunk_pixels`
    (default 2 Mpx) and `compression` ('lz4' default, 'zstd', 'none'); `append=True` adds the
    images the store lacks, keeping its chunks and compression (so neither may be given).
    """
    from .pipelines.ingest import plan_append, plan_ingest
    from .pipelines.targets import PIXEL_STORE

    model_list = _names(models)
    source, target = _absolute(source_dir), _absolute(store)
    _refuse_out_of_range({"--chunk-pixels": chunk_pixels})
    if append:
        _refuse_layout_with_append(chunk_pixels, compression)
    _check_targets({"store": (store, PIXEL_STORE)}, {"source folder": source_dir}, overwrite and not append)
    if append:
        outcome = run_plan(lambda: plan_append(source, str(target), model_list), (target,), run)
    else:
        outcome = run_plan(
            lambda: plan_ingest(
                source,
                str(target),
                model_list,
                chunk_pixels or schema.DEFAULT_CHUNK_PIXELS,
                overwrite,
                compression or schema.DEFAULT_COMPRESSION,
            ),
            (target,),
            run,
        )
    return _store_result(Ingested, "ingest", store, outcome, append)


def _refuse_layout_with_append(chunk_pixels: int | None, compression: str | None) -> None:
    """An append keeps the store's chunks and compression: giving either is a UsageError."""
    fixed = [
        f"--{name.replace('_', '-')}"
        for name, value in (("chunk_pixels", chunk_pixels), ("compression", compression))
        if value is not None
    ]
    if fixed:
        raise UsageError(f"{' and '.join(fixed)}: not with --append, which keeps the store's chunks and compression")


def _planned(result_class: type[Result], command: str, outcome: Outcome, outputs: list[str] | None = None) -> Result:
    """The result of a command that was only planned (`dry_run=True`)."""
    return result_class(command=command, status="planned", outputs=outputs or [], plan=outcome.plan, stages=outcome.stages)


def _store_result(result_class: type[Ingested], command: str, store, outcome: Outcome, append: bool) -> Ingested:
    """The result of `ingest` or `predict` from its plan's outcome: the store written (or resumed,
    or left unchanged), or for `append` how many images were added ('updated', else 'unchanged')."""
    outputs = _written([store])
    if outcome.plan is not None:
        return _planned(result_class, command, outcome, outputs)
    if append:
        added = outcome.value
        return result_class(
            command=command,
            status="updated" if added else "unchanged",
            outputs=outputs,
            seconds=outcome.seconds,
            images_added=added,
        )
    result, ds = outcome.value, outcome.value.dataset
    return result_class(
        command=command,
        status=result.status,
        outputs=outputs,
        seconds=outcome.seconds,
        dataset=ds,
        images=ds.sizes["image"],
        pixels=ds.sizes["pixel"],
        models=list(ds.attrs["models"]),
        chunks_total=result.chunks_total,
        chunks_written=result.chunks_written,
    )


def _base_models(models) -> list:
    """The base models of `predict` as checked `models.ModelFile`s (safe kind, hashed), in order,
    from {name: file}, (name, file) pairs or 'NAME=FILE' strings (the CLI's --model). Every name
    is checked before any file is read."""
    from .models import model_file

    pairs = []
    for item in models.items() if isinstance(models, Mapping) else [models] if isinstance(models, str) else models:
        name, equals, path = item.partition("=") if isinstance(item, str) else (item[0], "=", item[1])
        name = str(name).strip()
        if not equals or not name or not str(path):
            raise UsageError(f"{item!r} is not NAME=FILE", option="--model")
        if "#" in name or name in (known for known, _ in pairs):
            raise UsageError(f"{name!r}: a model name must be unique and without '#' (it marks samples)", option="--model")
        pairs.append((name, path))
    if not pairs:
        raise UsageError("name at least one model (NAME=FILE)", option="--model")
    return [model_file(name, path) for name, path in pairs]


def _refuse_outside(value, choices, option: str) -> None:
    """A `value` not among `choices` is a UsageError naming the CLI `option`."""
    if value not in choices:
        raise UsageError(f"{value!r} is not one of {', '.join(map(str, choices))}", option=option)


#: The fewest pixels a chunk may hold. Every chunk costs its tasks a read, a write, a checksum and a
#: completion mark whatever its size, and the client holds its graph: an image of 38,000 pixels
#: took 2.4 s to ingest in one chunk, 29 s in chunks of 64 pixels, 138 s and 1.6 GB in chunks of
#: 16 (and about an hour in chunks of one). 64 still cuts a corpus of a few thousand pixels into
#: tens of chunks, their edges inside images, as the tests do with chunks of 97 to 1,000 pixels.
MIN_CHUNK_PIXELS = 64
#: The most pixels a chunk may hold, 8x the default: a task holds a chunk of every model at once,
#: so larger chunks need gigabytes per worker thread, and the compressors take 2 GiB a chunk at most.
MAX_CHUNK_PIXELS = 1 << 24
#: The smallest `predict --tile` side: a model call per few pixels is all overhead (a 12 Mpx photo
#: in tiles of one pixel is 12 million calls), and no tile that small holds a model's receptive field.
MIN_TILE = 8
#: The most runs per model and image (`predict --samples`): each is a member of the store (and of
#: every LUT fitted on it), and planning holds every member's graph: 100 samples of three small
#: images took 1 GB before the first model ran.
MAX_SAMPLES = 64
#: The largest `predict --scale`: super-resolution factors are 2 to 8, rarely 16, and an output has
#: scale^2 times its input's pixels (a factor of 10^20 overflowed the sizes' integers).
MAX_SCALE = 32
#: The range (least, most; None: any) of each whole-number option of the commands that is bounded
#: beyond click's types; the CLI declares the same ranges.
OPTION_RANGES = {
    "--chunk-pixels": (MIN_CHUNK_PIXELS, MAX_CHUNK_PIXELS),
    "--tile": (MIN_TILE, None),
    "--overlap": (0, None),
    "--batch": (1, None),
    "--scale": (1, MAX_SCALE),
    "--samples": (1, MAX_SAMPLES),
}


def _refuse_out_of_range(values: dict[str, Any]) -> None:
    """A value of `values` (by CLI option, None where not given) that is not a whole number in its
    option's `OPTION_RANGES` is a UsageError naming the option."""
    for option, value in values.items():
        least, most = OPTION_RANGES[option]
        if value is None:
            continue
        whole = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
        if not whole or value < least or (most is not None and value > most):
            span = f"from {least:,} to {most:,}" if most is not None else f"of at least {least:,}"
            raise UsageError(f"{value!r} is not a whole number {span}", option=option)


@_command
def predict(
    source_dir,
    store,
    *,
    models,
    device: str = "auto",
    tile: int | None = None,
    overlap: int | None = None,
    batch: int = 1,
    scale: int = 1,
    value_range: str = "0-1",
    samples: int = 1,
    chunk_pixels: int | None = None,
    append: bool = False,
    compression: str | None = None,
    overwrite: bool = False,
    **run: Unpack[RunOptions],
) -> Predicted:
    """Run the base `models` on the degraded inputs of `source_dir/lq` (`gt/` kept when present)
    into the store `store`, as `ingest` writes one (`ensir-flow predict`).

    `models`: {name: file}, (name, file) pairs or 'NAME=FILE' strings, in LUT order; TorchScript
    (.pt) or torch.export (.pt2) files, checked before torch reads them. `device` 'auto', 'cpu' or
    'cuda'; `tile` pixels a side overlapping by `overlap` (only with `tile`; default 0), else whole
    images; `batch` tiles per call; `scale` the super-resolution factor (checked); `value_range`
    '0-1' or '0-255'; `samples` runs per model and image (members NAME#0 ...). `chunk_pixels` and
    `compression` as for `ingest`; `append=True` predicts the stems the store lacks with the same
    models and options, keeping its chunks and compression (so neither may be given).
    """
    from .devices import DEVICES
    from .models import VALUE_RANGES, Inference
    from .pipelines.predict import plan_predict, plan_predict_append
    from .pipelines.targets import PIXEL_STORE

    if tile is not None and overlap is not None and tile <= 2 * overlap:
        raise UsageError(f"--tile {tile} leaves no centre with --overlap {overlap} (tile > 2 x overlap)", option="--tile")
    if tile is None and overlap is not None:
        raise UsageError("--overlap: only with --tile")
    _refuse_out_of_range(
        {
            "--tile": tile,
            "--overlap": overlap,
            "--batch": batch,
            "--scale": scale,
            "--samples": samples,
            "--chunk-pixels": chunk_pixels,
        }
    )
    _refuse_outside(device, DEVICES, "--device")
    _refuse_outside(value_range, list(VALUE_RANGES), "--range")
    if append:
        _refuse_layout_with_append(chunk_pixels, compression)
    base_models = _base_models(models)
    how = Inference(device, value_range, scale, tile, overlap or 0, batch)
    source, target = _absolute(source_dir), _absolute(store)
    _check_targets(
        {"store": (store, PIXEL_STORE)},
        {"source folder": source_dir, **{f"model file {model.name}": model.path for model in base_models}},
        overwrite and not append,
    )
    if append:
        outcome = run_plan(lambda: plan_predict_append(source, str(target), base_models, how, samples), (target,), run)
    else:
        outcome = run_plan(
            lambda: plan_predict(
                source,
                str(target),
                base_models,
                how,
                samples,
                chunk_pixels or schema.DEFAULT_CHUNK_PIXELS,
                compression or schema.DEFAULT_COMPRESSION,
                overwrite,
            ),
            (target,),
            run,
        )
    return _store_result(Predicted, "predict", store, outcome, append)


def _shrinkage_strength(shrinkage) -> float | None:
    """None for 'auto' (chosen by cross-validation), else the strength: a number from 0 to
    `lsq.MAX_SHRINKAGE` (NaN and infinities refused: no LUT could be fitted with them)."""
    from .lsq import MAX_SHRINKAGE, is_shrinkage

    if shrinkage is None or shrinkage == "auto":
        return None
    try:
        strength = None if isinstance(shrinkage, bool) else float(shrinkage)
    except (TypeError, ValueError):
        strength = None
    if not is_shrinkage(strength):
        raise UsageError(
            f"{shrinkage!r} is neither 'auto' nor a non-negative number up to {MAX_SHRINKAGE:g}", option="--shrinkage"
        )
    return strength


@_command
def fit(
    store,
    lut,
    *,
    bin_width: int = DEFAULT_BIN_WIDTH,
    solver: str = DEFAULT_SOLVER,
    shrinkage: str | float = "auto",
    device: str = "auto",
    overwrite: bool = False,
    pass_memory: int = DEFAULT_PASS_MEMORY_MIB,
    **run: Unpack[RunOptions],
) -> Fitted:
    """Fit an EnsIR LUT on the reference store `store` (with ground truth) and write it to `lut`
    (`ensir-flow fit`): `solver` one of `lut.SOLVERS` (docs/solvers.md; 'em', the paper's, by
    default); `shrinkage` for lsq ('auto': by cross-validation); `device` 'auto', 'cpu' or 'cuda';
    statistics that would exceed `pass_memory` MiB are gathered in passes over ranges of cells
    (the same LUT)."""
    from .pipelines.fit import plan_fit
    from .pipelines.targets import LUT

    strength = _shrinkage_strength(shrinkage)
    if isinstance(pass_memory, bool) or not isinstance(pass_memory, (int, np.integer)) or pass_memory < 1:
        raise UsageError(f"{pass_memory!r} is not a positive whole number of MiB", option="--pass-memory")
    pass_memory = int(pass_memory)
    reference, target = _absolute(store), _absolute(lut)
    _check_targets({"LUT": (lut, LUT)}, {"store": store}, overwrite)
    outcome = run_plan(
        lambda: plan_fit(str(reference), str(target), bin_width, solver, device, overwrite, strength, pass_memory << 20),
        (reference, target),
        run,
        reads=(reference,),
    )
    if outcome.plan is not None:
        return _planned(Fitted, "fit", outcome, _written([lut]))
    table = outcome.value
    return Fitted(
        command="fit",
        status=outcome.status or "written",
        outputs=_written([lut]),
        seconds=outcome.seconds,
        lut=table,
        bins=table.n_bins,
        channels=table.n_channels,
        filled_cells=table.filled_cells,
    )


@_command
def apply(
    store,
    lut,
    output,
    *,
    export_dir=None,
    png_compression: int | None = None,
    device: str = "auto",
    compression: str = schema.DEFAULT_COMPRESSION,
    overwrite: bool = False,
    **run: Unpack[RunOptions],
) -> Applied:
    """Blend every image of `store` with `lut` into the new store `output` (`ensir-flow apply`),
    and with `export_dir` also write one lossless PNG per image there (zlib level `png_compression`,
    0-9, default `DEFAULT_PNG_COMPRESSION`; refused without `export_dir`, where it would do nothing).
    An `output` made with the same LUT before `store` grew (`ingest(append=True)`) is updated in place."""
    from .pipelines.apply import plan_apply
    from .pipelines.targets import APPLY_OUTPUT, EXPORT_FOLDER

    if png_compression is not None and export_dir is None:
        raise UsageError("--png-compression: only with --export-dir")
    if png_compression is None:
        png_compression = DEFAULT_PNG_COMPRESSION

    outputs = _written([output, export_dir])
    source, table, target, pngs = (_absolute(path) for path in (store, lut, output, export_dir))
    _check_targets(
        {"output": (output, APPLY_OUTPUT), "export folder": (export_dir, EXPORT_FOLDER)}, {"store": store, "LUT": lut}, overwrite
    )
    outcome = run_plan(
        lambda: plan_apply(
            str(source),
            str(table),
            str(target),
            None if pngs is None else str(pngs),
            overwrite,
            device,
            compression,
            png_compression,
        ),
        (source, table, target, pngs),
        run,
        reads=(source,),
    )
    if outcome.plan is not None:
        return _planned(Applied, "apply", outcome, outputs)
    result = outcome.value
    return Applied(
        command="apply",
        status=result.status,
        outputs=outputs,
        seconds=outcome.seconds,
        dataset=result.output,
        images=result.output.sizes["image"],
        images_added=result.images_added,
        chunks_total=result.chunks_total,
        chunks_computed=result.chunks_computed,
    )


def _bin_widths(value) -> list[int]:
    """Bin widths from '16,32' (the CLI's form), an integer or a sequence of integers: each a
    width binning allows (1 to 256), none twice (each names its own columns of the results)."""
    from .binning import ranges_per_model

    try:
        if isinstance(value, str):
            widths = [int(width) for width in value.split(",")]
        else:
            widths = [value] if isinstance(value, (int, np.integer)) else list(value)
            if not all(isinstance(width, (int, np.integer)) and not isinstance(width, bool) for width in widths):
                raise TypeError
            widths = [int(width) for width in widths]
    except (TypeError, ValueError):
        raise UsageError(f"{value!r} is not a comma-separated list of integers", option="--bin-widths") from None
    if not widths:
        raise UsageError("name a bin width", option="--bin-widths")
    for width in widths:
        try:
            ranges_per_model(width)
        except ValueError as error:
            raise UsageError(str(error), option="--bin-widths") from None
    if len(set(widths)) < len(widths):
        raise UsageError(f"{value!r} names a bin width twice", option="--bin-widths")
    return widths


def _fitted_solvers(solvers) -> list[str]:
    """The solvers cross-validation fits (the baselines, `ALWAYS_REPORTED`, are always reported, never fitted)."""
    names = [name for name in _names(solvers) or [] if name not in ALWAYS_REPORTED]
    try:
        for name in names:
            check_solver(name)
    except InputError as error:
        raise UsageError(str(error), option="--solvers") from None
    if not names:
        raise UsageError(f"name a solver to fit ({' and '.join(ALWAYS_REPORTED)} are always reported)", option="--solvers")
    return names


@_command
def evaluate(
    store,
    *,
    ensemble=None,
    cv: int | None = None,
    solvers: str | Sequence[str] = "em,lsq",
    bin_widths: str | int | Sequence[int] = DEFAULT_BIN_WIDTH,
    y_channel: bool = False,
    crop_border: int = 0,
    report=None,
    lut=None,
    device: str = "auto",
    **run: Unpack[RunOptions],
) -> Evaluated:
    """PSNR/SSIM of every model, the average, ZZPM and the `ensemble` store (an `apply` output,
    refused unless made from `store` as it is now) against `store`'s ground truth (`ensir-flow
    evaluate`), holding a strip of each image at a time (images of any size).

    `cv=N`: N-fold cross-validation by image of the `solvers` at the `bin_widths` instead (not
    with `ensemble`). `y_channel`: score the BT.601 luma; `crop_border`: pixels cropped per side.
    `report`: also write the HTML report into that folder (`lut`: the LUT drawn there).
    """
    from .pipelines.evaluate import plan_cross_validation, plan_evaluate

    if isinstance(crop_border, bool) or not isinstance(crop_border, (int, np.integer)) or crop_border < 0:
        raise UsageError(f"{crop_border!r} is not a number of pixels (0 or more)", option="--crop-border")
    crop_border = int(crop_border)
    if lut is not None and report is None:
        raise UsageError(f"{lut}: --lut applies to --report only (the LUT the report draws)", option="--lut")
    source, scored, folder, table = (_absolute(path) for path in (store, ensemble, report, lut))
    if cv is None:
        factory = lambda: plan_evaluate(str(source), None if scored is None else str(scored), y_channel, crop_border)  # noqa: E731
    else:
        if ensemble is not None:
            raise UsageError("--ensemble scores a fixed output; --cv fits its own LUTs: use one or the other")
        if cv < 2:
            raise UsageError(f"{cv} is not a number of folds (at least 2)", option="--cv")
        names, widths = _fitted_solvers(solvers), _bin_widths(bin_widths)
        factory = lambda: plan_cross_validation(str(source), cv, names, widths, y_channel, crop_border, device)  # noqa: E731
    if report is not None:  # before any work
        from .pipelines.report import check_report_target
        from .pipelines.targets import REPORT_FOLDER

        _check_targets({"report": (report, REPORT_FOLDER)}, {"store": store, "ensemble": ensemble, "LUT": lut}, False)
        check_report_target(report)
    outcome = run_plan(factory, (source, scored), run, reads=(source, scored))
    if outcome.plan is not None:
        return _planned(Evaluated, "evaluate", outcome)
    page = None
    if report is not None:
        from .pipelines.report import write_report

        page = str(
            write_report(
                folder,
                outcome.value.to_json(),
                str(source),
                None if scored is None else str(scored),
                None if table is None else str(table),
            )
        )
    return Evaluated(
        command="evaluate",
        status="scored",
        outputs=_written([report]),
        seconds=outcome.seconds,
        evaluation=outcome.value,
        report=page,
    )


@_command
def export(
    store,
    directory,
    *,
    variable: str = schema.ENSEMBLE,
    overwrite: bool = False,
    png_compression: int = DEFAULT_PNG_COMPRESSION,
    **run: Unpack[RunOptions],
) -> Exported:
    """Write every image of `variable` ('ensemble' of an `apply` output by default, or
    'ground_truth', 'input') in `store` as a lossless PNG named by its stem into `directory`
    (what `apply(export_dir=...)` does) at zlib level `png_compression` (0-9), staged so that the
    folder appears complete or not at all."""
    from .pipelines.export import plan_export
    from .pipelines.targets import EXPORT_FOLDER

    _check_targets({"export folder": (directory, EXPORT_FOLDER)}, {"store": store}, overwrite)
    written_to = directory
    store, directory = _absolute(store), _absolute(directory)

    outcome = run_plan(
        lambda: plan_export(str(store), str(directory), variable, overwrite, png_compression),
        (store, directory),
        run,
        reads=(store,),
    )
    if outcome.plan is not None:
        return _planned(Exported, "export", outcome, _written([written_to]))
    return Exported(
        command="export",
        status="written",
        outputs=_written([written_to]),
        seconds=outcome.seconds,
        directory=str(written_to),
        images=outcome.value,
    )


@_command
def import_lut(source, output, *, models: str | Sequence[str], bin_width: int, overwrite: bool = False) -> LutImported:
    """Convert a LUT published with the paper's code (`source`, a .pth; code in it is never run)
    into the LUT store `output` (`ensir-flow lut import`); status 'unchanged' where `output` is
    already the LUT of this import (same file, models and bin width)."""
    from .pipelines.interchange import import_paper_lut
    from .pipelines.targets import LUT

    target = _absolute(output)
    _check_targets({"LUT": (output, LUT)}, {"source": source}, overwrite)
    table, status = import_paper_lut(str(source), str(target), _names(models), bin_width, overwrite)
    return LutImported(command="lut import", status=status, outputs=_written([output]), lut=table)


@_command
def export_lut(lut, output, *, overwrite: bool = False) -> Result:
    """Write the LUT store `lut` as `output` (.npz or .json: weights, counts, models, bin width,
    bin-index rule) (`ensir-flow lut export`); status 'unchanged' where `output` already holds
    this export."""
    from .pipelines.interchange import export_lut as write_lut_file
    from .pipelines.targets import LUT_FILE

    target = _absolute(output)
    _check_targets({"LUT file": (output, LUT_FILE)}, {"LUT": lut}, overwrite)
    status = write_lut_file(str(lut), str(target), overwrite)
    return Result(command="lut export", status=status, outputs=_written([output]))


@_command
def demo(directory="demo-run", *, overwrite: bool = False, **run: Unpack[RunOptions]) -> Demo:
    """Build the embedded demo corpus in `directory` and run ingest, fit, apply and evaluate on it
    (`ensir-flow demo`); status 'unchanged' where `directory` already holds this version's demo
    (scored again for the summary)."""
    from .pipelines.demo import plan_demo
    from .pipelines.targets import DEMO_FOLDER

    target = _absolute(directory)
    _check_targets({"demo folder": (directory, DEMO_FOLDER)}, {}, overwrite)
    outcome = run_plan(lambda: plan_demo(target, overwrite), (target,), run)
    if outcome.plan is not None:
        return _planned(Demo, "demo", outcome, _written([directory]))
    return Demo(
        command="demo",
        status=outcome.status or "written",
        outputs=_written([directory]),
        seconds=outcome.seconds,
        summary=outcome.value,
    )


@_command
def info(path) -> dict:
    """What the store or LUT at `path` holds and what made it (`ensir-flow info --json`)."""
    from .pipelines.info import describe

    return describe(str(path))


# ---------------------------------------------------------------------------------------------
# Reading stores


def open_store(path) -> xr.Dataset:
    """The store (or LUT) at `path` as a lazy xarray Dataset, checked as every command checks it
    (`schema.check_store`: a store left inconsistent by anyone is refused, naming what is wrong).
    Read images from it with `image`."""
    from .pipelines.stores import open_store as open_zarr_store

    ds = open_zarr_store(str(path))
    if "weights" not in ds:  # a LUT is checked when it is loaded (`Lut.from_dataset`)
        schema.check_store(ds, str(path), require=())
    return ds


image = schema.image
