"""Workers must run the client's ensir-flow code: same version string is not enough (an older
checkout of the same version failed in a kernel call with a TypeError). Each side's installed code
has a fingerprint; a worker whose fingerprint differs is refused in one line naming it."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dask
import pytest
from distributed import Client, LocalCluster

import ensir_flow
from ensir_flow.errors import InputError
from ensir_flow.pipelines import executor

OTHER = "0" * 64


@pytest.fixture(scope="module")
def cluster():
    """A scheduler with one in-process worker: it computes its fingerprint from the installed
    files, as any worker does, and the tests change the client's instead."""
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as running:
        yield running


def test_workers_with_other_code_of_the_same_version_are_refused_before_anything_is_written(
    cluster, corpus, tmp_path, invoke, monkeypatch
):
    root, _ = corpus
    address = cluster.scheduler_address
    worker = next(iter(cluster.scheduler_info["workers"]))
    theirs = executor._installed_ensir_flow()()[1]
    monkeypatch.setattr(executor, "code_fingerprint", lambda: OTHER)
    result = invoke("ingest", root, tmp_path / "s.zarr", "--scheduler", address, "--no-progress")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip() == (
        f"Error: {address}: worker {worker} runs other ensir-flow code than this client (code "
        f"fingerprint {theirs[:12]}, this client {OTHER[:12]}): different installs of "
        f"ensir-flow {ensir_flow.__version__}; install the same one on every worker"
    )
    assert not (tmp_path / "s.zarr").exists()


def test_workers_with_the_same_code_pass(cluster, corpus, tmp_path, invoke):
    root, _ = corpus
    result = invoke("ingest", root, tmp_path / "s.zarr", "--scheduler", cluster.scheduler_address, "--no-progress")
    assert result.exit_code == 0, result.output


def test_a_client_given_to_the_api_is_checked_too(cluster, corpus, tmp_path, monkeypatch):
    root, _ = corpus
    monkeypatch.setattr(executor, "code_fingerprint", lambda: OTHER)
    with Client(cluster) as client, pytest.raises(InputError, match="runs other ensir-flow code than this client"):
        ensir_flow.ingest(root, tmp_path / "s.zarr", client=client, progress=False)
    assert not (tmp_path / "s.zarr").exists()


def test_a_worker_that_joins_later_with_other_code_fails_the_computation_before_its_results_are_used(monkeypatch):
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as running,
        Client(running) as client,
    ):
        executor.check_workers(client, running.scheduler_address)
        first = set(client.nthreads())
        monkeypatch.setattr(executor, "code_fingerprint", lambda: OTHER)  # the worker checked already is not asked again
        running.scale(2)
        client.wait_for_workers(2, timeout=30)
        (joined,) = set(client.nthreads()) - first
        compute = executor.compute_function(client, False, 30, running.scheduler_address)
        with pytest.raises(InputError, match=f"worker {joined} runs other ensir-flow code") as refused:
            compute(dask.delayed(sum)([1, 2]))
        assert not any(worker in str(refused.value) for worker in first)
        monkeypatch.undo()
        assert executor.compute_function(client, False)(dask.delayed(sum)([1, 2])) == (3,)


def test_several_workers_and_a_worker_without_ensir_flow_are_named():
    found = {f"tcp://10.0.0.{i}:1": (ensir_flow.__version__, OTHER) for i in range(5)}
    with pytest.raises(InputError, match=r"workers tcp://10.0.0.0:1, tcp://10.0.0.1:1, tcp://10.0.0.2:1 and 2 more run other"):
        executor._refuse_other_code(found, "tcp://scheduler:8786")
    broken = {"tcp://10.0.0.9:1": ("none importable (ModuleNotFoundError: No module named 'ensir_flow')", None)}
    with pytest.raises(InputError, match="worker tcp://10.0.0.9:1 has ensir-flow none importable"):
        executor._refuse_other_code(broken, "tcp://scheduler:8786")


def _fingerprint_of(site: Path) -> str:
    """The fingerprint that a process importing ensir-flow from `site` computes (without the site
    packages, whose editable install of the checkout would win over PYTHONPATH)."""
    code = (
        "import ensir_flow\nfrom ensir_flow.pipelines.executor import code_fingerprint\n"
        "print(ensir_flow.__file__)\nprint(code_fingerprint())\n"
    )
    ran = subprocess.run(
        [sys.executable, "-S", "-c", code], env={**os.environ, "PYTHONPATH": str(site)}, cwd=site, capture_output=True, text=True
    )
    assert ran.returncode == 0, ran.stderr
    origin, fingerprint = ran.stdout.split()
    assert Path(origin).is_relative_to(site)  # the copy, not the checkout, was imported
    return fingerprint


def test_the_fingerprint_is_of_the_code_whatever_the_layout_and_changes_with_it(tmp_path):
    """An installed wheel holds pipelines/ and configs/ under ensir_flow/ (the checkout beside it)
    and cli.py as a file (in the checkout, a link): the same code, the same fingerprint."""
    package = Path(ensir_flow.__file__).parent
    site = tmp_path / "site"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(package, site / "ensir_flow", ignore=ignore)  # links copied as files
    for name in ("pipelines", "configs"):
        folder = importlib.util.find_spec(f"ensir_flow.{name}").submodule_search_locations[0]
        shutil.copytree(folder, site / "ensir_flow" / name, ignore=ignore)
    assert _fingerprint_of(site) == executor._installed_ensir_flow()()[1]
    kernel = site / "ensir_flow" / "blend.py"
    kernel.write_text(kernel.read_text() + "\n")
    assert _fingerprint_of(site) != executor._installed_ensir_flow()()[1]
