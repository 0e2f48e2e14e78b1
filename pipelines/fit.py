"""Fit: one pass of per-chunk statistics, a tree reduction, then a solver on the reduced table.

Where the statistics would not fit a worker's memory (many models: K = 16 at bin width 16 has
millions of cells on a 10-Mpx reference set), the cells are cut into ranges and the set is read
once per range (`CellRanges`, `fit_in_passes`): each pass gathers, merges and fits only its range's cells, and
writes its run of the LUT's bins to disk, so that neither the statistics nor the LUT are ever
whole in memory. Cells are independent in every solver, so the LUT is the one a single pass
makes, bit for bit (tested).
"""

import contextlib
import hashlib
import tempfile

import dask
import numpy as np

import ensir_flow
from ensir_flow import schema
from ensir_flow.binning import DEFAULT_BIN_WIDTH, LEVELS, bin_count, key_words
from ensir_flow.devices import resolve_device
from ensir_flow.errors import TransientError
from ensir_flow.lut import DEFAULT_PASS_MEMORY_MIB, DEFAULT_SOLVER, Lut, fit_lut, moments_for
from ensir_flow.solvers import Tuning, fittable
from ensir_flow.stats import (
    ALL_MOMENTS,
    FIRST_BINS_END,
    CellStatistics,
    cell_sample,
    fold_statistics,
    merge,
    merge_folds,
    moment_columns,
)

from .chunks import (
    CHUNK_TASKS,
    MERGE_FAN_IN,
    Span,
    chunk_runs,
    chunk_spans,
    graph_tasks,
    image_folds,
    pixel_array,
    pixel_chunk_lengths,
    ranges_of,
    read_pixels,
    task_argument,
    tree_reduce,
)
from .commit import exists, refuse_existing, staged_output
from .executor import release_freed_memory
from .integrity import store_identity
from .lut_io import read_lut, write_lut
from .plan import Plan, Stage, task_count
from .stores import open_group_as_committed, open_store_index

#: Bytes of statistics one pass of `fit` may gather (estimated: `sample_statistics_bytes`). A reference set
#: whose statistics would exceed it is fitted in several passes, one range of cells each. At the
#: peak a pass holds its chunks' statistics and their merge, about twice this, besides the pixels
#: of the chunks being read.
PASS_BYTES = DEFAULT_PASS_MEMORY_MIB << 20
#: Statistics in passes size their ranges on a sample of the cells: those of every this many pixels.
SAMPLE_STRIDE = 8
#: Images whose source SHA-256s `_what_fit_reads` digests at a time.
SHA256_BATCH = 1 << 16
#: Store attributes that must be as planned when fit has read the store (`_what_fit_reads`).
READ_AS_PLANNED_ATTRIBUTES = ("models", "model_files", "inference", "store_id")


def _chunk_statistics(
    predictions,
    truth,
    start: int,
    stop: int,
    spans: list[Span],
    n_folds: int,
    bin_width: int,
    device: str,
    moments_kind: str,
    first_bins: tuple[int, int] | None,
) -> list:
    """One task: read a chunk of the arrays of predictions and ground truth, return its statistics
    per fold (of the cells in the range `first_bins` alone, when given)."""
    return fold_statistics(
        read_pixels(predictions, start, stop),
        read_pixels(truth, start, stop),
        bin_width,
        spans,
        n_folds,
        device,
        moments_kind,
        first_bins,
    )


