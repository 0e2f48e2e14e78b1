"""Evaluate: PSNR and SSIM of every base model, the plain average and the ensemble, per image."""

import math
from dataclasses import dataclass

import dask
import numpy as np

from ensir_flow import metrics, schema
from ensir_flow.binning import DEFAULT_BIN_WIDTH
from ensir_flow.blend import (
    AVERAGE,
    ENSEMBLE,
    PAIRWISE_BLOCK,
    ZZPM,
    average,
    blend,
    blend_spans,
    squared_distance_sums,
    zzpm,
    zzpm_weights,
)
from ensir_flow.devices import resolve_device
from ensir_flow.errors import InputError
from ensir_flow.images import check_model_names

from .batches import chunk_reads, consecutive_runs, pixel_range
from .chunks import image_folds, pixel_array, pixel_chunk_lengths, read_pixels, task_argument
from .fingerprint import store_fingerprint
from .integrity import refuse_changed, store_identity
from .plan import Plan, Stage, task_count
from .stores import StoreIndex, open_store_index

#: Pixels of its image a task holds at a time: strips of rows of about this many pixels (a chunk
#: of the store's default size), so that memory is bounded by the strip, not the image.
STRIP_PIXELS = schema.DEFAULT_CHUNK_PIXELS


def image_scores(
    predictions,
    truth,
    ensemble,
    offset: int,
    shape: tuple[int, int, int],
    names: list[str],
    crop_border: int,
    y_channel: bool,
    luts: dict | None = None,
    strip_pixels: int = STRIP_PIXELS,
) -> dict:
    """One task: PSNR and SSIM for the image of `shape` (H, W, C) at pixel `offset` of each model,
    the average, ZZPM, the ensemble if given, and each LUT of `luts` ({method: (weights,
    bin_width)}) applied to the image here; all scored against the ground truth.

    The image is read, blended and scored in horizontal strips of rows of about `strip_pixels`
    pixels (`metrics.StripScorer`: the scores of the whole image, see there), so a task holds a
    strip of each candidate, never a whole image. ZZPM weighs each image as a whole: an image of
    several strips has its weights gathered first (`_squared_distance_sums`). An image that fits
    one strip is read once, whole; `batch_scores` scores a run of such images in one task.

    `predictions`, `truth` and `ensemble` (or None) are the stores' opened pixel arrays: the task
    reads its pixels itself (`chunks.read_pixels`), so the graph holds no slices of dask arrays,
    whose building took longer than the scoring of small images, and imported distributed."""
    height, width, channels = shape
    weights = None
    if len(_strips(shape, crop_border, strip_pixels)[0]) > 1:
        sums = _squared_distance_sums(predictions, offset, shape, max(strip_pixels * channels, PAIRWISE_BLOCK))
        weights = zzpm_weights(sums / (height * width * channels))
    sources = {schema.PREDICTION: predictions, schema.GROUND_TRUTH: truth, schema.ENSEMBLE: ensemble}
    read = lambda name, start, stop: read_pixels(sources[name], start, stop)  # noqa: E731
    return _scores(read, ensemble is not None, offset, shape, names, crop_border, y_channel, luts, strip_pixels, weights)


def batch_scores(
    predictions,
    truth,
    ensemble,
    layout: np.ndarray,
    names: list[str],
    crop_border: int,
    y_channel: bool,
    luts: dict | None = None,
    folds: np.ndarray | None = None,
) -> list[dict]:
    """One task: `image_scores` of each of a batch of consecutive images that fit one strip each
    (`layout`: their (offset, height, width, channels)), their pixels read once per store (each
    chunk read and checked once) and scored one image after the other. `luts`: {fold: LUTs of
    `image_scores`} with the fold of each image in `folds`, or None."""
    start = int(layout[0, 0])
    stop = int(layout[-1, 0] + layout[-1, 1] * layout[-1, 2])
    sources = {schema.PREDICTION: predictions, schema.GROUND_TRUTH: truth, schema.ENSEMBLE: ensemble}
    pixels = {name: read_pixels(source, start, stop) for name, source in sources.items() if source is not None}
    read = lambda name, first, last: pixels[name][..., first - start : last - start, :]  # noqa: E731
    return [
        _scores(
            read,
            ensemble is not None,
            offset,
            (height, width, channels),
            names,
            crop_border,
            y_channel,
            None if luts is None else luts[int(folds[n])],
            STRIP_PIXELS,
            None,
        )
        for n, (offset, height, width, channels) in enumerate(layout.tolist())
    ]


