"""Export and evaluate run a task per batch of images (tens of MB of pixels), not per image: the
counts of tasks and chunk reads their plans state are those they run, each chunk of a batch is
read once, and the PNGs and scores are those of a plain loop over the images."""

import threading
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from ensir_flow import api, metrics, schema
from ensir_flow.blend import average, zzpm
from ensir_flow.images import encode_png
from ensir_flow.pipelines import batches, chunks, evaluate
from ensir_flow.pipelines.evaluate import plan_cross_validation, plan_evaluate
from ensir_flow.pipelines.executor import threaded_compute
from ensir_flow.pipelines.export import export, export_stages, export_text
from ensir_flow.pipelines.plan import task_count
from ensir_flow.pipelines.stores import open_store
from helpers import make_corpus

#: 40 images of 16 x 16 in chunks of 4096 pixels: 16 images a chunk, three chunks (the last half full).
N_IMAGES, SIDE, CHUNK_PIXELS = 40, 16, 4096
#: An image of 120 x 100 (12,000 pixels, across chunks; 6 strips at 2,000 pixels a strip), 'img2':
#: the 13th in the store, which orders images by name (img0, img1, img10, ..., img19, img2).
BIG, BIG_AT, STRIP = (120, 100), 2, 2000


def _store(root: Path, sizes) -> Path:
    make_corpus(root / "corpus", sizes=sizes)
    store = root / "store.zarr"
    api.ingest(root / "corpus", store, chunk_pixels=CHUNK_PIXELS, scheduler="threads", progress=False)
    return store


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> Path:
    return _store(tmp_path_factory.mktemp("small"), [(SIDE, SIDE)] * N_IMAGES)


@pytest.fixture(scope="module")
def mixed_store(tmp_path_factory) -> Path:
    sizes = [(SIDE, SIDE)] * N_IMAGES
    sizes[BIG_AT] = BIG
    return _store(tmp_path_factory.mktemp("mixed"), sizes)


class Counted:
    """threaded_compute that records the tasks of each graph it runs and every chunk read (by array)."""

    def __init__(self, monkeypatch):
        self.tasks, self.chunks, lock = [], [], threading.Lock()
        read_chunk = chunks._read_chunk

        def counted(source, index, start, stop):
            with lock:
                self.chunks.append((source.name, index))
            return read_chunk(source, index, start, stop)

        monkeypatch.setattr(chunks, "_read_chunk", counted)

    def __call__(self, *collections, label=""):
        self.tasks.append(task_count(*collections))
        return threaded_compute(*collections, label=label)


def _images(store: Path, variable: str):
    """(stem, pixels (..., H, W, C)) of each image of `variable`, read with xarray: the plain loop's input."""
    ds = xr.open_zarr(store)
    values = ds[variable].values
    for stem, h, w, offset in zip(ds["image"].values, ds["height"].values, ds["width"].values, ds["pixel_offset"].values):
        pixels = values[..., int(offset) : int(offset + h * w), :]
        yield str(stem), pixels.reshape(*pixels.shape[:-2], int(h), int(w), -1)


def test_runs_of_consecutive_items_hold_the_budget(monkeypatch):
    monkeypatch.setattr(batches, "BATCH_BYTES", 3)
    runs = batches.consecutive_runs([1, 1, 5, 1, 1, 1, 1, 2], 1)
    assert runs == [range(0, 2), range(2, 3), range(3, 6), range(6, 8)]
    assert batches.consecutive_runs([1, 1, 1, 1], 1, alone=[False, True, False, False]) == [
        range(0, 1),
        range(1, 2),
        range(2, 4),
    ]
    assert batches.chunk_reads([(0, 10), (10, 11), (15, 25), (5, 5)], 10, 22) == (4, 32)


@pytest.mark.parametrize("budget, n_batches", [(batches.BATCH_BYTES, 1), (SIDE * SIDE * 3 * 11, 4)])
def test_export_writes_a_task_per_batch_and_the_png_of_each_image(small_store, tmp_path, monkeypatch, budget, n_batches):
    """Default budget: the 40 images (30 KB) in one task; 11 images a batch: 4 tasks (11, 11, 11, 7)."""
    monkeypatch.setattr(batches, "BATCH_BYTES", budget)
    counted = Counted(monkeypatch)
    (stage,) = export_stages(open_store(str(small_store)), schema.GROUND_TRUTH)
    export(str(small_store), str(tmp_path / "pngs"), counted, variable=schema.GROUND_TRUTH)

    assert counted.tasks == [n_batches] == [stage.tasks]
    assert len(counted.chunks) == stage.chunks == (3 if n_batches == 1 else 6)  # chunks 0-2; or 0, 0-1, 1-2, 2
    assert stage.bytes_written == N_IMAGES * SIDE * SIDE * 3
    text = export_text(str(small_store), schema.GROUND_TRUTH)
    images = list(_images(small_store, schema.GROUND_TRUTH))
    assert sorted(p.name for p in (tmp_path / "pngs").iterdir()) == sorted(f"{stem}.png" for stem, _ in images)
    for stem, pixels in images:
        assert (tmp_path / "pngs" / f"{stem}.png").read_bytes() == encode_png(np.ascontiguousarray(pixels), text)


