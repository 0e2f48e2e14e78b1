"""ensir-flow command line: options, scheduler, progress; the work itself is in `pipelines`."""

import contextlib
import errno
import inspect
import json
import math
import re
import signal
import threading

import click

import ensir_flow
from ensir_flow import api, schema
from ensir_flow.binning import DEFAULT_BIN_WIDTH
from ensir_flow.config import command_defaults, config_summary, installed_configs, load_config
from ensir_flow.devices import DEVICES
from ensir_flow.errors import InputError, TransientError
from ensir_flow.images import DEFAULT_PNG_COMPRESSION
from ensir_flow.lut import DEFAULT_PASS_MEMORY_MIB, DEFAULT_SOLVER, SOLVERS
from ensir_flow.models import VALUE_RANGES
from ensir_flow.pipelines.executor import (
    DASHBOARD_ADDRESS_ENV,
    DEFAULT_DASHBOARD_ADDRESS,
    DEFAULT_PROGRESS_INTERVAL,
    DEFAULT_WORKER_TIMEOUT,
    SCHEDULER_ENV,
    WORKER_TIMEOUT_ENV,
    check_dashboard_address,
    close_local_cluster,
    quiet_libraries,
)
from ensir_flow.solvers import REGISTRY

#: Exit status of a failure worth retrying as it is (sysexits.h's EX_TEMPFAIL).
EX_TEMPFAIL = 75

#: errno values of failures that a later retry may not meet (the others: bad input, exit 1).
TRANSIENT_ERRNOS = {
    errno.EAGAIN,
    errno.EBUSY,
    errno.ETIMEDOUT,
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
}

#: Per command, the parameters naming what it writes (else reads), first given first: an OSError
#: that names no file (a write that found the disk full) is reported against it.
OUTPUT_PARAMETERS = {
    "ingest": ("store",),
    "predict": ("store",),
    "fit": ("lut",),
    "apply": ("output",),
    "evaluate": ("report_dir", "store"),
    "import": ("output",),
    "export": ("output",),
    "demo": ("directory",),
    "info": ("path",),
}


#: What the compression codecs say of a chunk they cannot decode (pixel reads through
#: `pipelines.chunks.read_pixels` name the chunk themselves; other reads end up here).
CODEC_FAILURE = re.compile(r"decompress|blosc|zstd|lz4", re.IGNORECASE)


class TransientFailure(click.ClickException):
    """A one-line error that exits 75 (EX_TEMPFAIL): running the same command later may succeed."""

    exit_code = EX_TEMPFAIL


def _one_line(error: BaseException) -> str:
    """The message of `error` on one line (the lines of a longer one joined by '; ')."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__


def _os_failure(error: OSError, location) -> click.ClickException:
    """`PATH: reason` for an OSError (PATH: the file it names, else `location`), exit 1, or 75 when
    the reason is transient (a connection refused or timed out, a resource busy)."""
    where = error.filename if error.filename is not None else location
    if error.filename is not None and error.filename2 is not None:
        where = f"{error.filename} -> {error.filename2}"
    reason = error.strerror or _one_line(error)
    message = f"{where}: {reason}" if where is not None else reason
    if error.errno == errno.ENOSPC:
        return click.ClickException(
            f"{message}; retrying will not help until space is freed: free space and re-run the same command"
        )
    if isinstance(error, (ConnectionError, TimeoutError)) or error.errno in TRANSIENT_ERRNOS:
        return TransientFailure(message)
    return click.ClickException(message)


@contextlib.contextmanager
def one_line_errors(location=None):
    """Turn the failures a run can meet into one line on stderr and an exit code (see `main`):
    InputError 1, TransientError 75, OSError `PATH: reason` (1, or 75 when transient); the API's
    UsageError 2, as click's own usage errors (naming the option at fault)."""
    try:
        yield
    except api.UsageError as error:
        context = click.get_current_context(silent=True)
        if error.option is not None:
            raise click.BadParameter(str(error), ctx=context, param_hint=error.option) from None
        raise click.UsageError(str(error), ctx=context) from None
    except InputError as error:
        raise click.ClickException(_one_line(error)) from None
    except TransientError as error:
        raise TransientFailure(_one_line(error)) from None
    except OSError as error:
        raise _os_failure(error, location) from None
    except RuntimeError as error:
        if not CODEC_FAILURE.search(str(error)):
            raise
        raise click.ClickException(
            f"{location}: a chunk of a store it reads is unreadable (corrupt or truncated: {_one_line(error)})"
        ) from None


