"""A local cluster says where its Dask dashboard is, and a taken port never fails a run."""

import re
import socket

import pytest

from ensir_flow.pipelines import executor


@pytest.fixture
def in_process_clusters(monkeypatch):
    """`--scheduler local` clusters with one in-process worker: the dashboard is the scheduler's,
    so this is what a local cluster does, without starting worker processes."""
    make = executor.local_cluster
    monkeypatch.setattr(executor, "local_cluster", lambda **options: make(n_workers=1, processes=False, **options))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_local_cluster_prints_its_dashboard_link_on_stderr(in_process_clusters, capsys):
    port = _free_port()
    with executor.session("local", dashboard_address=f"127.0.0.1:{port}") as compute:
        assert compute() == ()
    captured = capsys.readouterr()
    assert captured.out == "" and re.search(rf"^dask dashboard: http://[\w.]+:{port}/status$", captured.err, re.MULTILINE)


def test_a_taken_port_moves_the_dashboard_instead_of_failing(in_process_clusters, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with executor.session("local", dashboard_address=f"127.0.0.1:{port}"):
            pass
    link = capsys.readouterr().err
    assert re.search(r"^dask dashboard: http://[\w.]+:\d+/status$", link, re.MULTILINE) and f":{port}/" not in link


def test_no_dashboard_when_asked_and_a_clear_line_without_bokeh(in_process_clusters, capsys, monkeypatch):
    with executor.session("local", dashboard_address=None):
        pass
    assert "dask dashboard" not in capsys.readouterr().err
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bokeh" else find_spec(name, *a))
    with executor.session("local", dashboard_address=":0"):
        pass
    assert "dask dashboard: none (bokeh is not installed: pip install 'bokeh>=3.1')" in capsys.readouterr().err


def test_cli_dashboard_address_reaches_the_cluster(in_process_clusters, invoke, corpus, tmp_path):
    root, _ = corpus
    port = _free_port()
    result = invoke(
        "ingest",
        root,
        tmp_path / "s.zarr",
        "--scheduler",
        "local",
        "--no-progress",
        "--json",
        "--dashboard-address",
        f"127.0.0.1:{port}",
    )
    assert result.exit_code == 0, result.output
    assert f":{port}/status" in result.stderr and "dask dashboard" not in result.stdout
    quiet = invoke("ingest", root, tmp_path / "t.zarr", "--scheduler", "local", "--no-progress", "--dashboard-address", "none")
    assert quiet.exit_code == 0 and "dask dashboard" not in quiet.stderr
    threads = invoke("ingest", root, tmp_path / "u.zarr", "--no-progress")
    assert threads.exit_code == 0 and "dask dashboard" not in threads.stderr  # no cluster, no dashboard