def _plain_scores(store: Path, crop_border: int = 0) -> list[tuple[list, list]]:
    """PSNR and SSIM of each model, the average and ZZPM per image: metrics.scores in a loop."""
    truths = dict(_images(store, schema.GROUND_TRUTH))
    return [
        metrics.scores([*predictions, average(predictions), zzpm(predictions)], truths[stem], crop_border)
        for stem, predictions in _images(store, schema.PREDICTION)
    ]


@pytest.mark.parametrize("budget, n_batches", [(batches.BATCH_BYTES, 1), (SIDE * SIDE * 12 * 10, 4)])
def test_evaluate_scores_a_batch_per_task_as_a_loop_over_images(small_store, monkeypatch, budget, n_batches):
    """12 bytes a pixel (3 models and the ground truth, RGB): 10 images a batch at the smaller budget."""
    monkeypatch.setattr(batches, "BATCH_BYTES", budget)
    counted = Counted(monkeypatch)
    plan = plan_evaluate(str(small_store))
    evaluation = plan.run(counted)

    (stage,) = plan.stages
    assert counted.tasks == [n_batches] == [stage.tasks]
    assert len(counted.chunks) == stage.chunks == 2 * (3 if n_batches == 1 else 6)  # 0; 0-1; 1; 1-2 of each array
    assert len(set(counted.chunks)) == 6  # each read once where a batch holds all
    for scores, (psnrs, ssims) in zip(evaluation.per_image, _plain_scores(small_store), strict=True):
        assert list(scores["psnr"].values()) == psnrs
        assert list(scores["ssim"].values()) == ssims


def test_an_image_larger_than_a_strip_is_scored_alone_a_strip_at_a_time(mixed_store, monkeypatch):
    """The big image is its own task, which reads a strip (and its SSIM halo) at a time: the
    batches before and after it hold the small images; the scores are still the loop's."""
    monkeypatch.setattr(evaluate, "STRIP_PIXELS", STRIP)
    reads, read_pixels, lock = [], evaluate.read_pixels, threading.Lock()

    def recorded(source, start, stop):
        with lock:
            reads.append((source.name, start, stop))
        return read_pixels(source, start, stop)

    monkeypatch.setattr(evaluate, "read_pixels", recorded)
    counted = Counted(monkeypatch)
    plan = plan_evaluate(str(mixed_store), crop_border=2)
    evaluation = plan.run(counted)

    assert counted.tasks == [3] == [plan.stages[0].tasks]  # images 0-11, the big one, images 13-39
    assert len(counted.chunks) == plan.stages[0].chunks
    big_start = 12 * SIDE * SIDE
    big_reads = [stop - start for _, start, stop in reads if big_start <= start < big_start + BIG[0] * BIG[1]]
    assert len(big_reads) > 6 and max(big_reads) <= (STRIP // BIG[1] + 10) * BIG[1]
    for scores, (psnrs, ssims) in zip(evaluation.per_image, _plain_scores(mixed_store, 2), strict=True):
        assert list(scores["psnr"].values()) == psnrs
        np.testing.assert_array_equal(list(scores["ssim"].values()), ssims)


def test_export_of_an_image_over_the_budget_is_a_task_of_its_own(mixed_store, tmp_path, monkeypatch):
    monkeypatch.setattr(batches, "BATCH_BYTES", SIDE * SIDE * 3 * 8)
    counted = Counted(monkeypatch)
    export(str(mixed_store), str(tmp_path / "pngs"), counted, variable=schema.GROUND_TRUTH)
    assert counted.tasks == [2 + 1 + 4]  # 8 and 4 images before the big one, it, then 8, 8, 8 and 3
    text = export_text(str(mixed_store), schema.GROUND_TRUTH)
    for stem, pixels in _images(mixed_store, schema.GROUND_TRUTH):
        assert (tmp_path / "pngs" / f"{stem}.png").read_bytes() == encode_png(np.ascontiguousarray(pixels), text)


def test_cross_validation_scores_do_not_depend_on_the_batches(small_store, monkeypatch):
    """Batches of images of every fold (each scored with its fold's LUTs) give the scores of a task per image."""
    runs = {}
    for budget in (1, SIDE * SIDE * 12 * 7):
        monkeypatch.setattr(batches, "BATCH_BYTES", budget)
        counted = Counted(monkeypatch)
        plan = plan_cross_validation(str(small_store), 3, ("lsq",), device="cpu")
        runs[budget] = plan.run(counted).to_json()
        assert counted.tasks == [plan.stages[0].tasks, plan.stages[-1].tasks] and counted.tasks[1] == (
            N_IMAGES if budget == 1 else 6
        )
    assert runs[1] == runs[SIDE * SIDE * 12 * 7]
