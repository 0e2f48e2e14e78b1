"""The torch kernels (the GPU path, run here on torch's CPU backend) give the same bits as numba."""

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ensir_flow import em, stats
from ensir_flow.blend import blend, blend_torch
from ensir_flow.devices import resolve_device
from ensir_flow.errors import InputError
from ensir_flow.fit_status import FitStatus
from helpers import modules_imported_by


def _data(seed, n_models, n_pixels):
    rng = np.random.default_rng(seed)
    truth = (np.cumsum(rng.integers(-4, 5, (n_pixels, 3)), axis=0) % 256).astype(np.uint8)
    predictions = np.clip(truth[None].astype(int) + rng.integers(-9, 10, (n_models, n_pixels, 3)), 0, 255).astype(np.uint8)
    return predictions, truth


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), n_models=st.integers(1, 5), bin_width=st.sampled_from([16, 32, 64]))
def test_torch_statistics_equal_numba(seed, n_models, bin_width):
    predictions, truth = _data(seed, n_models, 700)
    expected = stats.chunk_statistics(predictions, truth, bin_width, "cpu")
    got = stats.chunk_statistics_torch(predictions, truth, bin_width, "cpu")
    for name in ("cells", "moments", "hist_keys", "hist_counts"):
        np.testing.assert_array_equal(getattr(got, name), getattr(expected, name), err_msg=name)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), n_models=st.integers(1, 5), bin_width=st.sampled_from([16, 32, 64]))
def test_torch_blend_equals_numba(seed, n_models, bin_width):
    predictions, _ = _data(seed, n_models, 700)
    rng = np.random.default_rng(seed)
    weights = rng.random(((-(-256 // bin_width)) ** n_models, 3, n_models)).astype(np.float32)
    weights /= weights.sum(axis=2, keepdims=True)
    np.testing.assert_array_equal(
        blend_torch(predictions, weights, bin_width, "cpu"), blend(predictions, weights, bin_width, "cpu")
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: compares EM on the GPU with EM on the CPU")
def test_em_is_the_same_on_any_torch_device():
    predictions, truth = _data(0, 3, 5000)
    table = stats.chunk_statistics(predictions, truth, 64)
    weights, status = em.fit_em(table, "cpu")
    assert (status == FitStatus.EM).any()
    gpu_weights, gpu_status = em.fit_em(table, "cuda")
    np.testing.assert_array_equal(gpu_status, status)
    np.testing.assert_allclose(gpu_weights, weights, atol=1e-12)


def test_device_resolution():
    assert resolve_device("cpu") == "cpu"
    if not os.path.exists("/dev/nvidiactl"):
        assert resolve_device("auto") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="--device cuda: requested, but torch sees no GPU"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")


def test_cpu_workers_never_import_torch():
    """Task functions live in these modules; importing torch would cost each worker ~300 MB."""
    code = (
        "import ensir_flow.pipelines.apply, ensir_flow.pipelines.fit, ensir_flow.pipelines.ingest, "
        "ensir_flow.pipelines.evaluate, "
        "ensir_flow.stats, ensir_flow.blend"
    )
    assert "torch" not in modules_imported_by(code)