#: The line an interrupted command ends with, and its exit codes (128 + the signal's number, as a
#: shell reports a process the signal ended).
INTERRUPTED = "interrupted: re-run the same command to resume"
EXIT_INTERRUPTED = {signal.SIGINT: 128 + signal.SIGINT, signal.SIGTERM: 128 + signal.SIGTERM}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where SIGINT raises KeyboardInterrupt: the run stops the same way (what
    is staged kept, as after a kill, for the same command to resume)."""


class Interrupted(click.ClickException):
    """A run stopped by SIGINT (Ctrl-C) or SIGTERM: `INTERRUPTED` on stderr, exit 130 or 143."""

    def __init__(self, signum: int):
        super().__init__(INTERRUPTED)
        self.exit_code = EXIT_INTERRUPTED[signum]

    def show(self, file=None) -> None:
        click.echo(self.message, err=True)


@contextlib.contextmanager
def interruptible():
    """Within the block, SIGTERM raises `Terminated` (in the main thread; elsewhere signals
    cannot be handled) and an interrupt of either kind ends the command as `Interrupted`, with
    no traceback: pressed at a terminal, Ctrl-C reaches a local cluster's worker processes too,
    which print nothing of it (`executor.local_cluster`)."""

    def terminate(signum, frame):
        raise Terminated

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    except Terminated:
        raise Interrupted(signal.SIGTERM) from None
    except KeyboardInterrupt:
        raise Interrupted(signal.SIGINT) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _Command(click.Command):
    """A command whose failures are one line and an exit code (`one_line_errors`), as is an
    interrupt (`interruptible`); a local cluster it started is closed when it ends."""

    def invoke(self, ctx):
        given = [ctx.params.get(name) for name in OUTPUT_PARAMETERS.get(self.name, ())]
        with interruptible():
            try:
                with one_line_errors(next((str(value) for value in given if value is not None), None)):
                    return super().invoke(ctx)
            finally:
                close_local_cluster()


class _Group(click.Group):
    """A group whose commands (and subgroups' commands) are `_Command`s."""

    command_class = _Command
    group_class = type


def _run_options(scheduler, worker_timeout, no_progress, dry_run) -> api.RunOptions:
    """The API's `RunOptions` from the shared options: progress is a bar on a terminal and plain
    timestamped lines every --progress-interval seconds in a log or a scheduler's capture (the
    API's rule for a number of seconds)."""
    meta = click.get_current_context().meta
    progress = False if no_progress else meta.get(PROGRESS_INTERVAL, DEFAULT_PROGRESS_INTERVAL)
    return {
        "scheduler": scheduler,
        "worker_timeout": worker_timeout,
        "progress": progress,
        "dry_run": dry_run,
        "dashboard_address": meta.get(DASHBOARD_ADDRESS, DEFAULT_DASHBOARD_ADDRESS),
    }


def _finish(result: api.Result, message) -> None:
    """End a command: `message(result)`, the human summary, or the plan of a dry run; with --json
    the result's one JSON object instead (command, status, outputs, counts, seconds per stage, or a
    dry run's plan and stages)."""
    if click.get_current_context().meta.get(AS_JSON):
        click.echo(json.dumps(result.to_json()))
    elif result.plan is not None:
        click.echo(result.plan)
    else:
        click.echo(message(result))


def _typed_only(values: dict, only_typed: bool) -> dict:
    """`values` by option name, or with `only_typed` those typed on the command line (defaults and
    a config's values left out): what the API then refuses where it cannot go with another option."""
    context = click.get_current_context()
    return {
        name: value
        for name, value in values.items()
        if not only_typed or context.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
    }


def _store_summary(result: api.Ingested, store, source_dir, verb: str, preposition: str, holds: str) -> str:
    """The summary line of `ingest` and `predict`: for an append, 'VERB N new image(s) PREPOSITION
    STORE' (or nothing to do); else what was written, with the images, pixels and members."""
    if result.images_added is not None:
        return (
            f"{verb} {result.images_added} new image(s) {preposition} {store}"
            if result.images_added
            else f"{store}: no new images in {source_dir}: nothing to do"
        )
    done = {
        "written": f"wrote {store}",
        "unchanged": f"{store} already holds these {holds}: nothing to do",
        "resumed": f"resumed {store}: {result.chunks_written} of {result.chunks_total} chunks were missing",
    }[result.status]
    return f"{done} ({result.images} images, {result.pixels:,} pixels, models {', '.join(result.models)})"


AS_JSON = "ensir_flow.json"


def _keep_json(ctx, _param, value):
    ctx.meta[AS_JSON] = value
    return value


json_option = click.option(
    "--json",
    is_flag=True,
    expose_value=False,
    callback=_keep_json,
    help="Print one JSON object at the end (command, status, outputs, counts, seconds per stage) instead of the summary line.",
)


PROGRESS_INTERVAL = "ensir_flow.progress_interval"


def _keep_progress_interval(ctx, _param, value):
    ctx.meta[PROGRESS_INTERVAL] = value
    return value


DASHBOARD_ADDRESS = "ensir_flow.dashboard_address"


def _keep_dashboard_address(ctx, _param, value):
    address = None if value.lower() == "none" else value
    try:
        check_dashboard_address(address)
    except ValueError as error:
        raise click.BadParameter(f"{value}: {error}") from None
    ctx.meta[DASHBOARD_ADDRESS] = address
    return value


class _Seconds(click.FloatRange):
    """A number of seconds, 0 or more: click's FloatRange lets NaN and infinity through, on which
    distributed's timeouts fail (and a progress interval means nothing)."""

    name = "seconds"

    def __init__(self):
        super().__init__(min=0)

    def convert(self, value, param, ctx):
        seconds = super().convert(value, param, ctx)
        if not math.isfinite(seconds):
            self.fail(f"{value!r} is not a finite number of seconds", param, ctx)
        return seconds


def _option_range(option: str) -> click.IntRange:
    """click's type of a whole-number option the API bounds (`api.OPTION_RANGES`)."""
    return click.IntRange(*api.OPTION_RANGES[option])


def run_options(writes: bool = True):
    """Options every command shares."""

    def decorate(command):
        command = click.option(
            "--scheduler",
            default="local",
            show_default=True,
            metavar="ADDRESS",
            envvar=SCHEDULER_ENV,
            help="'local': a distributed cluster sized to this machine; 'threads': dask's threads in "
            "this process (no cluster start-up, for small jobs); tcp://host:port of a running "
            f"dask scheduler; or a scheduler file. Default from ${SCHEDULER_ENV}.",
        )(command)
        command = click.option(
            "--worker-timeout",
            type=_Seconds(),
            default=DEFAULT_WORKER_TIMEOUT,
            show_default=True,
            metavar="SECONDS",
            envvar=WORKER_TIMEOUT_ENV,
            help="On a cluster: stop (exit 75) when no worker has been connected for this long while "
            f"work waits for one; 0: wait for ever. Default from ${WORKER_TIMEOUT_ENV}.",
        )(command)
        command = click.option("--no-progress", "no_progress", is_flag=True, help="No progress bars (cron jobs, logs).")(command)
        command = click.option(
            "--progress-interval",
            type=_Seconds(),
            default=DEFAULT_PROGRESS_INTERVAL,
            show_default=True,
            metavar="SECONDS",
            expose_value=False,
            callback=_keep_progress_interval,
            help="When stderr is not a terminal (logs), progress is plain timestamped lines, at most "
            "one per stage this often, plus each stage's start and end.",
        )(command)
        command = click.option("--dry-run", is_flag=True, help="Show what would be read, computed and written; do nothing.")(
            command
        )
        command = click.option(
            "--dashboard-address",
            default=DEFAULT_DASHBOARD_ADDRESS,
            show_default=True,
            metavar="[HOST]:PORT",
            envvar=DASHBOARD_ADDRESS_ENV,
            expose_value=False,
            callback=_keep_dashboard_address,
            help="With --scheduler local: where the cluster serves its Dask dashboard, whose link is "
            "printed on stderr; a port already taken falls back to a free one; ':0' any free "
            f"port, 'none' no dashboard pages. Default from ${DASHBOARD_ADDRESS_ENV}.",
        )(command)
        if writes:
            command = click.option(
                "--overwrite", is_flag=True, help="Replace existing outputs (atomically, once the new one is complete)."
            )(command)
            command = json_option(command)
        return command

    return decorate


quiet_option = click.option(
    "--no-progress",
    "no_progress",
    is_flag=True,
    help="Accepted for scripts that pass it to every command; this one shows no progress bar.",
)


def api_default(command, keyword: str):
    """The default of `keyword` in the API function `command`: an option the CLI shares with the
    API takes its default from there, so that each default is written once."""
    return inspect.signature(command).parameters[keyword].default


device_option = click.option(
    "--device",
    type=click.Choice(DEVICES),
    default=api_default(api.fit, "device"),
    show_default=True,
    help="Where kernels run: cpu (numba), cuda (torch), auto (each worker's GPU if it has one). Same bits either way.",
)


compression_option = click.option(
    "--compression",
    type=click.Choice(list(schema.COMPRESSORS)),
    default=schema.DEFAULT_COMPRESSION,
    show_default=True,
    help="Compressor of the pixel arrays written: lz4 is fast to read and write, zstd smaller (archives), none neither.",
)


def _load_config(ctx, _param, name_or_path):
    """Turn a YAML task config (a file, or the name of an installed one) into per-command option defaults."""
    if name_or_path is None:
        return None
    try:
        ctx.default_map = command_defaults(load_config(name_or_path))
    except InputError as error:
        raise click.BadParameter(str(error)) from None
    return name_or_path


@click.group(cls=_Group)
@click.version_option(ensir_flow.__version__, prog_name="ensir-flow")
@click.option(
    "--config",
    metavar="NAME|PATH",
    callback=_load_config,
    is_eager=True,
    expose_value=False,
    help="Task config (models, bin_width, solver, metrics): the name of an installed one (`ensir-flow "
    "configs` lists them) or a YAML file; options override it.",
)
def main():
    """EnsIR ensembles of image-restoration models, from image folders to ensembled datasets.

    \b
    Exit codes (a failure prints one line on stderr):
      0   done, or nothing to do
      1   bad input or data, disk full, permission denied: retrying will not help
      2   usage: a wrong command, option or argument
      75  transient (EX_TEMPFAIL): output locked by another live run, dask scheduler
          unreachable, no worker for --worker-timeout seconds, workers lost: retry later
      130 interrupted by SIGINT (Ctrl-C), 143 by SIGTERM: re-run the same command to resume
    """
    quiet_libraries()


@main.command()
@click.argument("source_dir", type=click.Path(file_okay=False))
@click.argument("store")
@click.option("--models", default=None, help="Comma-separated model folders in LUT order (default: sorted folder names).")
@click.option(
    "--chunk-pixels",
    type=_option_range("--chunk-pixels"),
    default=schema.DEFAULT_CHUNK_PIXELS,
    show_default=True,
    help="Pixels per Zarr chunk.",
)
@click.option("--append", is_flag=True, help="Add the images of SOURCE_DIR that STORE lacks (same models, same compression).")
@compression_option
@run_options()
def ingest(
    source_dir, store, models, chunk_pixels, append, compression, scheduler, worker_timeout, no_progress, dry_run, overwrite
):
    """Read SOURCE_DIR (gt/, lq/, one folder per model) into the Zarr store STORE."""
    # with --append, only what the command line gives reaches the API (which refuses it there)
    given = _typed_only({"chunk_pixels": chunk_pixels, "compression": compression}, append)
    result = api.ingest(
        source_dir,
        store,
        models=models or None,
        append=append,
        overwrite=overwrite,
        **given,
        **_run_options(scheduler, worker_timeout, no_progress, dry_run),
    )
    _finish(result, lambda r: _store_summary(r, store, source_dir, "appended", "to", "images"))


@main.command()
@click.argument("source_dir", type=click.Path(file_okay=False))
@click.argument("store")
@click.option(
    "--model",
    "model_specs",
    multiple=True,
    required=True,
    metavar="NAME=FILE",
    help="A base model: its name in the ensemble and its torch.export program (.pt2, torch.export.save) or "
    "TorchScript (.pt) file; "
    "repeat for each model, in LUT order.",
)
@click.option(
    "--device",
    type=click.Choice(DEVICES),
    default=api_default(api.predict, "device"),
    show_default=True,
    help="Where models run: cpu, cuda, auto (each worker's GPU if it has one).",
)
@click.option(
    "--tile",
    type=_option_range("--tile"),
    default=None,
    metavar="PIXELS",
    help="Run models on tiles of this many input pixels a side, overlapping by --overlap (bounded memory); "
    "whole images when absent.",
)
@click.option(
    "--overlap",
    type=_option_range("--overlap"),
    default=0,
    show_default=True,
    metavar="PIXELS",
    help="With --tile: input pixels each tile reaches beyond the centre it keeps (at least the model's "
    "receptive radius for outputs equal to whole-image ones).",
)
@click.option(
    "--batch",
    type=_option_range("--batch"),
    default=api_default(api.predict, "batch"),
    show_default=True,
    help="Tiles of one shape per model call.",
)
@click.option(
    "--scale",
    type=_option_range("--scale"),
    default=api_default(api.predict, "scale"),
    show_default=True,
    help="Super-resolution factor: outputs must be this many times the input's size (checked).",
)
@click.option(
    "--range",
    "value_range",
    type=click.Choice(list(VALUE_RANGES)),
    default=api_default(api.predict, "value_range"),
    show_default=True,
    help="The scale of the models' input and output pixel values.",
)
@click.option(
    "--samples",
    type=_option_range("--samples"),
    default=api_default(api.predict, "samples"),
    show_default=True,
    help="Runs per model and image, seeded by (image, sample): members NAME#0 ... NAME#N-1 (stochastic models).",
)
@click.option(
    "--chunk-pixels",
    type=_option_range("--chunk-pixels"),
    default=schema.DEFAULT_CHUNK_PIXELS,
    show_default=True,
    help="Pixels per Zarr chunk.",
)
@click.option(
    "--append", is_flag=True, help="Predict the inputs of SOURCE_DIR whose stems STORE lacks (same models and options)."
)
@compression_option
@run_options()
def predict(
    source_dir,
    store,
    model_specs,
    device,
    tile,
    overlap,
    batch,
    scale,
    value_range,
    samples,
    chunk_pixels,
    append,
    compression,
    scheduler,
    worker_timeout,
    no_progress,
    dry_run,
    overwrite,
):
    """Run base models on SOURCE_DIR/lq (gt/ kept when present) into the store STORE, as ingest writes one."""
    # only what the command line gives reaches the API where it refuses it: --chunk-pixels and
    # --compression with --append, --overlap without --tile
    given = {
        **_typed_only({"chunk_pixels": chunk_pixels, "compression": compression}, append),
        **_typed_only({"overlap": overlap}, tile is None),
    }
    result = api.predict(
        source_dir,
        store,
        models=model_specs,
        device=device,
        tile=tile,
        batch=batch,
        scale=scale,
        value_range=value_range,
        samples=samples,
        append=append,
        overwrite=overwrite,
        **given,
        **_run_options(scheduler, worker_timeout, no_progress, dry_run),
    )
    _finish(result, lambda r: _store_summary(r, store, source_dir, "predicted", "into", "predictions"))


@main.command()
@click.argument("store")
@click.argument("lut")
@click.option(
    "--bin-width",
    type=click.IntRange(1, 256),
    default=DEFAULT_BIN_WIDTH,
    show_default=True,
    help="Width of each model's value ranges.",
)
@click.option(
    "--solver",
    type=click.Choice(SOLVERS),
    default=DEFAULT_SOLVER,
    show_default=True,
    help="; ".join(f"{name}: {REGISTRY[name].summary}" for name in SOLVERS) + ".",
)
@click.option(
    "--shrinkage",
    default="auto",
    show_default=True,
    metavar="auto|STRENGTH",
    help="lsq only: pseudo-pixels pulling sparse cells towards the channel-wide solution; "
    "auto chooses it by cross-validation over the reference images.",
)
@click.option(
    "--pass-memory",
    type=click.IntRange(1),
    default=DEFAULT_PASS_MEMORY_MIB,
    show_default=True,
    metavar="MIB",
    help="Statistics one pass may gather, in MiB: where they would exceed it (many models, large reference "
    "sets), the set is read once per range of cells, so memory stays near twice this. Same LUT either way.",
)
@device_option
@run_options()
def fit(
    store, lut, bin_width, solver, shrinkage, pass_memory, device, scheduler, worker_timeout, no_progress, dry_run, overwrite
):
    """Fit an EnsIR LUT on the reference STORE (with ground truth) and write it to LUT."""
    result = api.fit(
        store,
        lut,
        bin_width=bin_width,
        solver=solver,
        shrinkage=shrinkage,
        device=device,
        overwrite=overwrite,
        pass_memory=pass_memory,
        **_run_options(scheduler, worker_timeout, no_progress, dry_run),
    )
    _finish(
        result,
        lambda r: (
            f"{lut} is already this fit's LUT (same store, same options): nothing to do"
            if r.status == "unchanged"
            else f"wrote {lut}: {r.bins:,} bins x {r.channels} channels, {r.filled_cells:,} cells with reference pixels"
        ),
    )


@main.command()
@click.argument("store")
@click.argument("lut")
@click.argument("output")
@click.option("--export-dir", default=None, help="Also write one lossless PNG per image here, named by stem.")
@click.option(
    "--png-compression",
    type=click.IntRange(0, 9),
    default=None,
    metavar="0-9",
    help=f"zlib level of the exported PNGs (default {DEFAULT_PNG_COMPRESSION}; only with --export-dir): 1 encodes "
    "several times faster than 6 or 9 for files ~15-25% larger; the pixels are the same at every level.",
)
@device_option
@compression_option
@run_options()
def apply(
    store,
    lut,
    output,
    export_dir,
    png_compression,
    device,
    compression,
    scheduler,
    worker_timeout,
    no_progress,
    dry_run,
    overwrite,
):
    """Blend every image of STORE with LUT into the new store OUTPUT."""
    result = api.apply(
        store,
        lut,
        output,
        export_dir=export_dir,
        png_compression=png_compression,
        device=device,
        compression=compression,
        overwrite=overwrite,
        **_run_options(scheduler, worker_timeout, no_progress, dry_run),
    )

    def message(result: api.Applied) -> str:
        done = {
            "written": f"wrote {output}",
            "unchanged": f"{output} is already complete: nothing to do",
            "resumed": f"resumed {output}: {result.chunks_computed} of {result.chunks_total} chunks were missing",
            "updated": f"updated {output}: {result.images_added} new image(s), {result.chunks_computed} of "
            f"{result.chunks_total} chunks computed",
        }
        return done[result.status] + f" ({result.images} images)" + (f"; PNGs in {export_dir}" if export_dir else "")

    _finish(result, message)


@main.command()
@click.argument("store")
@click.option("--ensemble", "ensemble_store", default=None, help="Output store of `apply` to score as well.")
@click.option(
    "--cv",
    "folds",
    type=click.IntRange(2),
    default=None,
    help="N-fold cross-validation by image: LUTs fitted on N-1 folds, scored on the held-out one.",
)
@click.option(
    "--solvers",
    default=api_default(api.evaluate, "solvers"),
    show_default=True,
    help="With --cv: comma-separated solvers to compare (default: the config's solver, else em,lsq).",
)
@click.option(
    "--bin-widths",
    default=str(api_default(api.evaluate, "bin_widths")),
    show_default=True,
    help="With --cv: comma-separated bin widths to compare (default: the config's bin_width).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (means and per-image scores) to stdout.")
@click.option("--y-channel", is_flag=True, help="Score the BT.601 luma (as MATLAB's rgb2ycbcr) instead of RGB.")
@click.option(
    "--crop-border",
    type=click.IntRange(0),
    default=api_default(api.evaluate, "crop_border"),
    show_default=True,
    help="Pixels cropped from each side.",
)
@click.option(
    "--report",
    "report_dir",
    default=None,
    metavar="DIR",
    help="Also write an HTML report (tables, per-image gains, worst/best crops, LUT heat maps) into DIR.",
)
@click.option("--lut", "lut_path", default=None, help="LUT to draw in the report (default: the one --ensemble was made with).")
@device_option
@run_options(writes=False)
def evaluate(
    store,
    ensemble_store,
    folds,
    solvers,
    bin_widths,
    as_json,
    y_channel,
    crop_border,
    report_dir,
    lut_path,
    device,
    scheduler,
    worker_timeout,
    no_progress,
    dry_run,
):
    """PSNR/SSIM of every model, the average, ZZPM and the ensemble against STORE's ground truth."""
    # typed without --cv they would do nothing (a config's values are its --cv candidates)
    typed = _typed_only({"solvers": solvers, "bin_widths": bin_widths}, True)
    for option, value in typed.items() if folds is None else ():
        raise click.UsageError(f"--{option.replace('_', '-')} {value}: applies to --cv only (the solvers' LUTs it fits)")
    result = api.evaluate(
        store,
        ensemble=ensemble_store,
        cv=folds,
        solvers=solvers,
        bin_widths=bin_widths,
        y_channel=y_channel,
        crop_border=crop_border,
        report=report_dir,
        lut=lut_path,
        device=device,
        **_run_options(scheduler, worker_timeout, no_progress, dry_run),
    )
    if result.plan is not None:
        click.echo(json.dumps(result.to_json()) if as_json else result.plan)
        return
    click.echo(json.dumps(result.to_json()) if as_json else result.text)
    if result.report is not None:
        click.echo(f"report: {result.report}", err=as_json)


@main.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object, with every source file's SHA-256.")
@quiet_option
def info(path, as_json, no_progress):
    """What the store or LUT at PATH holds and what made it (provenance)."""
    from ensir_flow.pipelines.info import format_description

    summary = api.info(path)
    click.echo(json.dumps(summary, default=str) if as_json else format_description(summary))


@main.group()
def lut():
    """Move LUTs in and out: import the paper's .pth files, export NPZ or JSON."""


@lut.command("import")
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.argument("output")
@click.option("--models", required=True, help="Comma-separated model names in the LUT's key order.")
@click.option("--bin-width", type=click.IntRange(1, 256), required=True, help="The bin width the LUT was fitted with.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@json_option
@quiet_option
def lut_import(source, output, models, bin_width, overwrite, no_progress):
    """Convert a LUT published with the paper's code (SOURCE .pth) to a LUT store; code in the file is never run."""
    result = api.import_lut(source, output, models=models, bin_width=bin_width, overwrite=overwrite)
    table = result.lut
    _finish(
        result,
        lambda r: (
            f"{output} is already this import's LUT (same file, models and bin width): nothing to do"
            if r.status == "unchanged"
            else f"wrote {output}: {table.n_bins:,} bins x {table.n_channels} channels for {', '.join(table.models)}"
        ),
    )


@lut.command("export")
@click.argument("lut_path", metavar="LUT")
@click.argument("output")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@json_option
@quiet_option
def lut_export(lut_path, output, overwrite, no_progress):
    """Write LUT as OUTPUT.npz or OUTPUT.json (weights, counts, models, bin width, bin-index rule)."""
    _finish(
        api.export_lut(lut_path, output, overwrite=overwrite),
        lambda r: (
            f"{output} already holds this export of {lut_path}: nothing to do" if r.status == "unchanged" else f"wrote {output}"
        ),
    )


@main.command()
@click.argument("directory", default=api_default(api.demo, "directory"))
@run_options()
def demo(directory, scheduler, worker_timeout, no_progress, dry_run, overwrite):
    """Build the embedded demo corpus in DIRECTORY and run ingest, fit, apply, evaluate on it."""
    result = api.demo(directory, overwrite=overwrite, **_run_options(scheduler, worker_timeout, no_progress, dry_run))
    _finish(
        result,
        lambda r: f"{directory} already holds this demo: nothing to do\n{r.summary}" if r.status == "unchanged" else r.summary,
    )


@main.command()
@quiet_option
def configs(no_progress):
    """List the task configs installed with ensir-flow, for `--config NAME`."""
    for name, path in installed_configs().items():
        click.echo(f"{name}: {config_summary(path)}\n  {path}")


if __name__ == "__main__":
    main()
