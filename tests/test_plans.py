"""A plan says before it runs what each of its stages will submit: the task counts `--dry-run`
prints are those the run then executes, and the bytes follow from the store's shape."""

import json
from collections import Counter

import pytest
import zarr
from dask.callbacks import Callback

from ensir_flow.errors import InputError
from ensir_flow.pipelines import apply as apply_pipeline
from ensir_flow.pipelines.apply import plan_apply
from ensir_flow.pipelines.executor import threaded_compute
from ensir_flow.pipelines.fit import plan_fit
from ensir_flow.pipelines.resumable import COMPLETE, resumable_location


class _CountingCompute:
    """A `Compute` on dask's threads that counts the tasks each labelled computation executes."""

    def __init__(self):
        self.tasks = Counter()

    def __call__(self, *collections, label: str = ""):
        def count(key, dsk, state):
            self.tasks[label] += 1

        with Callback(pretask=count):
            return threaded_compute(*collections)


@pytest.fixture
def store(tmp_path, corpus, invoke):
    root, _ = corpus
    assert invoke("ingest", root, tmp_path / "s.zarr", "--chunk-pixels", 700).exit_code == 0
    return tmp_path / "s.zarr"


def test_fit_submits_the_tasks_its_plan_counts(tmp_path, store):
    plan = plan_fit(str(store), str(tmp_path / "l.zarr"))
    statistics, solve = plan.stages
    compute = _CountingCompute()
    plan.run(compute)
    assert (statistics.name, statistics.tasks, compute.tasks["statistics"]) == ("statistics", 5, 5)  # 4 chunks, 1 merge
    assert (statistics.chunks, statistics.bytes_read) == (2 * 4, 2101 * 3 * 4)  # predictions and truth; 3 models + truth
    assert solve.tasks == compute.tasks["write LUT"] == 1


def test_apply_plans_the_chunks_it_will_compute_and_nothing_once_complete(tmp_path, store):
    assert plan_fit(str(store), str(tmp_path / "l.zarr")).run() is not None
    plan = plan_apply(str(store), str(tmp_path / "l.zarr"), str(tmp_path / "o.zarr"))
    (blend,) = plan.stages
    assert (blend.name, blend.tasks, blend.chunks, blend.bytes_read, blend.bytes_written) == (
        "blend and write",
        4,
        4,
        2101 * 3 * 3,
        2101 * 3,
    )
    compute = _CountingCompute()
    plan.run(compute)
    assert compute.tasks["apply"] == blend.tasks  # one per chunk
    assert plan_apply(str(store), str(tmp_path / "l.zarr"), str(tmp_path / "o.zarr")).stages == []


def test_dry_run_json_carries_the_stages(tmp_path, store, invoke):
    result = invoke("fit", store, tmp_path / "l.zarr", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    planned = json.loads(result.stdout)
    assert planned["status"] == "planned" and [stage["name"] for stage in planned["stages"]] == [
        "statistics",
        "em on the cells, write LUT",
    ]
    assert planned["stages"][0]["bytes_read"] == 2101 * 3 * 4 and not (tmp_path / "l.zarr").exists()


def test_apply_runs_the_graph_built_while_planning(tmp_path, store, monkeypatch):
    assert plan_fit(str(store), str(tmp_path / "l.zarr")).run() is not None
    plan = plan_apply(str(store), str(tmp_path / "l.zarr"), str(tmp_path / "o.zarr"))

    def built_again(*args, **kwargs):
        raise AssertionError("apply built its tasks again although nothing changed since its plan")

    monkeypatch.setattr(apply_pipeline.BlendGraph, "tasks", built_again)
    assert plan.run(_CountingCompute()).status == "written"


def test_apply_computes_what_is_left_when_the_staging_moved_on_since_its_plan(tmp_path, store, monkeypatch):
    assert plan_fit(str(store), str(tmp_path / "l.zarr")).run() is not None
    whole = plan_apply(str(store), str(tmp_path / "l.zarr"), str(tmp_path / "whole.zarr")).run()
    plan = plan_apply(str(store), str(tmp_path / "l.zarr"), str(tmp_path / "o.zarr"))  # planned: all 4 chunks
    real = apply_pipeline.write_chunk_then_mark

    def fourth_chunk_fails(writes, marks, index, *args, **kwargs):
        if index == 3:
            raise OSError("disk full (injected)")
        real(writes, marks, index, *args, **kwargs)

    monkeypatch.setattr(apply_pipeline, "write_chunk_then_mark", fourth_chunk_fails)
    with pytest.raises(OSError, match="injected"):  # another run of the same command, killed
        plan_apply(str(store), str(tmp_path / "l.zarr"), str(tmp_path / "o.zarr")).run(threaded_compute)
    monkeypatch.setattr(apply_pipeline, "write_chunk_then_mark", real)
    left = 4 - int(zarr.open_array(store=resumable_location(str(tmp_path / "o.zarr")), path=COMPLETE, mode="r")[:].sum())
    assert 1 <= left < 4 or pytest.fail("the killed run wrote no chunk: nothing moved on")
    compute = _CountingCompute()
    result = plan.run(compute)
    assert (result.status, result.chunks_computed, compute.tasks[f"apply ({left} of 4 chunks)"]) == ("resumed", left, left)
    assert (result.output["ensemble"].values == whole.output["ensemble"].values).all()


def test_apply_of_a_per_image_solver_submits_the_tasks_its_plan_counts(tmp_path, store):
    assert plan_fit(str(store), str(tmp_path / "l.zarr"), solver="zzpm").run() is not None
    plan = plan_apply(str(store), str(tmp_path / "l.zarr"), str(tmp_path / "o.zarr"))
    weights, blend = plan.stages
    assert (weights.name, weights.tasks, blend.tasks) == ("per-image weights", 2, 4)  # a batch of 4 chunks, the last task
    compute = _CountingCompute()
    plan.run(compute)
    assert compute.tasks["apply"] == weights.tasks + blend.tasks


def test_a_run_planned_before_another_made_its_output_does_not_replace_it(tmp_path, store):
    for solver in ("em", "average"):
        assert plan_fit(str(store), str(tmp_path / f"{solver}.zarr"), solver=solver).run() is not None
    first = plan_apply(str(store), str(tmp_path / "em.zarr"), str(tmp_path / "o.zarr"))
    second = plan_apply(str(store), str(tmp_path / "average.zarr"), str(tmp_path / "o.zarr"))
    assert second.run().status == "written"
    with pytest.raises(InputError, match="already exists"):
        first.run()
    assert plan_apply(str(store), str(tmp_path / "average.zarr"), str(tmp_path / "o.zarr")).stages == []  # still the second's
    again = plan_apply(str(store), str(tmp_path / "average.zarr"), str(tmp_path / "o.zarr"))
    assert plan_apply(str(store), str(tmp_path / "average.zarr"), str(tmp_path / "again.zarr")).run().status == "written"
    assert again.run().status == "unchanged"