def _guarded_chunk_statistics(
    predictions,
    truth,
    start: int,
    stop: int,
    spans: list[Span],
    n_folds: int,
    bin_width: int,
    device: str,
    moments_kind: str,
    chunk_bytes: float,
) -> tuple:
    """One task of the first pass of a fit whose statistics may exceed a pass (`fit_in_passes`):
    (its statistics per fold, each channel's statistics per fold, the sorted first bins of the
    cells of its sample, how many histogram entries the sample holds).

    The sample is every `SAMPLE_STRIDE`-th pixel (`stats.cell_sample`). When it says the chunk's
    statistics could exceed `chunk_bytes` (`sample_statistics_bytes`), they are not gathered
    (None: the fit goes in passes), and each channel's statistics are those of bin width 256, where
    every cell is its channel."""
    pixels, truth_pixels = read_pixels(predictions, start, stop), read_pixels(truth, start, stop)
    first_bins, entries = cell_sample(pixels[:, ::SAMPLE_STRIDE], truth_pixels[::SAMPLE_STRIDE], bin_width)
    if (
        sample_statistics_bytes(
            len(first_bins), entries, pixels.shape[1] * pixels.shape[2], n_folds, pixels.shape[0], bin_width, moments_kind
        )
        > chunk_bytes
    ):
        return None, fold_statistics(pixels, truth_pixels, LEVELS, spans, n_folds, device, moments_kind), first_bins, entries
    folds = fold_statistics(pixels, truth_pixels, bin_width, spans, n_folds, device, moments_kind)
    return folds, [fold.per_channel() for fold in folds], first_bins, entries


def sample_statistics_bytes(
    sampled_cells: int, sampled_entries: int, pixel_channels: int, n_folds: int, n_models: int, bin_width: int, moments_kind: str
) -> float:
    """Estimated bytes of the statistics of `pixel_channels` from the cells and histogram entries
    of their sample: each taken as `SAMPLE_STRIDE` of them in each of `n_folds` folds (a cell may
    hold pixels of every fold; more than it turns out to be, as a sampled cell often stands for a
    cell whose other pixels were sampled too), at most one a pixel-channel (`statistics_bytes`)."""
    cells, entries = (min(sampled * SAMPLE_STRIDE * n_folds, pixel_channels) for sampled in (sampled_cells, sampled_entries))
    return statistics_bytes(cells, entries, n_models, bin_width, moments_kind)


def _merge_guarded(*parts: tuple) -> tuple:
    """Merge results of `_guarded_chunk_statistics`: statistics (None where one chunk gave none),
    channels' statistics, the samples' first bins side by side and their histogram entries added."""
    folds = None if any(part[0] is None for part in parts) else merge_folds(*(part[0] for part in parts))
    return (
        folds,
        merge_folds(*(part[1] for part in parts)),
        np.concatenate([part[2] for part in parts]),
        sum(part[3] for part in parts),
    )


def chunk_tasks(store: str, ds, n_folds: int, task, combine, *arguments) -> list:
    """The tasks of a pass over the chunks of the store `store` (opened as `ds` by `open_store` or
    `open_store_index`, with ground truth): one per run of consecutive chunks (`chunks.chunk_runs`:
    a chunk each on a store of few chunks), which returns the `combine` of its chunks'
    `task(predictions, truth, start, stop, spans, n_folds, *arguments)` (the store's arrays, a
    chunk's pixels start:stop and their (start, stop, fold) spans for `n_folds` folds of images).
    A task is given its images' offsets and sizes, not their spans: it makes those of each chunk
    as it reads it (`_run_of_chunks`)."""
    index = schema.ImageIndex.from_dataset(ds)
    offsets, counts = index.offsets, index.counts
    image_stops = offsets + counts
    folds = image_folds(len(index.stems), n_folds)
    lengths = np.asarray(pixel_chunk_lengths(ds), dtype=np.int64)
    stops = np.cumsum(lengths)
    predictions, truth = (task_argument(pixel_array(store, name)) for name in (schema.PREDICTION, schema.GROUND_TRUTH))
    tasks = []
    for run in chunk_runs(lengths, (ds.sizes["model"] + 1) * ds.sizes["channel"]):
        start, stop = int(stops[run.start] - lengths[run.start]), int(stops[run.stop - 1])
        first, end = np.searchsorted(image_stops, start, side="right"), np.searchsorted(offsets, stop, side="left")
        tasks.append(
            (
                _run_of_chunks,
                task,
                combine,
                predictions.key,
                truth.key,
                start,
                lengths[run.start : run.stop],
                offsets[first:end] - start,
                counts[first:end],
                folds[first:end],
                n_folds,
                *arguments,
            )
        )
    return graph_tasks(getattr(task, "__name__", "chunks").strip("_"), tasks, [predictions, truth])


