"""The plans of fit and apply on stores of many chunks: a task per run of consecutive chunks
(`chunks.chunk_runs`), so that their tasks grow with the store's bytes, not with its chunks, and
plans built from the metadata alone; the same LUT and output as a task per chunk."""

import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from ensir_flow.pipelines import chunks
from ensir_flow.pipelines.apply import plan_apply
from ensir_flow.pipelines.chunks import MERGE_FAN_IN
from ensir_flow.pipelines.fit import plan_fit
from ensir_flow.pipelines.plan import task_count
from helpers import contents

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from plan_scale import metadata_store  # noqa: E402

FRAMES, SIDE, CHUNK = 20_000, 4, 32  # 10,000 chunks of 2 frames
#: Bytes of a run in these tests: 100 chunks of predictions and ground truth (4 x 32 px x 3 channels).
RUN_BYTES = 100 * 4 * CHUNK * 3


class _FirstPass(Exception):
    pass


def _first_pass_tasks(plan) -> int:
    """The tasks of the first graph the plan's run hands its compute (which stops it there)."""
    submitted = []

    def compute(*collections, label=""):
        submitted.append(task_count(*collections))
        raise _FirstPass

    with pytest.raises(_FirstPass):
        plan.run(compute)
    return submitted[0]


def _most_tasks(n_runs: int) -> int:
    """A pass of `n_runs` run tasks and its tree of merges."""
    total = n_runs
    while n_runs > 1:
        n_runs = -(-n_runs // MERGE_FAN_IN)
        total += n_runs
    return total


def test_passes_over_many_chunks_run_a_task_per_run_of_chunks_planned_from_metadata(tmp_path, monkeypatch):
    monkeypatch.setattr(chunks, "RUN_BYTES", RUN_BYTES)
    store = metadata_store(str(tmp_path / "s.zarr"), FRAMES, SIDE, SIDE, chunk_pixels=CHUNK)  # no pixel chunk written
    n_chunks = FRAMES * SIDE * SIDE // CHUNK
    assert n_chunks > chunks.CHUNK_TASKS
    runs = -(-n_chunks // 100)  # each at least RUN_BYTES of predictions and ground truth
    lut = tmp_path / "lut.zarr"
    fit = plan_fit(store, str(tmp_path / "unused.zarr"))
    statistics = fit.stages[0]
    assert statistics.chunks == 2 * n_chunks and statistics.tasks == _most_tasks(runs) == _first_pass_tasks(fit)

    _fitted_lut(tmp_path / "tiny", lut)
    apply = plan_apply(store, str(lut), str(tmp_path / "out.zarr"))
    (blend,) = apply.stages
    most = n_chunks * CHUNK * 3 * 3 // RUN_BYTES + 1  # runs of at least RUN_BYTES of predictions alone, the last maybe less
    assert blend.chunks == n_chunks and blend.tasks <= most and _first_pass_tasks(apply) == blend.tasks


def _fitted_lut(folder: Path, lut: Path) -> None:
    """A LUT of the models of `metadata_store` (3, RGB), fitted on a tiny store."""
    from ensir_flow.pipelines.ingest import plan_ingest
    from helpers import make_corpus

    make_corpus(folder / "corpus")
    plan_ingest(str(folder / "corpus"), str(folder / "s.zarr"), chunk_pixels=700).run()
    plan_fit(str(folder / "s.zarr"), str(lut)).run()


#: Tasks of each stage of fit and apply on a store of 8 chunks of 300 pixels, a task per chunk and
#: in runs (fit: 3 runs of 3 chunks of 4 planes; apply: 2 runs of 4 chunks of 3 planes), merges included.
EXPECTED_TASKS = {
    "em": {"chunks": [9, 1, 8], "runs": [4, 1, 2]},
    "zzpm": {
        "chunks": [9, 1, 2, 8],
        "runs": [4, 1, 2, 2],
    },  # per-image weights: one run of at least BATCH_BYTES, then the weights
}


@pytest.mark.parametrize("solver", ["em", "zzpm"])
def test_runs_of_chunks_give_the_lut_and_output_of_a_task_per_chunk(tmp_path, corpus, invoke, monkeypatch, solver):
    root, _ = corpus
    assert invoke("ingest", root, tmp_path / "s.zarr", "--chunk-pixels", 300, "--no-progress").exit_code == 0
    store = str(tmp_path / "s.zarr")
    outputs = {}
    for name, chunk_tasks in (("chunks", chunks.CHUNK_TASKS), ("runs", 1)):
        monkeypatch.setattr(chunks, "CHUNK_TASKS", chunk_tasks)
        monkeypatch.setattr(chunks, "RUN_BYTES", 3 * 300 * 4 * 3)  # runs of 3 chunks
        fit = plan_fit(store, str(tmp_path / f"{name}.lut.zarr"), solver=solver)
        fit.run()
        apply = plan_apply(store, str(tmp_path / f"{name}.lut.zarr"), str(tmp_path / f"{name}.out.zarr"))
        apply.run()
        outputs[name] = [stage.tasks for stage in (*fit.stages, *apply.stages)]
    assert outputs == EXPECTED_TASKS[solver]
    luts = [contents(tmp_path / f"{name}.lut.zarr").drop_attrs() for name in ("chunks", "runs")]
    xr.testing.assert_identical(*luts)
    ensembles = [contents(tmp_path / f"{name}.out.zarr")["ensemble"].values for name in ("chunks", "runs")]
    np.testing.assert_array_equal(*ensembles)
