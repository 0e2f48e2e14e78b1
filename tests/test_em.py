import numpy as np

from ensir_flow import em, stats
from ensir_flow.fit_status import FitStatus
from ensir_flow.lut import fit_lut


def _reference_em(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Oracle: EnsIR EM written per sample, straight from docs/method.md (float64)."""
    n_models = x.shape[0]
    y = y.astype(np.float64)
    x = x.astype(np.float64)
    mu = x.mean(axis=1)
    var = ((x - mu[:, None]) ** 2).mean(axis=1)
    r = np.sqrt(((x - x.mean(axis=0)) ** 2).mean(axis=1))
    logits = 1 / (1e-10 + r)
    pi = np.exp(logits - logits.max())
    pi /= pi.sum()
    prev = None
    for step in range(1001):
        log_p = (
            -0.5 * (np.log(2 * np.pi) + np.log(var)[:, None] + (y[None] - mu[:, None]) ** 2 / var[:, None]) + np.log(pi)[:, None]
        )
        top = log_p.max(axis=0)
        log_norm = top + np.log(np.exp(log_p - top).sum(axis=0))
        ll = log_norm.mean()
        if step >= 2 and ll - prev < 1e-5:  # the score before any step is never compared
            return pi
        resp = np.exp(log_p - log_norm)
        s = resp.sum(axis=1)
        m = (resp * y).sum(axis=1) / (s + 1e-6)
        var = (resp * (y[None] - m[:, None]) ** 2).sum(axis=1) / s + 1e-6
        pi = (s + 1e-6) / len(y)
        prev = ll
    assert n_models
    return pi


def _one_cell(x, y):
    """Statistics of a single cell (one channel, bin width 256 so everything shares bin 0)."""
    return stats.chunk_statistics(x[:, :, None].astype(np.uint8), y[:, None].astype(np.uint8), 256)


def test_histogram_em_matches_per_sample_em():
    rng = np.random.default_rng(3)
    for _ in range(5):
        y = rng.integers(40, 200, 800)
        x = np.stack([np.clip(y + rng.normal(b, s, 800), 0, 255).round() for b, s in [(0, 3), (4, 8), (-2, 15)]])
        weights, status = em.fit_em(_one_cell(x, y))
        assert status.tolist() == [FitStatus.EM]
        np.testing.assert_allclose(weights[0], _reference_em(x, y), rtol=0, atol=1e-9)


def test_initial_weights_by_hand():
    # two models, one pixel-pair each: x = (10, 20), mean 15, r = (5, 5) -> equal weights
    np.testing.assert_allclose(em.initial_weights(_one_cell(np.array([[10], [20]]), np.array([12]))), [[0.5, 0.5]])
    # x2 = (13, 7, 10) against x0 = x1 = (10, 10, 10): per-pixel means (11, 9, 10), so
    # r0 = r1 = sqrt(2/3), r2 = sqrt(8/3); weights = softmax(1/r)
    x = np.array([[10, 10, 10], [10, 10, 10], [13, 7, 10]])
    cell = _one_cell(x, np.array([10, 10, 10]))
    logits = np.array([1 / np.sqrt(2 / 3), 1 / np.sqrt(2 / 3), 1 / np.sqrt(8 / 3)])
    np.testing.assert_allclose(em.initial_weights(cell)[0], np.exp(logits) / np.exp(logits).sum(), rtol=1e-9)
    # a model equal to the per-pixel mean everywhere (r = 0) takes all the weight
    x = np.array([[10, 20], [9, 19], [11, 21]])
    np.testing.assert_allclose(em.initial_weights(_one_cell(x, np.array([10, 20]))), [[1.0, 0.0, 0.0]], atol=1e-12)


def test_small_cells_keep_initial_weights():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 256, 99)
    x = np.stack([y, np.clip(y + 5, 0, 255)])
    s = _one_cell(x, y)
    weights, status = em.fit_em(s)
    assert status.tolist() == [FitStatus.INITIAL_WEIGHTS]
    np.testing.assert_allclose(weights, em.initial_weights(s))


def test_zero_variance_and_underflow_abandon_em():
    rng = np.random.default_rng(1)
    y = rng.integers(100, 110, 500)
    constant = np.stack([np.full(500, 50), y])  # model 0 constant: singular starting covariance
    weights, status = em.fit_em(_one_cell(constant, y))
    assert status.tolist() == [FitStatus.EM_FAILED_INITIAL_WEIGHTS]
    # model 0 alternates 0/1 (variance 0.25) while y sits near 200: its responsibilities underflow
    far = np.stack([np.arange(500) % 2, np.full(500, 200)])
    y_far = rng.integers(195, 206, 500)
    s = _one_cell(far, y_far)
    weights, status = em.fit_em(s)
    assert status.tolist() == [FitStatus.EM_FAILED_INITIAL_WEIGHTS]
    np.testing.assert_allclose(weights, em.initial_weights(s))


def test_empty_cells_take_channel_weights_and_no_data_is_uniform():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 100, (400, 3))
    x = np.stack([np.clip(y + rng.integers(-3, 4, y.shape), 0, 255), np.clip(y + rng.integers(-9, 10, y.shape), 0, 255)])
    s = stats.chunk_statistics(x.astype(np.uint8), y.astype(np.uint8), 128)
    lut = fit_lut(s, ["a", "b"])
    channel_weights, _ = em.fit_em(s.per_channel())
    empty = lut.count == 0
    assert empty[3].all()  # bin (1, 1): values >= 128 never occur
    np.testing.assert_allclose(lut.weights[3], channel_weights.astype(np.float32))
    assert (lut.fit_status[empty] == FitStatus.EMPTY_FALLBACK).all()
    nothing = fit_lut(stats.empty_statistics(2, 3, 128), ["a", "b"])
    np.testing.assert_array_equal(nothing.weights, np.full((4, 3, 2), 0.5, np.float32))