def _run_of_chunks(task, combine, predictions, truth, start: int, lengths, offsets, counts, folds, n_folds: int, *arguments):
    """One task: `task` on each chunk of `lengths` pixels from pixel `start` on, one after another
    (its images at `offsets`, from `start`, of `counts` pixels, in `folds`), the results combined
    as they come, so that the task holds one chunk's pixels and one running result."""
    result = None
    for (lo, hi), spans in zip(ranges_of(lengths), chunk_spans(offsets, counts, folds, tuple(lengths))):
        part = task(predictions, truth, start + lo, start + hi, spans, n_folds, *arguments)
        result = part if result is None else combine(result, part)
    return result


def statistics_graph(
    store: str,
    ds,
    bin_width: int,
    device: str = "cpu",
    n_folds: int = 1,
    moments_kind: str = ALL_MOMENTS,
    first_bins: tuple[int, int] | None = None,
):
    """Delayed list of merged CellStatistics (moments of `moments_kind`), one per fold of images,
    of the store `store` (`chunk_tasks`): one task per chunk, then a tree of merges. With
    `first_bins`, of one range of cells (`stats.chunk_statistics`), merged two at a time: each
    merge lets its parts go as soon as they are done, where a pass's memory is what counts."""
    return tree_reduce(
        chunk_tasks(store, ds, n_folds, _chunk_statistics, merge_folds, bin_width, device, moments_kind, first_bins),
        merge_folds,
        MERGE_FAN_IN if first_bins is None else 2,
    )


def statistics_bytes(n_cells: float, n_entries: float, n_models: int, bin_width: int, moments_kind: str) -> float:
    """Bytes of the statistics of `n_cells` cells holding `n_entries` histogram entries (a cell's
    distinct ground-truth levels): their moments, key words and entries."""
    words = key_words(n_models, bin_width)
    return 8 * (n_cells * (moment_columns(n_models, moments_kind) + words) + n_entries * (words + 1))


class CellRanges:
    """Ranges of cells (lo <= b < hi of their first key word's bin b: `stats.first_bin_of_keys`),
    each of about `pass_bytes` of statistics, cut one after another from `sample`, the sorted first
    bins of the distinct cells of every `SAMPLE_STRIDE`-th pixel of each chunk. How many bytes of
    statistics a sampled cell stands for is learnt from the ranges gathered so far (`gathered`);
    before the first, it is taken as `SAMPLE_STRIDE` cells of `cell_bytes` each, more than it turns
    out to be (a sampled cell often stands for a cell whose other pixels were sampled too), so the
    first range is the smallest. A range holds at least one first bin that was sampled: where the
    first group of models agree on many cells (identical members), that bin may exceed a pass."""

    def __init__(self, sample: np.ndarray, cell_bytes: float, pass_bytes: int):
        self.sample, self.pass_bytes, self.first_guess = sample, pass_bytes, SAMPLE_STRIDE * cell_bytes
        self.start, self.sampled_cells, self.gathered_bytes = 0, 0, 0

    def __iter__(self):
        """The next range, until the last (which ends at `FIRST_BINS_END`)."""
        while self.start < FIRST_BINS_END:
            per_sample = self.gathered_bytes / self.sampled_cells if self.sampled_cells else self.first_guess
            first = np.searchsorted(self.sample, self.start)
            cut = first + max(1, int(self.pass_bytes / max(per_sample, 1.0)))
            if cut < len(self.sample) and first < len(self.sample) and self.sample[cut] == self.sample[first]:
                cut = np.searchsorted(self.sample, self.sample[first], side="right")  # many sampled cells share a first bin
            yield self.start, FIRST_BINS_END if cut >= len(self.sample) else int(self.sample[cut])

    def gathered(self, first_bins: tuple[int, int], statistics: list[CellStatistics]) -> None:
        """Record the statistics of the range `first_bins` (one per fold), and start the next after it."""
        start, stop = np.searchsorted(self.sample, first_bins)
        self.sampled_cells += int(stop - start)
        self.gathered_bytes += sum(part.nbytes for part in statistics)
        self.start = first_bins[1]


