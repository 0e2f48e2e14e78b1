"""Fixtures: the threaded scheduler for CLI runs, a small corpus on disk and the in-process CLI."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers import make_corpus, s3_server


@pytest.fixture(autouse=True)
def threaded_scheduler(monkeypatch):
    """CLI runs in tests use dask's threads unless a test asks for a cluster with --scheduler."""
    monkeypatch.setenv("ENSIR_FLOW_SCHEDULER", "threads")


@pytest.fixture
def corpus(tmp_path) -> tuple[Path, list[str]]:
    root = tmp_path / "corpus"
    return root, make_corpus(root)


@pytest.fixture
def invoke():
    """Run the CLI in-process; returns click's Result (exit_code, stdout, stderr)."""
    from ensir_flow.cli import main

    runner = CliRunner()

    def run(*args):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    return run


@pytest.fixture
def s3_bucket_url(monkeypatch):
    """A bucket on an S3 server on 127.0.0.1, as an s3:// URL."""
    with s3_server(monkeypatch):
        yield "s3://ensir-test"
