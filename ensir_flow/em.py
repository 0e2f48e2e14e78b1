"""EnsIR weight estimation on reduced statistics, batched over cells (torch, cpu or cuda).

Each cell is a 1-D mixture of K Gaussians over its ground-truth values y, one component per
model, with the means held at the mean of that model's predictions in the cell; EM estimates the
mixing weights, which are the ensemble weights. Because y is 8-bit, the cell's data enter only
through their 256-level histogram, so one EM step costs O(K * 256) per cell whatever its size.

This follows the paper's published code step by step (docs/method.md states every rule), including:
- at most 1001 EM iterations, stopping when the mean log-likelihood improves by less than 1e-5;
- cells with fewer than 100 pixels keep their initial weights;
- the reference runs in float32 and gives up on a cell (keeping its initial weights) when a
  component's total responsibility underflows to exactly zero, when a variance is not finite, or
  when a starting variance is zero (a singular covariance): the same outcomes are reproduced here
  by testing the float32 image of each responsibility.
"""

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

from .fit_status import FitStatus
from .stats import CellStatistics

MIN_PIXELS_FOR_EM = 100
MAX_ITERATIONS = 1001
TOLERANCE = 1e-5
EPS = 1e-6
BATCH_CELLS = 4096
COMPACT_EVERY = 16



def initial_weights(statistics: CellStatistics) -> np.ndarray:
    """Softmax of 1 / (1e-10 + r_k), r_k the RMS distance of model k to the per-pixel mean."""
    n_models = statistics.n_models
    n = statistics.counts[:, None].astype(np.float64)
    rms = np.sqrt(statistics.squared_deviations().astype(np.float64) / (n_models * n_models) / n)
    logits = 1.0 / (1e-10 + rms)
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)


def _moments_of(statistics: CellStatistics) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-cell mean and variance of each model's predictions, and whether a variance is zero."""
    counts = statistics.counts
    n = counts[:, None].astype(np.float64)
    sx = statistics.sums
    sxx = np.diagonal(statistics.cross_products(), axis1=1, axis2=2)
    mean = sx / n
    var = np.maximum(sxx / n - mean * mean, 0.0)
    # Exact test in Python integers where float cancellation could hide a tiny non-zero variance.
    zero_var = np.zeros(var.shape, dtype=bool)
    for i, k in zip(*np.nonzero(var < 1.0)):
        zero_var[i, k] = int(counts[i]) * int(sxx[i, k]) == int(sx[i, k]) ** 2
    var[zero_var] = 0.0
    return mean, var, zero_var


def _em_batch(hist: "torch.Tensor", mean: "torch.Tensor", var: "torch.Tensor", pi: "torch.Tensor") -> tuple:
    """Run EM on a batch of cells; returns the final weights and whether each cell failed.

    Cells that stop (converged or failed) are frozen by masks and dropped from the working set
    every COMPACT_EVERY iterations, so the loop synchronises rarely (cheap on a GPU, and few
    Python-level operations per iteration on the CPU).
    """
    import torch

    levels = torch.arange(256, dtype=hist.dtype, device=hist.device)
    log_2pi = math.log(2 * math.pi)
    final_pi = pi.clone()
    failed = torch.zeros(hist.shape[0], dtype=torch.bool, device=hist.device)
    rows = torch.arange(hist.shape[0], device=hist.device)
    h, mu, v, p, n, present = hist, mean, var.clone(), pi.clone(), hist.sum(dim=1), hist > 0
    result, stopped_bad = p.clone(), torch.zeros_like(failed)
    running = torch.ones_like(failed)
    prev_ll = torch.zeros_like(n)
    for iteration in range(MAX_ITERATIONS):
        if iteration and iteration % COMPACT_EVERY == 0:
            if not bool(running.any()):
                break
            gone = ~running
            final_pi[rows[gone]], failed[rows[gone]] = result[gone], stopped_bad[gone]
            rows, h, mu, v, p, n, present, result, stopped_bad, prev_ll, running = (
                t[running] for t in (rows, h, mu, v, p, n, present, result, stopped_bad, prev_ll, running))
        diff = levels[None, None, :] - mu[:, :, None]
        log_prob = -0.5 * (log_2pi + torch.log(v)[:, :, None] + diff * diff / v[:, :, None]) + torch.log(p)[:, :, None]
        log_norm = torch.logsumexp(log_prob, dim=1)
        ll = (h * log_norm).sum(dim=1) / n
        if iteration >= 2:  # the reference's stored score starts at -inf: steps 1 and 2 are compared first
            converged = running & ((ll - prev_ll) < TOLERANCE)
            result = torch.where(converged[:, None], p, result)
            running = running & ~converged
        resp = torch.exp(log_prob - log_norm[:, None, :])
        underflow = ((resp.to(torch.float32) == 0) | ~present[:, None, :]).all(dim=2).any(dim=1)
        weighted = h[:, None, :] * resp
        s = weighted.sum(dim=2)
        centre = (weighted * levels).sum(dim=2) / (s + EPS)
        spread = levels[None, None, :] - centre[:, :, None]
        new_var = (weighted * spread * spread).sum(dim=2) / s + EPS
        bad = running & (underflow | ~torch.isfinite(new_var).all(dim=1))
        stopped_bad = stopped_bad | bad
        running = running & ~bad
        v = torch.where(running[:, None], new_var, v)
        p = torch.where(running[:, None], (s + EPS) / n[:, None], p)
        prev_ll = ll
    result = torch.where(running[:, None], p, result)  # cells still running took every iteration
    final_pi[rows], failed[rows] = result, stopped_bad
    return final_pi, failed


def fit_em(statistics: CellStatistics, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """EnsIR weights and fit status for every non-empty cell of `statistics`.

    Returns weights float64 (m, K) in the order of `statistics.cells`, and a status per cell
    (FitStatus.INITIAL_WEIGHTS, FitStatus.EM or FitStatus.EM_FAILED_INITIAL_WEIGHTS).
    """
    import torch  # imported here: modules that only use the status codes stay light on Dask workers

    weights = initial_weights(statistics)
    status = np.full(len(statistics.cells), FitStatus.INITIAL_WEIGHTS, dtype=np.int8)
    mean, var, zero_var = _moments_of(statistics)
    eligible = statistics.counts >= MIN_PIXELS_FOR_EM
    status[eligible & zero_var.any(axis=1)] = FitStatus.EM_FAILED_INITIAL_WEIGHTS
    rows = np.flatnonzero(eligible & ~zero_var.any(axis=1))
    for start in range(0, len(rows), BATCH_CELLS):
        batch = rows[start: start + BATCH_CELLS]
        as_tensor = lambda a: torch.as_tensor(a, dtype=torch.float64, device=device)  # noqa: E731
        pi, failed = _em_batch(
            as_tensor(statistics.dense_histograms(batch)), as_tensor(mean[batch]),
            as_tensor(var[batch]), as_tensor(weights[batch]),
        )
        failed = failed.cpu().numpy()
        weights[batch[~failed]] = pi.cpu().numpy()[~failed]
        status[batch] = np.where(failed, FitStatus.EM_FAILED_INITIAL_WEIGHTS, FitStatus.EM)
    return weights, status