def lut_from_folds(
    fold_statistics: list,
    models: list[str],
    device: str,
    solver: str,
    shrinkage: float | None = None,
    channels: CellStatistics | None = None,
):
    """Fit on the union of the folds. For a solver with a tuned hyperparameter (`Solver.tuning`:
    lsq's shrinkage) and `shrinkage=None`, the value with the lowest held-out error over the folds
    is used (with a single fold there is nothing to hold out: the tuning's default); the choice is
    recorded in the LUT's attributes. `shrinkage`: that hyperparameter's value; `channels`: as
    `fit_lut`'s."""
    tuning, provenance = fittable(solver).tuning, {}
    if tuning is not None and shrinkage is None:
        if len(fold_statistics) > 1:
            errors = tuning.held_out_errors(fold_statistics)
            shrinkage = tuning.choose(errors)
            provenance = tuning_provenance(tuning, errors, len(fold_statistics), sum(f.n_pixels for f in fold_statistics))
        else:
            shrinkage = tuning.default
            provenance[f"{tuning.parameter}_choice"] = "default: a single fold of reference images, nothing to hold out"
    lut = fit_lut(merge(*fold_statistics), models, device, solver, 0.0 if shrinkage is None else shrinkage, channels)
    lut.attrs.update(provenance)
    return lut


def tuning_provenance(tuning: Tuning, errors: dict[float, float], n_folds: int, pixel_channels: int) -> dict:
    """The LUT attributes that record how a solver's tuned hyperparameter was chosen from its held-out `errors`."""
    return {
        f"{tuning.parameter}_choice": f"{n_folds}-fold cross-validation by image over {list(tuning.grid)}",
        f"{tuning.parameter}_held_out_mse": {str(k): v / pixel_channels for k, v in errors.items()},
    }


class StoredBins:
    """A LUT's stored bins, appended run by run (the LUT of each range of cells, in order) to
    temporary files, and read back as one LUT whose arrays map those files: a LUT too large to hold
    in memory is assembled and written without being held. The files have no name (removed as they
    are made): nothing is left behind, whenever the process ends."""

    ARRAYS = ("bin_digits", "bin_weights", "bin_count", "bin_status")

    def __init__(self):
        self.files = {name: tempfile.TemporaryFile(prefix="ensir-flow-fit-") for name in self.ARRAYS}
        self.rows, self.first = 0, None

    def append(self, lut: Lut) -> None:
        """Add the bins of `lut` (all after those added before), keeping the first run's other fields."""
        for name, file in self.files.items():
            with _temporary_files_named():
                file.write(np.ascontiguousarray(getattr(lut, name)).data)
        self.rows += len(lut.bin_digits)
        if self.first is None:
            self.first = Lut(
                lut.models,
                lut.bin_width,
                lut.bin_weights[:0],
                lut.bin_count[:0],
                lut.bin_status[:0],
                lut.solver,
                lut.empty_policy,
                lut.attrs,
                bin_digits=lut.bin_digits[:0],
                fallback=lut.fallback,
                fallback_status=lut.fallback_status,
            )

    def lut(self) -> Lut:
        """The LUT of every run appended (its arrays map the files, which close with this object)."""
        first = self.first
        arrays = {name: self._mapped(file, getattr(first, name)) for name, file in self.files.items()}
        return Lut(
            first.models,
            first.bin_width,
            arrays["bin_weights"],
            arrays["bin_count"],
            arrays["bin_status"],
            first.solver,
            first.empty_policy,
            first.attrs,
            bin_digits=arrays["bin_digits"],
            fallback=first.fallback,
            fallback_status=first.fallback_status,
        )

    def _mapped(self, file, empty: np.ndarray) -> np.ndarray:
        shape = (self.rows, *empty.shape[1:])
        if not self.rows:
            return np.empty(shape, empty.dtype)
        with _temporary_files_named():
            file.flush()
        return np.memmap(file, dtype=empty.dtype, mode="r", shape=shape)


