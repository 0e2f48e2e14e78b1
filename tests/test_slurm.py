"""ensir-flow on a Slurm batch system, as docs/clusters.md says to run it: the SLURMCluster example
(workers as batch jobs, the API given their client) and the sbatch recipe (docs/recipes/ensir-flow.sbatch:
a scheduler and workers inside one allocation, the CLI on them through a scheduler file). Both run on a
single-node Slurm that tests/slurm_cluster.sh starts on this host's loopback, and give the bytes
of a threaded run."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import ensir_flow
from helpers import make_corpus

ROOT = Path(__file__).resolve().parents[1]
SLURM_CLUSTER = ROOT / "tests" / "slurm_cluster.sh"
RECIPE = ROOT / "docs" / "recipes" / "ensir-flow.sbatch"
#: Where Debian puts the Slurm and munge daemons (not on a non-root PATH).
DAEMON_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])

pytestmark = pytest.mark.slow  # a Slurm cluster, batch jobs of Dask workers, CLI processes: about a minute

if shutil.which("slurmctld", path=DAEMON_PATH) is None or shutil.which("munged", path=DAEMON_PATH) is None:
    pytest.skip("Slurm is not installed (as root: apt-get install -y slurm-wlm munge)", allow_module_level=True)
if os.geteuid() != 0:
    pytest.skip("the single-node Slurm runs munged, slurmctld and slurmd as root", allow_module_level=True)
pytest.importorskip("dask_jobqueue", reason="dask-jobqueue is not installed (pip install -e '.[slurm]')")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> dict:
    """The environment of the Slurm commands (SLURM_CONF, and this environment's programs first on
    PATH, which batch jobs inherit) while a single-node Slurm cluster runs."""
    folder = tmp_path_factory.mktemp("slurm")
    environment = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), DAEMON_PATH]))
    started = subprocess.run(["bash", SLURM_CLUSTER, "start", folder], env=environment, capture_output=True, text=True)
    assert started.returncode == 0, started.stderr
    environment["SLURM_CONF"] = started.stdout.strip()
    try:
        yield environment
    finally:
        subprocess.run(["bash", SLURM_CLUSTER, "stop", folder], env=environment, check=True)


def _python_example() -> str:
    """The SLURMCluster example of docs/clusters.md."""
    (block,) = [
        block
        for block in re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "clusters.md").read_text(), flags=re.S)
        if "SLURMCluster" in block
    ]
    return block


def _threaded_run(corpus: Path, folder: Path) -> None:
    """ingest, fit and apply of `corpus` under `folder` on threads, with the example's names."""
    ensir_flow.ingest(corpus, folder / "reference.zarr", scheduler="threads")
    ensir_flow.fit(folder / "reference.zarr", folder / "lut.zarr", scheduler="threads")
    ensir_flow.apply(folder / "reference.zarr", folder / "lut.zarr", folder / "ensemble.zarr", scheduler="threads")


def _values(store: Path, variable: str) -> np.ndarray:
    return xr.open_zarr(store)[variable].values


def _jobs(slurm: dict) -> list[str]:
    """The jobs that Slurm still runs or queues (not those cancelled or done, whose processes may
    still be ending)."""
    listed = subprocess.run(
        ["squeue", "-h", "-t", "PD,R", "-o", "%i %j %T"], env=slurm, capture_output=True, text=True, check=True
    )
    return listed.stdout.splitlines()


def test_the_slurmcluster_example_runs_its_workers_as_batch_jobs_and_gives_the_threaded_bytes(slurm, tmp_path):
    make_corpus(tmp_path / "slurm" / "reference")
    _threaded_run(tmp_path / "slurm" / "reference", tmp_path / "threads")

    run = subprocess.run(
        [sys.executable, "-c", _python_example()], cwd=tmp_path / "slurm", env=slurm, capture_output=True, text=True, timeout=240
    )

    assert run.returncode == 0, run.stderr
    for store, variable in [("lut.zarr", "weights"), ("ensemble.zarr", "ensemble")]:
        assert np.array_equal(_values(tmp_path / "slurm" / store, variable), _values(tmp_path / "threads" / store, variable))
    # the job logs of the workers (a job still queued when the work was done has none)
    worker_logs = [log.read_text() for log in (tmp_path / "slurm").glob("slurm-*.out")]
    assert 1 <= len(worker_logs) <= 2 and all("Start worker at" in log for log in worker_logs), worker_logs
    assert _jobs(slurm) == []  # leaving the example's `with` cancelled them


def test_the_sbatch_recipe_runs_ingest_and_apply_in_one_allocation_and_logs_both(slurm, tmp_path):
    make_corpus(tmp_path / "incoming")
    _threaded_run(tmp_path / "incoming", tmp_path / "threads")  # the bytes the recipe must give
    ensir_flow.fit(tmp_path / "threads" / "reference.zarr", tmp_path / "lut.zarr", scheduler="threads")  # the LUT it applies

    job = subprocess.run(["sbatch", "--wait", RECIPE], cwd=tmp_path, env=slurm, capture_output=True, text=True, timeout=240)

    assert job.returncode == 0, (job.stdout, job.stderr, [log.read_text() for log in tmp_path.glob("*.log")])
    (job_id,) = re.findall(r"Submitted batch job (\d+)", job.stdout)
    lines = (tmp_path / f"ensir-flow-{job_id}.log").read_text().splitlines()
    assert any(line.startswith("appended 3 new image(s) to frames.zarr") for line in lines), lines
    assert any(line.startswith("wrote ensemble.zarr (3 images); PNGs in ensemble-png") for line in lines), lines
    assert not any("error" in line.lower() for line in lines), lines
    assert sorted(p.name for p in (tmp_path / "ensemble-png").iterdir()) == ["img0.png", "img1.png", "img2.png"]
    assert np.array_equal(
        _values(tmp_path / "ensemble.zarr", "ensemble"), _values(tmp_path / "threads" / "ensemble.zarr", "ensemble")
    )
    assert "Start worker at" in (tmp_path / f"dask-{job_id}.log").read_text()
    assert not (tmp_path / f"scheduler-{job_id}.json").exists()
    assert _jobs(slurm) == []
