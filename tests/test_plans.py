"""A plan says before it runs what each of its stages will submit: the task counts `--dry-run`
prints are those the run then executes, and the bytes follow from the store's shape."""

import json
from collections import Counter

import pytest
from dask.callbacks import Callback

from ensir_flow.pipelines.apply import plan_apply
from ensir_flow.pipelines.executor import threaded_compute
from ensir_flow.pipelines.fit import plan_fit


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