@contextlib.contextmanager
def _temporary_files_named():
    """An OSError writing `StoredBins`' files (which have no name) as one naming their folder, so
    that a full disk is reported where it is (with its errno: the CLI says to free space)."""
    try:
        yield
    except OSError as error:
        raise OSError(error.errno, error.strerror or str(error), f"{tempfile.gettempdir()} (fit's temporary files)") from None


def plan_fit(
    store: str,
    lut_path: str,
    bin_width: int = DEFAULT_BIN_WIDTH,
    solver: str = DEFAULT_SOLVER,
    device: str = "auto",
    overwrite: bool = False,
    shrinkage: float | None = None,
    pass_bytes: int = PASS_BYTES,
) -> Plan:
    """Plan fitting a LUT on the reference store `store` (which must hold ground truth).

    `device` is where the statistics tasks run ('auto' resolved on each worker) and where EM runs
    (resolved here); the LUT is the same bits on any device. `shrinkage` sets the solver's tuned
    hyperparameter, if it has one (`Solver.tuning`: lsq's shrinkage); None picks it by
    cross-validation over images (folds gathered in the same single pass). Statistics that may
    exceed `pass_bytes` are gathered in passes over ranges of cells (`fit_in_passes`).
    """
    tuning = fittable(solver).tuning
    inputs = fit_inputs(store, bin_width, solver, shrinkage)
    if not overwrite and _recorded_fit_inputs(lut_path) == inputs:  # e.g. a run killed after its commit
        return Plan(
            f"fit: {lut_path} is already this fit's LUT",
            {"store": str(store), "LUT": str(lut_path)},
            lambda compute: read_lut(lut_path),
            status="unchanged",
        )
    refuse_existing(lut_path, overwrite)
    ds = open_store_index(store)
    models = schema.check_store(ds, store, require=(schema.PREDICTION, schema.GROUND_TRUTH))
    n_images, n_channels = ds.sizes["image"], ds.sizes["channel"]
    n_folds = min(tuning.folds, n_images) if tuning is not None and shrinkage is None and n_images > 1 else 1
    moments_kind = moments_for([solver])
    em_device = resolve_device(device)
    pixel_channels = ds.sizes["pixel"] * n_channels
    most_cells = min(bin_count(len(models), bin_width) * n_channels * n_folds, pixel_channels)  # folds are kept apart
    most_entries = min(most_cells * LEVELS, pixel_channels)
    may_need_passes = statistics_bytes(most_cells, most_entries, len(models), bin_width, moments_kind) > pass_bytes

    read_as_planned = _what_fit_reads(ds, n_images)
    # The graph of the first (or only) pass over the set, built now: the stages count its tasks.
    if may_need_passes:
        first_pass = first_pass_graph(store, ds, n_folds, bin_width, device, moments_kind, pass_bytes)
    else:
        first_pass = statistics_graph(store, ds, bin_width, device, n_folds, moments_kind)

    def execute(compute):
        if may_need_passes:
            lut = fit_in_passes(
                compute, first_pass, store, ds, models, bin_width, solver, device, em_device, n_folds, shrinkage, pass_bytes
            )
        else:
            (fold_statistics,) = compute(first_pass, label="statistics")
            lut = lut_from_folds(fold_statistics, models, em_device, solver, shrinkage)
            del fold_statistics
        if _what_fit_reads(open_store_index(store), n_images) != read_as_planned:
            raise TransientError(
                f"{store}: replaced while fit read it (its images are not those planned); nothing was written: run fit again"
            )
        lut.attrs.update(
            {
                "created_by": f"ensir-flow {ensir_flow.__version__} fit",
                "reference_store": str(store),
                "reference_images": int(n_images),
                FIT_INPUTS: inputs,
            }
        )
        with staged_output(lut_path, overwrite) as staging:
            compute(dask.delayed(write_lut)(lut, staging), label="write LUT")
        return lut

    n_chunks = len(pixel_chunk_lengths(ds))
    read = Stage(
        "statistics and a sample of cells" if may_need_passes else "statistics",
        task_count(first_pass),
        chunks=2 * n_chunks,
        bytes_read=pixel_channels * (len(models) + 1),
    )
    stages = [read]
    if may_need_passes:
        stages.append(
            Stage(
                "statistics by ranges of cells",
                read.tasks,
                read.chunks,
                read.bytes_read,
                note="per pass, if a sample says the cells exceed the pass memory (which sets the number of passes)",
            )
        )
    stages.append(Stage(f"{solver} on the cells, write LUT", 1))
    n_bins = bin_count(len(models), bin_width)
    details = {
        "store": str(store),
        "LUT": str(lut_path),
        "models": ", ".join(models),
        "solver": solver,
        "bin width": f"{bin_width} ({n_bins:,} bins x {n_channels} channels)",
        "statistics tasks": f"{read.tasks:,} for {n_chunks:,} chunks (runs of consecutive chunks past {CHUNK_TASKS:,}), "
        f"merged {MERGE_FAN_IN} at a time"
        + (f", kept in {n_folds} folds of images" if n_folds > 1 else "")
        + (
            f"; in passes over ranges of cells (merged 2 at a time) if a sample of the cells says "
            f"they exceed {pass_bytes / 2**20:,.0f} MiB"
            if may_need_passes
            else ""
        ),
        "devices": f"statistics on {device}, EM batched on {em_device}",
    }
    if tuning is not None:
        details[tuning.parameter] = f"{shrinkage}" if shrinkage is not None else f"chosen by {n_folds}-fold cross-validation"
    return Plan(f"fit a {solver} LUT on {n_images} reference images", details, execute, stages=stages)


