"""What ingest submits: one decoding task per group of consecutive images and one task per chunk
that assembles and writes it, so the tasks grow with the bytes of a corpus, not its images,
with the stores they write the same whatever the grouping."""

from collections import Counter
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import xarray as xr

from ensir_flow.pipelines import batches, ingest
from ensir_flow.pipelines.executor import threaded_compute
from ensir_flow.pipelines.ingest import plan_append, plan_ingest
from ensir_flow.pipelines.plan import task_count
from helpers import contents, make_corpus

#: Many tiny images, three models and ground truth.
TINY = [(6 + i % 5, 7 + i % 3) for i in range(120)]


class Counted:
    """A `Compute` that counts the tasks of what it computes, and may stop a run (as a kill
    would) after computing the first `stop_after` collections of its first call."""

    def __init__(self, stop_after: int | None = None):
        self.tasks = 0
        self.stop_after = stop_after

    def __call__(self, *collections, label=""):
        self.tasks += task_count(*collections)
        if self.stop_after is not None:
            threaded_compute(*collections[: self.stop_after])
            self.stop_after = None
            raise KeyboardInterrupt
        return threaded_compute(*collections)


def pixels_of(root, models, ds: xr.Dataset) -> np.ndarray:
    """The planes (models, then ground truth; pixel, channel) of the images of `ds` in its order, each read alone."""
    return np.stack(
        [
            np.concatenate([iio.imread(root / folder / f"{stem}.png").reshape(-1, 3) for stem in ds["image"].values])
            for folder in [*models, "gt"]
        ]
    )