def _scores(read, has_ensemble: bool, offset, shape, names, crop_border, y_channel, luts, strip_pixels, weights) -> dict:
    """`image_scores`, reading pixels start:stop of a store's predictions, ground truth or ensemble
    with read(variable, start, stop); `weights`: ZZPM's of an image of several strips (None for an
    image of one strip, which ZZPM weighs as it reads it)."""
    height, width, channels = shape
    strips, reads = _strips(shape, crop_border, strip_pixels)
    scorer = None
    for (start, stop), (first, last) in zip(strips, reads):
        pixels = (offset + first * width, offset + last * width)
        block = read(schema.PREDICTION, *pixels)
        candidates = dict(zip(names, block))
        candidates[AVERAGE] = average(block)
        candidates[ZZPM] = zzpm(block) if weights is None else blend_spans(block, weights[None], [(0, block.shape[1])])
        if has_ensemble:
            candidates[ENSEMBLE] = read(schema.ENSEMBLE, *pixels)
        for method, (lut, bin_width) in (luts or {}).items():
            candidates[method] = blend(block, lut, bin_width)

        rows_read = (last - first, width, channels)
        in_strip = slice(start - first, stop - first)
        if scorer is None:
            scorer = metrics.StripScorer(len(candidates), shape, crop_border, y_channel, _strip_rows(width, strip_pixels))
        scorer.add(
            [values.reshape(rows_read)[in_strip] for values in candidates.values()],
            read(schema.GROUND_TRUTH, *pixels).reshape(rows_read)[in_strip],
        )
    psnrs, ssims = scorer.scores()
    return {"psnr": dict(zip(candidates, psnrs)), "ssim": dict(zip(candidates, ssims))}


