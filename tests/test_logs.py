"""Logs for machines: when stderr is not a terminal, progress is plain timestamped lines per stage."""

import json
import os
import re
import subprocess
import sys

import pytest

from helpers import make_corpus

LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} ((ingest|statistics|write LUT): (started|done in [\d.]+ s|"
    r"\d+% \(\d+/\d+ tasks\), \d+ s)|compiling kernels \(first run on this machine\).*)$"  # the last: a cold kernel cache
)


@pytest.mark.slow
def test_progress_in_a_log_is_plain_timestamped_lines(tmp_path):
    make_corpus(tmp_path / "corpus")
    env = {**os.environ, "ENSIR_FLOW_SCHEDULER": "threads"}
    for command in (["ingest", "corpus", "s.zarr", "--progress-interval", "0"], ["fit", "s.zarr", "lut.zarr"]):
        run = subprocess.run(
            [sys.executable, "-m", "ensir_flow.cli", *command], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
        )
        assert "\r" not in run.stderr
        lines = run.stderr.splitlines()
        assert lines and all(LINE.match(line) for line in lines), run.stderr
        assert lines[0].endswith(f"{command[0] if command[0] == 'ingest' else 'statistics'}: started")
        assert lines[-1].split(" ", 1)[1].startswith(("ingest: done in", "write LUT: done in"))
    ingest_lines = subprocess.run(
        [sys.executable, "-m", "ensir_flow.cli", "ingest", "corpus", "t.zarr", "--progress-interval", "0"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    assert re.search(r"ingest: 100% \((\d+)/\1 tasks\)", ingest_lines)  # every task reported with interval 0
    quiet = subprocess.run(
        [sys.executable, "-m", "ensir_flow.cli", "ingest", "corpus", "u.zarr", "--no-progress"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert quiet.stderr == ""


def test_every_command_can_end_with_one_json_object(tmp_path, invoke, corpus):
    root, _ = corpus
    s, lut, out = tmp_path / "s.zarr", tmp_path / "lut.zarr", tmp_path / "out.zarr"
    runs = {
        "ingest": ["ingest", root, s],
        "fit": ["fit", s, lut],
        "apply": ["apply", s, lut, out, "--export-dir", tmp_path / "png"],
        "apply again": ["apply", s, lut, out],
        "evaluate": ["evaluate", s, "--ensemble", out],
        "lut export": ["lut", "export", lut, tmp_path / "lut.json"],
        "append, nothing new": ["ingest", root, s, "--append"],
    }
    results = {}
    for name, command in runs.items():
        result = invoke(*command, "--json", "--no-progress")
        assert result.exit_code == 0, result.output
        results[name] = json.loads(result.stdout)
    assert results["ingest"]["status"] == "written" and results["ingest"]["images"] == 3
    assert results["ingest"]["outputs"] == [str(s)] and set(results["ingest"]["seconds"]) == {"ingest"}
    assert results["fit"]["status"] == "written" and set(results["fit"]["seconds"]) == {"statistics", "write LUT"}
    assert results["apply"]["status"] == "written" and results["apply"]["outputs"] == [str(out), str(tmp_path / "png")]
    assert results["apply again"]["status"] == "unchanged" and results["apply again"]["chunks_computed"] == 0
    assert results["evaluate"]["command"] == "evaluate" and "ensemble" in results["evaluate"]["psnr"]
    assert results["lut export"] == {
        "command": "lut export",
        "status": "written",
        "outputs": [str(tmp_path / "lut.json")],
        "seconds": {},
    }
    assert results["append, nothing new"]["status"] == "unchanged" and results["append, nothing new"]["images_added"] == 0
    assert all(value >= 0 for result in results.values() for value in result["seconds"].values())
