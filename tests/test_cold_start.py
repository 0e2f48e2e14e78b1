"""The first run on a machine: where the numba kernels are cached, and the line a run prints while
it compiles them."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ensir_flow import kernel_cache
from helpers import make_corpus

NOTICE = "compiling kernels (first run on this machine)"


@pytest.fixture
def temporary(tmp_path, monkeypatch) -> Path:
    """A temporary directory of the test's own, as `tempfile.gettempdir()` gives it."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture
def no_home(tmp_path) -> str:
    """A HOME that cannot hold a cache directory, whoever runs the test: a file, not a folder."""
    home = tmp_path / "home-is-a-file"
    home.write_text("")
    return str(home)


def test_the_users_cache_directory_is_used(tmp_path, temporary):
    found = kernel_cache.cache_directory({"XDG_CACHE_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path)})
    assert found == tmp_path / "xdg" / "ensir-flow" / "numba"
    assert found.is_dir() and found.stat().st_mode & 0o777 == 0o700
    assert kernel_cache.cache_directory({"HOME": str(tmp_path)}) == tmp_path / ".cache" / "ensir-flow" / "numba"
    assert not any(temporary.iterdir())


def test_a_numba_cache_dir_the_user_set_is_kept(tmp_path):
    assert kernel_cache.cache_directory({"NUMBA_CACHE_DIR": str(tmp_path / "mine"), "HOME": str(tmp_path)}) == tmp_path / "mine"


def test_without_a_writable_home_a_private_temporary_directory_is_used(temporary, no_home):
    found = kernel_cache.cache_directory({"HOME": no_home, "XDG_CACHE_HOME": "relative/ignored"})
    assert found == temporary / f"ensir-flow-{os.getuid()}" / "numba"
    assert found.parent.stat().st_mode & 0o777 == 0o700 and found.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("planted", ["writable by others", "a link"])
def test_a_temporary_directory_someone_else_could_have_planted_is_refused(tmp_path, temporary, no_home, planted):
    """A cache file is native code that runs as it loads: a folder other users can write to, or a
    link to one, is not used (and with no other, kernels are compiled in memory)."""
    ours = temporary / f"ensir-flow-{os.getuid()}"
    if planted == "a link":
        (tmp_path / "elsewhere").mkdir()
        ours.symlink_to(tmp_path / "elsewhere")
    else:
        ours.mkdir()
        ours.chmod(0o777)
    assert kernel_cache.cache_directory({"HOME": no_home}) is None


COMPILE_ONE_KERNEL = """
import sys
import numba  # imported before ensir_flow: the cache directory must still be numba's
import numpy as np
import ensir_flow
from ensir_flow import kernel_cache, stats

kernel_cache.say_when_compiling(lambda text: print(text, file=sys.stderr))
sums = np.zeros((2, 1), np.int64)
stats._scatter_add(np.array([0, 1, 1]), np.ones(3, np.int64), sums)
assert sums.tolist() == [[1], [2]]
print(numba.config.CACHE_DIR)
"""


def test_a_process_with_no_writable_home_caches_its_kernels_and_says_when_it_compiles(tmp_path, no_home):
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
    env.update(HOME=no_home, TMPDIR=str(temporary))
    expected = temporary / f"ensir-flow-{os.getuid()}" / "numba"
    cold, warm = (
        subprocess.run([sys.executable, "-c", COMPILE_ONE_KERNEL], env=env, capture_output=True, text=True, check=True)
        for _ in range(2)
    )
    assert cold.stdout.strip() == warm.stdout.strip() == str(expected)
    assert cold.stderr.splitlines() == [f"{NOTICE}; cached for later runs in {expected}"]
    assert warm.stderr == ""  # loaded from the cache the first one wrote
    assert any(expected.rglob("stats._scatter_add_rows-*.nbi"))


@pytest.mark.slow
def test_a_first_fit_says_it_compiles_in_its_progress_and_only_then(tmp_path):
    make_corpus(tmp_path / "corpus")
    env = {**os.environ, "ENSIR_FLOW_SCHEDULER": "threads", "NUMBA_CACHE_DIR": str(tmp_path / "cache")}

    def fit(*options: str) -> list[str]:
        command = [sys.executable, "-m", "ensir_flow.cli", "fit", "s.zarr", "lut.zarr", "--overwrite", *options]
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stderr.splitlines()

    subprocess.run(
        [sys.executable, "-m", "ensir_flow.cli", "ingest", "corpus", "s.zarr", "--no-progress"], cwd=tmp_path, env=env, check=True
    )
    cold = fit()
    said = [line for line in cold if NOTICE in line]
    assert len(said) == 1 and said[0].split(" ", 1)[1] == f"{NOTICE}; cached for later runs in {tmp_path / 'cache'}", cold
    assert not [line for line in fit() if NOTICE in line]
    env["NUMBA_CACHE_DIR"] = str(tmp_path / "another-cache")
    assert fit("--no-progress") == []  # a quiet run stays quiet, compiling or not