def _strip_rows(width: int, strip_pixels: int) -> int:
    return max(1, strip_pixels // width)


def _strips(shape: tuple[int, int, int], crop_border: int, strip_pixels: int) -> tuple[list, list]:
    """(rows start:stop each strip scores, rows first:last read for it) of an image of `shape`: one
    read of the whole image when it fits one strip."""
    strips = metrics.strip_bounds(shape[0], crop_border, _strip_rows(shape[1], strip_pixels))
    return strips, [(0, shape[0])] if len(strips) == 1 else strips


def _squared_distance_sums(predictions, offset: int, shape: tuple[int, int, int], piece_values: int) -> np.ndarray:
    """`blend.squared_distance_sums` (K,) of the image of `shape` at pixel `offset`, for ZZPM's
    weights, reading a piece of at most `piece_values` values (at least the 128 of a pairwise
    block) at a time.

    `squared_distance_sums` adds the values of the whole image in numpy's pairwise order: halves
    (the first a multiple of 8) down to blocks of 128 values. The pieces here are nodes of that
    tree, added as the tree adds them (`_pieces`), so the sums are the bits it gives on the whole image."""
    channels = shape[2]

    def piece(start: int, n: int) -> np.ndarray:
        first, stop = _piece_pixels(start, n, channels)
        values = read_pixels(predictions, offset + first, offset + stop)
        skip = start - first * channels
        return squared_distance_sums(values.reshape(len(values), -1)[:, skip : skip + n])

    return _pieces(0, shape[0] * shape[1] * channels, piece_values, piece)


def _piece_pixels(start: int, n: int, channels: int) -> tuple[int, int]:
    """Pixels first:stop of an image that hold its values start:start + n (pixel-major)."""
    return start // channels, -(-(start + n) // channels)


def _pieces(start: int, n: int, piece_values: int, piece):
    """piece(start, n) of each node of numpy's pairwise summation tree over values start:start + n
    that holds at most `piece_values` values (at least the 128 of a pairwise block), added as the
    tree adds them."""
    if n > piece_values:
        half = n // 2
        half -= half % 8
        return _pieces(start, half, piece_values, piece) + _pieces(start + half, n - half, piece_values, piece)
    return piece(start, n)


def _reads(offset: int, shape: tuple[int, int, int], crop_border: int) -> tuple[list, list]:
    """Pixel ranges (start, stop) that `image_scores` reads of the image of `shape` at `offset`:
    (of the predictions alone: ZZPM's pieces; of every store it scores: the strips)."""
    height, width, channels = shape
    strips, reads = _strips(shape, crop_border, STRIP_PIXELS)
    strip_reads = [(offset + first * width, offset + last * width) for first, last in reads]
    if len(strips) == 1:
        return [], strip_reads
    ranges = []

    def piece(start: int, n: int) -> int:
        first, stop = _piece_pixels(start, n, channels)
        ranges.append((offset + first, offset + stop))
        return 0

    _pieces(0, height * width * channels, max(STRIP_PIXELS * channels, PAIRWISE_BLOCK), piece)
    return ranges, strip_reads


@dataclass(frozen=True)
class _Batches:
    """The tasks evaluate runs, in the store's order of images: per task its images and whether it
    scores one image strip by strip (`image_scores`) or a batch of images of one strip each
    (`batch_scores`); and the chunks and bytes they read."""

    images: list[range]
    strip_wise: list[bool]
    chunks: int
    bytes_read: int

    def tasks(self, index, channels, arrays, models, crop_border, y_channel, luts=None, folds=None) -> list:
        """The delayed scores of each batch: `arrays` (predictions, truth, ensemble or None) as
        graph keys; `luts` {fold: {method: (weights, bin_width)}} with `folds` the fold of each image."""
        tasks = []
        for images, strip_wise in zip(self.images, self.strip_wise):
            if strip_wise:
                i = images[0]
                shape = (int(index.heights[i]), int(index.widths[i]), channels)
                own = None if luts is None else luts[int(folds[i])]
                tasks.append(
                    dask.delayed(image_scores, pure=True)(
                        *arrays, int(index.offsets[i]), shape, models, crop_border, y_channel, own, STRIP_PIXELS
                    )
                )
                continue
            rows = slice(images.start, images.stop)
            layout = np.stack(
                [index.offsets[rows], index.heights[rows], index.widths[rows], np.full(len(images), channels)], axis=1
            ).astype(np.int64)
            own_folds = None if folds is None else folds[rows]
            own = None if luts is None else {int(f): luts[int(f)] for f in np.unique(own_folds)}
            tasks.append(dask.delayed(batch_scores, pure=True)(*arrays, layout, models, crop_border, y_channel, own, own_folds))
        return tasks

    def per_image(self, results) -> list[dict]:
        """The scores of each image, in order, from the results of `tasks`."""
        return [scores for result, strip_wise in zip(results, self.strip_wise) for scores in ([result] if strip_wise else result)]


def _batches(index: schema.ImageIndex, sources: dict, crop_border: int) -> _Batches:
    """Evaluate's tasks over the images of `index`, reading `sources` ({variable: `chunks.PixelSource`}):
    `batches.consecutive_runs` of the bytes read, an image of more than one strip alone."""
    channels = sources[schema.GROUND_TRUTH].array.shape[-1]
    bytes_per_pixel = {variable: math.prod(s.array.shape) // s.array.shape[-2] for variable, s in sources.items()}
    # more than one strip (`_strips`): more rows left by the crop border than a strip holds
    alone = index.heights - 2 * crop_border > np.maximum(1, STRIP_PIXELS // index.widths)
    images = consecutive_runs(index.counts, sum(bytes_per_pixel.values()), alone)
    strip_wise = [len(batch) == 1 and bool(alone[batch[0]]) for batch in images]
    pieces, strips = [], []
    for batch, own in zip(images, strip_wise):
        if own:
            i = batch[0]
            shape = (int(index.heights[i]), int(index.widths[i]), channels)
            own_pieces, own_strips = _reads(int(index.offsets[i]), shape, crop_border)
            pieces += own_pieces
            strips += own_strips
        else:
            strips.append(pixel_range(index.offsets, index.counts, batch))
    chunks = read = 0
    for variable, source in sources.items():
        ranges = strips + pieces if variable == schema.PREDICTION else strips
        n_chunks, n_pixels = chunk_reads(ranges, source.array.chunks[-2], source.array.shape[-2])
        chunks += n_chunks
        read += n_pixels * bytes_per_pixel[variable]
    return _Batches(images, strip_wise, chunks, read)


def _check_crop_border(store: str, index: schema.ImageIndex, crop_border: int) -> None:
    """Refuse a crop border that leaves no pixels of some image of the store, naming its smallest."""
    sides = np.minimum(index.heights, index.widths)
    smallest = int(np.argmin(sides))
    if 2 * crop_border >= sides[smallest]:
        raise InputError(
            f"{store}: --crop-border {crop_border} leaves no pixels of its smallest image "
            f"'{index.stems[smallest]}' ({index.heights[smallest]}x{index.widths[smallest]}): "
            f"at most {(sides[smallest] - 1) // 2}"
        )


def _check_made_from(ensemble: StoreIndex, ensemble_store: str, ds: StoreIndex, store: str) -> None:
    """Refuse an `apply` output that was not made from the store as it is now.

    apply records the fingerprint of the store it blended (`fingerprint.store_fingerprint`: models,
    stems, sizes, chunking and source files' SHA-256) and how many images it had; where both
    stores carry a `store_id` (the output as `source_store_id`), those must agree too. An output
    made before the store grew by appends covers only its first images: it is refused as well,
    saying so (apply, run again, adds the new images to it), rather than scored on part of the set."""
    attrs, n_images = ensemble.attrs, ds.sizes["image"]
    made_from = attrs.get("source", "another store")
    recorded, made_images = attrs.get("source_fingerprint"), attrs.get("source_images")
    if recorded is None:
        raise InputError(
            f"{ensemble_store}: records no source store (no source_fingerprint: not made by apply, or by "
            f"an older version), so it cannot be checked against {store}: run apply on {store} again"
        )
    ids = (attrs.get("source_store_id"), ds.attrs.get("store_id"))
    if None not in ids and ids[0] != ids[1]:
        raise InputError(f"{ensemble_store}: made from {made_from} (store_id {ids[0]}), not from {store} (store_id {ids[1]})")
    if recorded == store_fingerprint(ds):
        return
    if isinstance(made_images, int) and 0 < made_images < n_images and recorded == store_fingerprint(ds, made_images):
        raise InputError(
            f"{ensemble_store}: made from the first {made_images} images of {store}, which has "
            f"{n_images} since it grew: run apply again to add the others"
        )
    raise InputError(
        f"{ensemble_store}: made from {made_from}, not from {store} (their models, images, chunking or "
        f"source files differ): score it against the store it was made from, or run apply on {store}"
    )


def _means(scores: list[dict], metric: str) -> dict[str, float]:
    """Mean per method over the images that have the metric (SSIM is NaN for images smaller than
    its 11x11 window); NaN when none has it."""
    means = {}
    for name in scores[0][metric]:
        values = np.array([s[metric][name] for s in scores], dtype=np.float64)
        scored = values[~np.isnan(values)]
        means[name] = float(scored.mean()) if len(scored) else float("nan")
    return means


def _ssim_cell(value: float) -> str:
    return f"{value:6.4f}" if math.isfinite(value) else f"{'n/a':>6}"


@dataclass
class Evaluation:
    """Per-image scores, their means over images and, for cross-validation, per-fold means."""

    images: list[str]
    models: list[str]
    per_image: list[dict]
    options: dict
    fold_of_image: list[int] | None = None

    def means(self, metric: str) -> dict[str, float]:
        return _means(self.per_image, metric)

    def fold_means(self) -> list[dict]:
        """Mean PSNR/SSIM of the held-out images of each fold."""
        folds = sorted(set(self.fold_of_image or []))
        return [
            {
                "fold": f,
                **{m: _means([s for s, g in zip(self.per_image, self.fold_of_image) if g == f], m) for m in ("psnr", "ssim")},
            }
            for f in folds
        ]

    def to_json(self) -> dict:
        result = {
            "images": len(self.images),
            "psnr": self.means("psnr"),
            "ssim": self.means("ssim"),
            "options": self.options,
            "per_image": [{"image": stem, **scores} for stem, scores in zip(self.images, self.per_image)],
        }
        if self.fold_of_image is not None:
            result["cv"] = {
                "folds": len(set(self.fold_of_image)),
                "per_fold": self.fold_means(),
                "psnr": result["psnr"],
                "ssim": result["ssim"],
            }
            for entry, fold in zip(result["per_image"], self.fold_of_image):
                entry["fold"] = fold
        return result

    def table(self) -> str:
        """Mean PSNR/SSIM per method (and per fold under cross-validation), gains underneath."""
        psnr, ssim = self.means("psnr"), self.means("ssim")
        width = max(len(name) for name in psnr)
        setting = f"{'Y channel' if self.options['y_channel'] else 'RGB'}, crop border {self.options['crop_border']}"
        if self.fold_of_image is not None:
            folds = self.fold_means()
            lines = [
                f"{len(self.images)} images, {len(folds)}-fold cross-validation by image (held-out scores), {setting}",
                f"{'method'.ljust(width)}  {'PSNR (dB)':>9}  {'SSIM':>6}  "
                + "  ".join(f"{'fold ' + str(f['fold']):>8}" for f in folds),
            ]
            lines += [
                f"{name.ljust(width)}  {psnr[name]:9.3f}  {_ssim_cell(ssim[name])}  "
                + "  ".join(f"{f['psnr'][name]:8.3f}" for f in folds)
                for name in psnr
            ]
        else:
            lines = [f"{len(self.images)} images, {setting}", f"{'method'.ljust(width)}  {'PSNR (dB)':>9}  {'SSIM':>6}"]
            lines += [f"{name.ljust(width)}  {psnr[name]:9.3f}  {_ssim_cell(ssim[name])}" for name in psnr]
        unscored = sum(any(math.isnan(value) for value in s["ssim"].values()) for s in self.per_image)
        if unscored:
            lines.append(
                f"SSIM over {len(self.images) - unscored} of {len(self.images)} images "
                f"({unscored} smaller than the 11x11 SSIM window after the crop border)"
            )
        best = max(self.models, key=psnr.get)
        for method in psnr:
            if method not in self.models and method not in (AVERAGE, ZZPM) and math.isfinite(psnr[method]):
                lines.append(
                    f"{method} vs best single model ({best}): {psnr[method] - psnr[best]:+.3f} dB; "
                    f"vs average: {psnr[method] - psnr[AVERAGE]:+.3f} dB"
                )
        return "\n".join(lines)


def plan_evaluate(store: str, ensemble_store: str | None = None, y_channel: bool = False, crop_border: int = 0) -> Plan:
    """Plan scoring every image of the reference store (and of an `apply` output, if given). Either
    store replaced or changed while it is read is refused (exit 75: `integrity.refuse_changed`)."""
    planned = {path: store_identity(path) for path in (store, ensemble_store) if path is not None}
    ds = open_store_index(store)
    models = schema.check_store(ds, store, require=(schema.PREDICTION, schema.GROUND_TRUTH))
    check_model_names(models, store)  # a store written before ingest refused such names
    index = schema.ImageIndex.from_dataset(ds)
    _check_crop_border(store, index, crop_border)
    if ensemble_store is not None:
        ens = open_store_index(ensemble_store)
        schema.check_store(ens, ensemble_store, require=(schema.ENSEMBLE,))
        _check_made_from(ens, ensemble_store, ds, store)
        other = schema.ImageIndex.from_dataset(ens)
        if other.stems != index.stems or not np.array_equal(other.counts, index.counts):
            raise InputError(f"{ensemble_store}: its images (names or sizes) differ from those of {store}")
    sources = {variable: pixel_array(store, variable) for variable in (schema.PREDICTION, schema.GROUND_TRUTH)}
    if ensemble_store is not None:
        sources[schema.ENSEMBLE] = pixel_array(ensemble_store, schema.ENSEMBLE)
    arrays = [
        task_argument(sources[v]) if v in sources else None for v in (schema.PREDICTION, schema.GROUND_TRUTH, schema.ENSEMBLE)
    ]
    batches = _batches(index, sources, crop_border)
    tasks = batches.tasks(index, ds.sizes["channel"], arrays, models, crop_border, y_channel)
    stage = Stage("score images", task_count(*tasks), batches.chunks, batches.bytes_read)
    options = {"y_channel": y_channel, "crop_border": crop_border}

    def execute(compute):
        scores = batches.per_image(compute(*tasks, label="evaluate"))
        for path, identity in planned.items():
            refuse_changed(path, identity)
        return Evaluation(index.stems, models, scores, options)

    details = {
        "store": str(store),
        "ensemble": str(ensemble_store) if ensemble_store else "none (models and average only)",
        "images": len(index.stems),
        "metrics": f"PSNR, SSIM on {'Y' if y_channel else 'RGB'}, crop border {crop_border}",
    }
    return Plan(f"evaluate {len(index.stems)} images", details, execute, stages=[stage])


def plan_cross_validation(
    store: str,
    n_folds: int,
    solvers=("em", "lsq"),
    bin_widths=(DEFAULT_BIN_WIDTH,),
    y_channel: bool = False,
    crop_border: int = 0,
    device: str = "auto",
) -> Plan:
    """Plan N-fold cross-validation by image: for each fold, LUTs fitted on the other folds (one
    statistics pass per bin width keeps the folds apart), scored on the fold's held-out images."""
    from ensir_flow.lut import moments_for  # the LUT solvers: cross-validation only
    from ensir_flow.solvers import fittable

    from .fit import lut_from_folds, statistics_graph

    planned = store_identity(store)
    ds = open_store_index(store)
    models = schema.check_store(ds, store, require=(schema.PREDICTION, schema.GROUND_TRUTH))
    check_model_names(models, store)  # a store written before ingest refused such names
    index = schema.ImageIndex.from_dataset(ds)
    if not 2 <= n_folds <= len(index.stems):
        raise InputError(f"{store}: --cv {n_folds} needs between 2 and {len(index.stems)} folds (one image at least per fold)")
    _check_crop_border(store, index, crop_border)
    folds = image_folds(len(index.stems), n_folds)
    tunings = {solver: fittable(solver).tuning for solver in solvers}
    graphs = [statistics_graph(store, ds, width, device, n_folds, moments_for(solvers)) for width in bin_widths]
    em_device = resolve_device(device)
    name = (lambda solver, width: solver) if len(bin_widths) == 1 else (lambda solver, width: f"{solver}@{width}")
    sources = {variable: pixel_array(store, variable) for variable in (schema.PREDICTION, schema.GROUND_TRUTH)}
    arrays = (task_argument(sources[schema.PREDICTION]), task_argument(sources[schema.GROUND_TRUTH]), None)
    batches = _batches(index, sources, crop_border)
    options = {"y_channel": y_channel, "crop_border": crop_border, "solvers": list(solvers), "bin_widths": list(bin_widths)}

    def held_out(luts) -> list:
        return batches.tasks(index, ds.sizes["channel"], arrays, models, crop_border, y_channel, luts, folds)

    def execute(compute):
        per_width = compute(*graphs, label="statistics")
        luts = {fold: {} for fold in range(n_folds)}
        for width, fold_statistics in zip(bin_widths, per_width):
            for fold in range(n_folds):
                training = [s for f, s in enumerate(fold_statistics) if f != fold]
                for solver in solvers:
                    lut = lut_from_folds(training, models, em_device, solver)
                    luts[fold][name(solver, width)] = (dask.delayed(lut.lookup_table(), pure=True), width)
        scores = batches.per_image(compute(*held_out(luts), label="held-out scores"))
        refuse_changed(store, planned)
        return Evaluation(index.stems, models, scores, options, folds.tolist())

    pixel_bytes = ds.sizes["pixel"] * ds.sizes["channel"] * (len(models) + 1)
    # the tasks of the LUTs to come: their tables are data in the graph, as None is
    unfitted = {
        fold: {name(solver, width): (None, width) for solver in solvers for width in bin_widths} for fold in range(n_folds)
    }
    n_luts = n_folds * len(solvers) * len(bin_widths)
    stages = [
        Stage(
            "statistics", task_count(*graphs), 2 * len(pixel_chunk_lengths(ds)) * len(bin_widths), pixel_bytes * len(bin_widths)
        ),
        Stage(f"fit {n_luts} LUTs", 0, note="one per solver, bin width and fold, in this process, from the statistics"),
        Stage("held-out scores", task_count(*held_out(unfitted)), batches.chunks, batches.bytes_read),
    ]
    details = {
        "store": str(store),
        "images": len(index.stems),
        "folds": f"{n_folds} (image i in fold i % {n_folds})",
        "solvers": ", ".join(solvers),
        "bin widths": ", ".join(map(str, bin_widths)),
        "metrics": f"PSNR, SSIM on {'Y' if y_channel else 'RGB'}, crop border {crop_border}",
        **{
            f"{solver} {tuning.parameter}": f"chosen by nested cross-validation on the training folds (default "
            f"{tuning.default:g} with one training fold)"
            for solver, tuning in tunings.items()
            if tuning is not None
        },
    }
    return Plan(f"{n_folds}-fold cross-validation of {', '.join(solvers)}", details, execute, stages=stages)