#: LUT attribute: the digest of what it was fitted from (`fit_inputs`).
FIT_INPUTS = "fit_inputs"


def fit_inputs(store: str, bin_width: int, solver: str, shrinkage: float | None) -> str:
    """The digest of what a fit makes its LUT from: the store as committed now (its identity,
    `integrity.store_identity`) and the options that change the LUT (the device and the pass
    memory do not: the same bits on any)."""
    return hashlib.sha256(repr((store_identity(store), int(bin_width), solver, shrinkage)).encode()).hexdigest()


def _recorded_fit_inputs(lut_path: str) -> str | None:
    """The `fit_inputs` recorded by the LUT at `lut_path`, if ensir-flow's fit wrote one there."""
    if not exists(lut_path):
        return None
    try:
        attrs = open_group_as_committed(str(lut_path)).attrs
    except Exception:  # noqa: BLE001 - anything unreadable there is not this fit's LUT
        return None
    return attrs.get(FIT_INPUTS)


def _what_fit_reads(ds, n_images: int):
    """What must not change while fit reads the store opened as `ds` (a fit in passes reads it
    several times): a digest of the SHA-256s of the source files of its first `n_images` images and the
    attributes that say how predictions were made (`predict`'s model files and options) and which
    store it is (`store_id`, made when it was written), which an `ingest --append` or `predict
    --append` leaves as they are; where it has no SHA-256s, all its attributes."""
    if "source_sha256" not in ds:
        return ds.attrs
    sha256 = np.asarray(ds["source_sha256"].values)[..., :n_images]
    digest = hashlib.sha256()
    for first in range(0, sha256.shape[-1], SHA256_BATCH):  # the SHA-256s of 10^6 images as Python strings: 0.5 GB
        digest.update(" ".join(sha256[..., first : first + SHA256_BATCH].ravel().tolist()).encode())
    return sha256.shape, digest.hexdigest(), {name: ds.attrs.get(name) for name in READ_AS_PLANNED_ATTRIBUTES}


