"""Start-up: each command imports only what it runs, so that fixed costs a small job pays on every
command (about 4 s of 5 for `fit` on the reference set before this was watched) stay out.

Each test runs one command as a user does, in a fresh interpreter (`helpers.modules_imported_by`),
and names the heavy modules that command must not load: the cluster machinery (distributed and the
dashboard's bokeh) with `--scheduler threads`, torch where no model runs, scikit-image and scipy's
filters (SSIM is our own kernel), and for fit and evaluate xarray and dask.array (which comes with
every xarray variable, and brings scipy.sparse and scipy.fft with it): they check stores with zarr
alone, and fit writes its LUT with zarr alone.
"""

import pytest

from helpers import modules_imported_by

#: Loaded by no command run with --scheduler threads on data already in a store.
NEVER_WITH_THREADS = {"distributed", "bokeh", "torch", "skimage", "scipy.ndimage", "matplotlib", "imageio"}


def cli_code(*args) -> str:
    """Python code that runs `ensir-flow ARGS` in its interpreter and fails unless it exits 0."""
    return (
        "from ensir_flow.cli import main\n"
        "try:\n"
        f"    main({[str(arg) for arg in args]!r}, prog_name='ensir-flow')\n"
        "except SystemExit as done:\n"
        "    assert done.code == 0, f'exit {done.code}'\n"
    )


@pytest.fixture
def stores(tmp_path, invoke, corpus):
    """A reference store, its LUT and the applied output, written in this process."""
    root, _ = corpus
    for args in (
        ["ingest", root, tmp_path / "s.zarr"],
        ["fit", tmp_path / "s.zarr", tmp_path / "lut.zarr"],
        ["apply", tmp_path / "s.zarr", tmp_path / "lut.zarr", tmp_path / "out.zarr"],
    ):
        assert invoke(*args, "--no-progress").exit_code == 0
    return tmp_path


def test_fit_with_threads_loads_neither_those_nor_xarray(stores):
    loaded = modules_imported_by(
        cli_code("fit", stores / "s.zarr", stores / "lut2.zarr", "--scheduler", "threads", "--no-progress")
    )
    assert (stores / "lut2.zarr").is_dir()
    unwanted = NEVER_WITH_THREADS | {"dask.array", "xarray", "pandas"}  # fit reads and writes stores with zarr alone
    assert not unwanted & loaded, unwanted & loaded


def test_evaluate_with_threads_loads_neither_those_nor_dask_array(stores):
    loaded = modules_imported_by(
        cli_code(
            "evaluate", stores / "s.zarr", "--ensemble", stores / "out.zarr", "--json", "--scheduler", "threads", "--no-progress"
        )
    )
    assert "ensir_flow.metrics" in loaded  # it scored
    unwanted = NEVER_WITH_THREADS | {"dask.array", "scipy.sparse", "scipy.fft", "ensir_flow.pipelines.fit", "xarray", "pandas"}
    assert not unwanted & loaded, unwanted & loaded


def test_version_and_help_load_no_store_or_scheduler_library():
    for args in (["--version"], ["fit", "--help"]):
        loaded = modules_imported_by(cli_code(*args))
        unwanted = NEVER_WITH_THREADS | {"dask", "zarr", "xarray", "pandas"}
        assert not unwanted & loaded, (args, unwanted & loaded)
