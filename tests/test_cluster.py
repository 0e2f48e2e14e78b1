"""Running on an existing Dask cluster: by address or scheduler file, and refusing what cannot work."""

import threading

import dask
import numpy as np
import pytest
import xarray as xr
from distributed import Client, LocalCluster

import ensir_flow
from ensir_flow.pipelines.executor import check_workers
from helpers import make_corpus, run_workflow

pytestmark = pytest.mark.slow  # starts clusters of worker processes


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(address, scheduler file) of a running scheduler with one worker process."""
    scheduler_file = tmp_path_factory.mktemp("cluster") / "scheduler.json"
    with LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        scheduler_kwargs={"scheduler_file": str(scheduler_file)},
    ) as running:
        yield running.scheduler_address, scheduler_file


def test_an_existing_cluster_by_address_or_scheduler_file_gives_the_threaded_results(
    cluster, corpus, tmp_path, invoke, monkeypatch
):
    address, scheduler_file = cluster
    root, _ = corpus
    expected = run_workflow(invoke, root, tmp_path / "threads")
    for name, scheduler in [("address", address), ("file", scheduler_file)]:
        monkeypatch.setenv("ENSIR_FLOW_SCHEDULER", str(scheduler))
        assert run_workflow(invoke, root, tmp_path / name) == expected
        for store, variable in [("lut.zarr", "weights"), ("out.zarr", "ensemble")]:
            np.testing.assert_array_equal(
                xr.open_zarr(tmp_path / name / store)[variable].values,
                xr.open_zarr(tmp_path / "threads" / store)[variable].values,
            )


def test_a_many_model_lut_applies_on_the_cluster_to_the_threaded_bytes(cluster, tmp_path, invoke, monkeypatch):
    """K = 8 at w = 32: apply sends the worker the LUT's stored bins and weights (`blend.IndexedWeights`,
    pickled without its 33 MB row table), and the worker builds the table."""
    root = tmp_path / "corpus"
    make_corpus(root, n_models=8)
    expected = run_workflow(invoke, root, tmp_path / "threads")
    monkeypatch.setenv("ENSIR_FLOW_SCHEDULER", cluster[0])
    assert run_workflow(invoke, root, tmp_path / "cluster") == expected
    np.testing.assert_array_equal(
        xr.open_zarr(tmp_path / "cluster" / "out.zarr")["ensemble"].values,
        xr.open_zarr(tmp_path / "threads" / "out.zarr")["ensemble"].values,
    )


def test_workers_with_another_ensir_flow_are_refused_before_anything_is_written(cluster, corpus, tmp_path, invoke, monkeypatch):
    address, _ = cluster
    root, _ = corpus
    real_version = ensir_flow.__version__
    monkeypatch.setattr(ensir_flow, "__version__", "0.0.0+other")
    result = invoke("ingest", root, tmp_path / "s.zarr", "--scheduler", address, "--no-progress")
    assert result.exit_code == 1
    assert f"has ensir-flow {real_version}, this client 0.0.0+other; install the same version" in result.output
    assert not (tmp_path / "s.zarr").exists()


def test_an_unreachable_scheduler_a_malformed_address_or_a_bad_scheduler_file_is_a_one_line_error(corpus, tmp_path, invoke):
    root, _ = corpus
    not_json = tmp_path / "scheduler.json"
    not_json.write_text("scheduler: somewhere")
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        unreachable = invoke("ingest", root, tmp_path / "a.zarr", "--scheduler", "tcp://127.0.0.1:9", "--no-progress")
    no_port = invoke("ingest", root, tmp_path / "b.zarr", "--scheduler", "tcp://127.0.0.1", "--no-progress")
    bad_file = invoke("ingest", root, tmp_path / "c.zarr", "--scheduler", not_json, "--no-progress")
    assert (
        unreachable.exit_code == 75 and "tcp://127.0.0.1:9: cannot reach the dask scheduler" in unreachable.output
    )  # EX_TEMPFAIL: retry
    assert no_port.exit_code == 1 and "tcp://127.0.0.1: not a dask scheduler address (missing port" in no_port.output
    assert bad_file.exit_code == 1 and f"{not_json}: not a dask scheduler file" in bad_file.output
    assert not any(tmp_path.glob("*.zarr"))


def test_a_cluster_without_workers_is_waited_for_and_said_so(capsys):
    with LocalCluster(n_workers=0, processes=True, dashboard_address=":0") as empty, Client(empty) as client:
        threading.Timer(0.5, empty.scale, args=(1,)).start()
        check_workers(client, empty.scheduler_address)
        assert len(client.nthreads()) == 1
    assert "no workers yet; waiting for the first one to join" in capsys.readouterr().err