def first_pass_graph(store: str, ds, n_folds: int, bin_width: int, device: str, moments_kind: str, pass_bytes: int):
    """The delayed first pass of `fit_in_passes`: each chunk's statistics, if a sample of its cells
    says they fit its share of `pass_bytes` (`_guarded_chunk_statistics`), merged."""
    parts = chunk_tasks(
        store,
        ds,
        n_folds,
        _guarded_chunk_statistics,
        _merge_guarded,
        bin_width,
        device,
        moments_kind,
        pass_bytes / len(pixel_chunk_lengths(ds)),
    )
    return tree_reduce(parts, _merge_guarded)


def fit_in_passes(
    compute,
    first_pass,
    store: str,
    ds,
    models: list[str],
    bin_width: int,
    solver: str,
    device: str,
    em_device: str,
    n_folds: int,
    shrinkage: float | None,
    pass_bytes: int,
) -> Lut:
    """The LUT of statistics that may exceed `pass_bytes`: fitted from one pass when a sample of
    the cells says they do not, else one range of cells at a time (`CellRanges`), its bins gathered
    on disk (`StoredBins`).

    The first pass (`first_pass_graph`, built by the plan) samples each chunk's cells, and gathers its
    statistics only if the sample says they fit the chunk's share of `pass_bytes`, and each
    channel's statistics (from which the fallback is fitted). A solver choosing its tuned
    hyperparameter (lsq's shrinkage) reads the set once more in passes: every range's held-out
    errors first, then the fit with the value chosen."""
    tuning = fittable(solver).tuning
    moments_kind = moments_for([solver])
    (gathered,) = compute(first_pass, label="statistics and a sample of cells")
    folds, channel_folds, sample, sampled_entries = gathered
    del gathered
    if folds is not None:
        return lut_from_folds(folds, models, em_device, solver, shrinkage)
    whole_set = sample_statistics_bytes(
        len(sample), sampled_entries, ds.sizes["pixel"] * ds.sizes["channel"], n_folds, len(models), bin_width, moments_kind
    )
    ranges = CellRanges(np.sort(sample), whole_set / max(len(sample), 1) / SAMPLE_STRIDE, pass_bytes)
    del sample

    def statistics_of(ranges, label: str, n_folds: int):
        for number, first_bins in enumerate(ranges, 1):
            (folds,) = compute(
                statistics_graph(store, ds, bin_width, device, n_folds, moments_kind, first_bins), label=f"{label}, pass {number}"
            )
            yield first_bins, folds

    provenance, used = {}, []
    if tuning is not None and shrinkage is None and n_folds > 1:
        errors = dict.fromkeys(tuning.grid, 0.0)
        for first_bins, folds in statistics_of(ranges, "held-out errors", n_folds):
            ranges.gathered(first_bins, folds)
            used.append(first_bins)
            for value, error in tuning.held_out_errors(folds, channel_folds).items():
                errors[value] += error
        shrinkage = tuning.choose(errors)
        provenance = tuning_provenance(tuning, errors, n_folds, sum(f.n_pixels for f in channel_folds))
    channels, stored = merge(*channel_folds), StoredBins()
    for first_bins, folds in statistics_of(used or ranges, "statistics", 1):
        if not used:
            ranges.gathered(first_bins, folds)
        stored.append(lut_from_folds(folds, models, em_device, solver, shrinkage, channels))
        del folds
        release_freed_memory()
    lut = stored.lut()
    lut.attrs.update(provenance)
    return lut
