"""A write task that does not find the staging it writes (made on the client at a path the
workers cannot reach, or removed during the run) stops the run as a reader that does not find its
store does: one line, exit 75, nothing committed."""

from ensir_flow.pipelines import ingest, resumable


def test_a_staging_the_workers_cannot_reach_is_exit_75(tmp_path, invoke, corpus, monkeypatch):
    root, _ = corpus
    unreachable = tmp_path / "elsewhere" / ".s.zarr.partial"  # where a worker on another host looks
    targets = ingest.chunk_targets
    monkeypatch.setattr(ingest, "chunk_targets", lambda location, variables: targets(str(unreachable), variables))
    result = invoke("ingest", root, tmp_path / "s.zarr", "--no-progress")
    assert result.exit_code == 75, result.output
    message = result.stderr.strip()
    assert "\n" not in message and "Traceback" not in message, message
    assert f"{unreachable}: not found by this worker (a path every worker must reach" in message, message
    assert not (tmp_path / "s.zarr").exists()


def test_an_apply_whose_output_the_workers_cannot_reach_is_exit_75(tmp_path, invoke, corpus, monkeypatch):
    root, _ = corpus
    for args in (["ingest", root, tmp_path / "s.zarr"], ["fit", tmp_path / "s.zarr", tmp_path / "lut.zarr"]):
        assert invoke(*args, "--no-progress").exit_code == 0

    def not_here(store, name):
        raise FileNotFoundError(f"{store}/{name}")  # as zarr says it on a worker that does not see the staging

    monkeypatch.setattr(resumable, "open_array_for_writing", not_here)
    result = invoke("apply", tmp_path / "s.zarr", tmp_path / "lut.zarr", tmp_path / "o.zarr", "--no-progress")
    assert result.exit_code == 75, result.output
    message = result.stderr.strip()
    assert "\n" not in message and "not found by this worker (a path every worker must reach" in message, message
    assert not (tmp_path / "o.zarr").exists()
