"""What ingest submits: one decoding task per group of consecutive images and one task per chunk
that assembles and writes it, so the tasks grow with the bytes of a corpus, not its images,
with the stores they write the same whatever the grouping."""

from collections import Counter

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


def test_a_killed_run_resumes_the_chunks_left_and_an_append_adds_groups(tmp_path, monkeypatch):
    root, more = tmp_path / "corpus", tmp_path / "more"
    make_corpus(root, sizes=TINY[:60])
    make_corpus(more, sizes=TINY[60:100], seed=1)
    for folder in more.iterdir():  # stems the store lacks
        for path in folder.iterdir():
            path.rename(folder / f"new{path.name}")

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
