"""Logs for machines: when stderr is not a terminal, progress is plain timestamped lines per stage."""

import os
import re
import subprocess
import sys

from helpers import make_corpus

LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} (ingest|statistics|write LUT): (started|done in [\d.]+ s|"
                  r"\d+% \(\d+/\d+ tasks\), \d+ s)$")


def test_progress_in_a_log_is_plain_timestamped_lines(tmp_path):
    make_corpus(tmp_path / "corpus")
    env = {**os.environ, "ENSIR_FLOW_SCHEDULER": "threads"}
    for command in (["ingest", "corpus", "s.zarr", "--progress-interval", "0"], ["fit", "s.zarr", "lut.zarr"]):
        run = subprocess.run([sys.executable, "-m", "ensir_flow.cli", *command], cwd=tmp_path, env=env,
                             capture_output=True, text=True, check=True)
        assert "\r" not in run.stderr
        lines = run.stderr.splitlines()
        assert lines and all(LINE.match(line) for line in lines), run.stderr
        assert lines[0].endswith(f"{command[0] if command[0] == 'ingest' else 'statistics'}: started")
        assert lines[-1].split(" ", 1)[1].startswith(("ingest: done in", "write LUT: done in"))
    ingest_lines = subprocess.run([sys.executable, "-m", "ensir_flow.cli", "ingest", "corpus", "t.zarr", "--progress-interval",
                                   "0"], cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stderr
    assert re.search(r"ingest: 100% \((\d+)/\1 tasks\)", ingest_lines)  # every task reported with interval 0
    quiet = subprocess.run([sys.executable, "-m", "ensir_flow.cli", "ingest", "corpus", "u.zarr", "--no-progress"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert quiet.stderr == ""