def test_many_small_images_take_few_tasks_and_write_what_one_task_per_image_writes(tmp_path, monkeypatch):
    root = tmp_path / "corpus"
    models = make_corpus(root, sizes=TINY)
    monkeypatch.setattr(batches, "BATCH_BYTES", 4000)  # groups of about 5 images, each spanning a few chunks
    plan = plan_ingest(root, str(tmp_path / "grouped.zarr"), chunk_pixels=150)
    decode, write = plan.stages
    compute = Counted()
    plan.run(compute)

    n_pixels = sum(h * w for h, w in TINY)
    assert write.chunks == -(-n_pixels // 150)
    assert 1 < decode.tasks < len(TINY) / 4
    assert compute.tasks == decode.tasks + write.tasks == decode.tasks + write.chunks
    assert compute.tasks < len(TINY)  # one decoding task per file would be four times as many
    assert write.bytes_written == n_pixels * 4 * 3

    monkeypatch.setattr(batches, "BATCH_BYTES", 1)  # each image decoded by a task of its own
    plan_ingest(root, str(tmp_path / "single.zarr"), chunk_pixels=150).run()
    grouped, single = contents(tmp_path / "grouped.zarr"), contents(tmp_path / "single.zarr")
    xr.testing.assert_identical(grouped, single)
    truth = pixels_of(root, models, grouped)
    assert np.array_equal(grouped["prediction"].values, truth[:3])
    assert np.array_equal(grouped["ground_truth"].values, truth[3])


def test_a_big_image_spanning_many_chunks_is_decoded_once(tmp_path, monkeypatch):
    root = tmp_path / "corpus"
    sizes = [(9, 11), (120, 90), (7, 5), (13, 8)]
    models = make_corpus(root, sizes=sizes)
    reads = Counter()
    original = ingest.read_image_and_sha256

    def counted(path, info):
        reads[path.name, path.parent.name] += 1
        return original(path, info)

    monkeypatch.setattr(ingest, "read_image_and_sha256", counted)
    monkeypatch.setattr(batches, "BATCH_BYTES", 1000)
    plan = plan_ingest(root, str(tmp_path / "s.zarr"), chunk_pixels=400)
    decode, write = plan.stages
    plan.run()

    assert write.chunks > 25  # the big image alone spans 27 chunks
    assert decode.tasks == 3  # the big image a group of its own, between that of the image before it and that of the two after
    assert sorted(reads.values()) == [1] * 16  # every file of the 4 images x 4 folders read once
    ds = contents(tmp_path / "s.zarr")
    truth = pixels_of(root, models, ds)
    assert np.array_equal(ds["prediction"].values, truth[:3])
    assert np.array_equal(ds["ground_truth"].values, truth[3])


def _corpus_and_more(tmp_path: Path, first: int, more: int) -> tuple[Path, Path]:
    """A corpus of the `first` TINY images, and one of the `more` after them, named with stems the
    first lacks (to append)."""
    root, extra = tmp_path / "corpus", tmp_path / "more"
    make_corpus(root, sizes=TINY[:first])
    make_corpus(extra, sizes=TINY[first : first + more], seed=1)
    for folder in extra.iterdir():
        for path in folder.iterdir():
            path.rename(folder / f"new{path.name}")
    return root, extra


def test_a_killed_run_resumes_the_chunks_left_and_an_append_adds_groups(tmp_path, monkeypatch):
    root, more = _corpus_and_more(tmp_path, 60, 40)

    def ingest_then_append(store: str, group_bytes: int, stop_after: int | None = None):
        monkeypatch.setattr(batches, "BATCH_BYTES", group_bytes)
        if stop_after is not None:
            with pytest.raises(KeyboardInterrupt):
                plan_ingest(root, store, chunk_pixels=150).run(Counted(stop_after))
        written = plan_ingest(root, store, chunk_pixels=150).run()
        appended = plan_append(more, store)
        appended.run()
        return written, appended.stages

    resumed, stages = ingest_then_append(str(tmp_path / "grouped.zarr"), 3000, stop_after=5)
    assert resumed.status == "resumed" and resumed.chunks_written == resumed.chunks_total - 5
    assert stages[0].tasks > 1 and stages[1].chunks > 1  # the new images decoded in several groups, written in several chunks
    ingest_then_append(str(tmp_path / "single.zarr"), 1)
    xr.testing.assert_identical(contents(tmp_path / "grouped.zarr"), contents(tmp_path / "single.zarr"))


def test_a_plan_builds_the_write_tasks_of_the_chunks_left_and_the_run_rebuilds_them_only_if_others_are_left(
    tmp_path, monkeypatch
):
    """The plan of a killed ingest builds the tasks of the chunks it left unwritten and counts them;
    the run computes those, unless a source of a written chunk has changed since the plan (then it
    builds the tasks again, for the chunks left and those of the old bytes)."""
    root = tmp_path / "corpus"
    make_corpus(root, sizes=TINY[:60])
    n_chunks = -(-sum(h * w for h, w in TINY[:60]) // 150)
    monkeypatch.setattr(batches, "BATCH_BYTES", 3000)
    built = Counter()
    chunk_tasks = ingest.PixelBlocks.chunk_tasks

    def counted_chunk_tasks(self, kind, tasks, arguments=()):
        built[kind] += len(tasks)
        return chunk_tasks(self, kind, tasks, arguments)

    monkeypatch.setattr(ingest.PixelBlocks, "chunk_tasks", counted_chunk_tasks)

    def killed_then_planned(store: str):
        with pytest.raises(KeyboardInterrupt):
            plan_ingest(root, store, chunk_pixels=150).run(Counted(stop_after=5))  # chunks 0-4 written
        built.clear()
        plan = plan_ingest(root, store, chunk_pixels=150)
        assert built == {"write-chunk": n_chunks - 5}
        return plan

    fresh = plan_ingest(root, str(tmp_path / "fresh.zarr"), chunk_pixels=150)
    plan = killed_then_planned(str(tmp_path / "s.zarr"))
    decode, write = plan.stages
    assert (write.tasks, write.chunks) == (n_chunks - 5, n_chunks - 5) and "left 5 of the" in write.note
    assert 0 < decode.tasks < fresh.stages[0].tasks  # the groups that only chunks 0-4 overlap are not decoded
    compute = Counted()
    resumed = plan.run(compute)
    assert built == {"write-chunk": n_chunks - 5}  # the planned tasks, not built again
    assert compute.tasks == decode.tasks + write.tasks and resumed.chunks_written == write.tasks
    fresh.run()
    xr.testing.assert_identical(contents(tmp_path / "s.zarr"), contents(tmp_path / "fresh.zarr"))

    plan = killed_then_planned(str(tmp_path / "changed.zarr"))
    pixels = iio.imread(root / "model1" / "img0.png")  # in chunk 0, written before the kill
    iio.imwrite(root / "model1" / "img0.png", 255 - pixels)
    compute = Counted()
    resumed = plan.run(compute)
    assert built["write-chunk"] == 2 * (n_chunks - 5) + 1  # built again: the chunks left and chunk 0
    assert resumed.chunks_written == plan.stages[1].tasks + 1 and compute.tasks > sum(stage.tasks for stage in plan.stages)
    plan_ingest(root, str(tmp_path / "again.zarr"), chunk_pixels=150).run()
    xr.testing.assert_identical(contents(tmp_path / "changed.zarr"), contents(tmp_path / "again.zarr"))


def test_an_append_plan_counts_the_tasks_it_builds_and_runs(tmp_path, monkeypatch):
    root, more = _corpus_and_more(tmp_path, 30, 40)
    monkeypatch.setattr(batches, "BATCH_BYTES", 3000)
    plan_ingest(root, str(tmp_path / "s.zarr"), chunk_pixels=150).run()
    plan = plan_append(more, str(tmp_path / "s.zarr"))
    decode, append, checksums = plan.stages
    first = sum(h * w for h, w in TINY[:30])
    assert append.tasks == append.chunks == 1 + -(-(sum(h * w for h, w in TINY[30:70]) - (150 - first % 150)) // 150)
    assert checksums.tasks == append.tasks  # the store's last chunk, rewritten whole, and each new one
    compute = Counted()
    assert plan.run(compute) == 40
    assert compute.tasks == decode.tasks + append.tasks + checksums.tasks
    both = tmp_path / "both"
    for folder in root.iterdir():
        (both / folder.name).mkdir(parents=True)
        for path in [*folder.iterdir(), *(more / folder.name).iterdir()]:
            (both / folder.name / path.name).write_bytes(path.read_bytes())
    appended = contents(tmp_path / "s.zarr")
    truth = pixels_of(both, ["model0", "model1", "model2"], appended)
    assert appended.sizes["image"] == 70 and np.array_equal(appended["prediction"].values, truth[:3])
    assert np.array_equal(appended["ground_truth"].values, truth[3])
