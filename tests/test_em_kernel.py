"""EM's CPU kernel (numba, present levels only, no torch import) against its torch path (the
GPU's, run here on the CPU): the same LUT bits."""

import numpy as np
import pytest

from ensir_flow import em, stats
from ensir_flow.fit_status import FitStatus
from helpers import modules_imported_by


def _torch_fit(statistics):
    """fit_em's EM for the eligible cells, run through its torch path on the CPU."""
    weights = em.initial_weights(statistics)
    rows, mean, var, _ = em.em_cells(statistics)
    pi, failed = em._fit_em_on_device(statistics, rows, mean, var, weights[rows], "cpu")
    weights[rows[~failed]] = pi[~failed]
    return weights, rows, failed


def _corpus(seed: int, n_models: int, n_pixels: int):
    """Predictions = truth + per-model bias, gain and noise, clipped (as the models' outputs are):
    cells of every kind, including clipped ones where EM's steps lower the likelihood."""
    rng = np.random.default_rng(seed)
    truth = np.clip(rng.normal(128, 70, (n_pixels, 3)), 0, 255)
    predictions = np.stack(
        [
            np.clip(truth * rng.uniform(0.9, 1.1) + rng.uniform(-12, 12) + rng.normal(0, rng.uniform(1, 12), truth.shape), 0, 255)
            for _ in range(n_models)
        ]
    )
    return predictions.round().astype(np.uint8), truth.round().astype(np.uint8)


@pytest.mark.parametrize("seed,n_models,bin_width", [(0, 3, 32), (1, 3, 16), (2, 2, 64), (3, 4, 32), (4, 3, 128)])
def test_cpu_kernel_gives_the_torch_weights_bit_for_bit(seed, n_models, bin_width):
    pytest.importorskip("torch")
    table = stats.chunk_statistics(*_corpus(seed, n_models, 60_000), bin_width)
    weights, status = em.fit_em(table, "cpu")
    torch_weights, rows, failed = _torch_fit(table)
    assert (status == FitStatus.EM).sum() >= 10  # EM ran on cells
    np.testing.assert_array_equal(status[rows] == FitStatus.EM_FAILED_INITIAL_WEIGHTS, failed)
    np.testing.assert_array_equal(weights.astype(np.float32), torch_weights.astype(np.float32))  # the LUT's bits
    np.testing.assert_allclose(weights, torch_weights, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed,n_models,bin_width", [(5, 8, 32), (6, 16, 128)])
def test_cpu_kernel_agrees_with_torch_for_many_models(seed, n_models, bin_width):
    """At large K torch's exp (SLEEF) and the C library's differ in the last bits, which a weight
    near 1e-8 can carry into its float32 (seen at K = 8): the same cells fail, the weights agree to 1e-12."""
    pytest.importorskip("torch")
    table = stats.chunk_statistics(*_corpus(seed, n_models, 25_000), bin_width)
    weights, status = em.fit_em(table, "cpu")
    torch_weights, rows, failed = _torch_fit(table)
    assert (status == FitStatus.EM).sum() >= 10
    np.testing.assert_array_equal(status[rows] == FitStatus.EM_FAILED_INITIAL_WEIGHTS, failed)
    np.testing.assert_allclose(weights, torch_weights, rtol=0, atol=1e-12)


def test_fit_on_the_cpu_does_not_import_torch(tmp_path):
    """EM on the CPU is numba's: a fit never pays for importing torch."""
    code = (
        "import numpy as np\n"
        "from ensir_flow import em, stats\n"
        "rng = np.random.default_rng(0)\n"
        "y = rng.integers(0, 256, (5000, 3)).astype(np.uint8)\n"
        "x = np.clip(y[None].astype(int) + rng.integers(-9, 10, (3, 5000, 3)), 0, 255).astype(np.uint8)\n"
        "em.fit_em(stats.chunk_statistics(x, y, 64), 'cpu')\n"
    )
    assert "torch" not in modules_imported_by(code), "torch was imported"


def test_cpu_em_runs_where_the_os_has_no_cpu_affinity(monkeypatch):
    """macOS and Windows have no os.sched_getaffinity: EM's threads are then sized by os.cpu_count,
    with the same weights."""
    table = stats.chunk_statistics(*_corpus(7, 3, 40_000), 32)
    weights, status = em.fit_em(table, "cpu")
    monkeypatch.delattr(em.os, "sched_getaffinity", raising=False)
    again, again_status = em.fit_em(table, "cpu")
    assert (status == FitStatus.EM).sum() >= 10
    np.testing.assert_array_equal(again, weights)
    np.testing.assert_array_equal(again_status, status)
