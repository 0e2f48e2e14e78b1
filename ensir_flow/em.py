"""EnsIR weight estimation on reduced statistics, one cell at a time (numba on the CPU, batched
in torch on a GPU).

Each cell is a 1-D mixture of K Gaussians over its ground-truth values y, one component per
model, with the means held at the mean of that model's predictions in the cell; EM estimates the
mixing weights, which are the ensemble weights. Because y is 8-bit, the cell's data enter only
through their 256-level histogram, so one EM step costs O(K * L) per cell whatever its size, L
the number of levels present (the CPU kernel visits only those).

This follows the paper's published code step by step (docs/method.md states every rule), including:
- at most 1001 EM iterations, stopping when the mean log-likelihood improves by less than 1e-5;
- cells with fewer than 100 pixels keep their initial weights;
- the reference runs in float32 and gives up on a cell (keeping its initial weights) when a
  component's total responsibility underflows to exactly zero, when a variance is not finite, or
  when a starting variance is zero (a singular covariance): the same outcomes are reproduced here
  by testing the float32 image of each responsibility.
"""

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from .fit_status import FitStatus
from .kernel_cache import CACHE
from .stats import CellStatistics

MIN_PIXELS_FOR_EM = 100
MAX_ITERATIONS = 1001
TOLERANCE = 1e-5
EPS = 1e-6
LOG_2PI = math.log(2 * math.pi)
#: GPU batches: cells per batch, and how often finished cells leave the working set.
BATCH_CELLS = 4096
COMPACT_EVERY = 16
#: numpy sums a float64 row of 256 levels pairwise: two halves of 128, each with 8 accumulators
#: (level % 8). The CPU kernel keeps the same 16 partial sums, so its sums are numpy's bits.
HALF_LEVELS = 128
ACCUMULATORS = 8
#: Cells of fewer pixels than this have n * sum x^2 (at most n^2 * 255^2) within int64.
EXACT_INT64_COUNT = math.isqrt((1 << 63) - 1) // 255
#: Fewer cells than this per thread are not worth a thread of their own.
MIN_ROWS_PER_THREAD = 64
#: `initial_weights` works through the cells this many at a time, so that its temporaries stay
#: small (K = 16 at 1.6 million cells: ~200 MB for each (cells, K) array otherwise).
INITIAL_WEIGHTS_BLOCK = 1 << 16


def initial_weights(statistics: CellStatistics) -> np.ndarray:
    """Softmax of 1 / (1e-10 + r_k), r_k the RMS distance of model k to the per-pixel mean (m, K)."""
    n_models, counts = statistics.n_models, statistics.counts
    weights = np.empty((len(counts), n_models))
    for start in range(0, len(counts), INITIAL_WEIGHTS_BLOCK):
        rows = slice(start, start + INITIAL_WEIGHTS_BLOCK)
        n = counts[rows, None].astype(np.float64)
        rms = np.sqrt(statistics.squared_deviations(rows).astype(np.float64) / (n_models * n_models) / n)
        logits = 1.0 / (1e-10 + rms)
        logits -= logits.max(axis=1, keepdims=True)
        block = np.exp(logits)
        weights[rows] = block / block.sum(axis=1, keepdims=True)
    return weights


def _moments_of(statistics: CellStatistics, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and variance of each model's predictions in each cell of `rows` (len(rows), K), and
    whether a variance is zero."""
    counts = statistics.counts[rows]
    n = counts[:, None].astype(np.float64)
    sx = statistics.sums[rows]
    sxx = statistics.sums_of_squares(rows)
    mean = sx / n
    var = np.maximum(sxx / n - mean * mean, 0.0)
    # Exact test n * sum x^2 == (sum x)^2 where float cancellation could hide a tiny non-zero
    # variance: in int64 while n * sum x^2 <= n^2 * 255^2 fits, in Python integers beyond.
    zero_var = (var < 1.0) & (counts[:, None] < EXACT_INT64_COUNT) & (counts[:, None] * sxx == sx * sx)
    for i, k in zip(*np.nonzero((var < 1.0) & (counts[:, None] >= EXACT_INT64_COUNT))):
        zero_var[i, k] = int(counts[i]) * int(sxx[i, k]) == int(sx[i, k]) ** 2
    var[zero_var] = 0.0
    return mean, var, zero_var


@numba.njit
def _pairwise_total(partial):
    """numpy's pairwise sum of a 256-level row from its 16 partial sums (`HALF_LEVELS`). Called, not
    inlined by numba into its four uses: `_em_cells` compiles in about 0.3 s less, and runs as fast."""
    total = 0.0
    for half in range(2):
        r = partial[half * ACCUMULATORS : (half + 1) * ACCUMULATORS]
        half_total = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
        total = half_total if half == 0 else total + half_total
    return total


@numba.njit(nogil=True, cache=CACHE, error_model="numpy")
def _em_cells(
    rows, hist_starts, hist_levels, hist_counts, mean, var, pi, out, failed, log_prob, weighted, per_level, per_model, slot
):
    """EM of each cell of `rows` on its sparse histogram (entries hist_starts[row]:hist_starts[row + 1]
    of hist_levels, hist_counts, levels ascending), from its means, variances and weights (row i of
    mean, var, pi: (len(rows), K) each): final weights into out (len(rows), K) and whether EM
    failed into failed (len(rows),). The rest is scratch (`_em_scratch`): float64 log_prob and
    weighted (K, 256), per_level (5, 256), per_model (6, K), and int64 slot (256,).

    The operations, their order and every sum's grouping are those of `_em_batch_torch`'s loop
    run in numpy on a dense 256-level histogram (how the CPU ran EM before this kernel): absent
    levels add exact zeros to their partial sums, so the weights are that loop's float64 bits.
    Visiting only the L present levels makes a step O(K * L), with no array temporary.
    """
    n_models = mean.shape[1]
    log_norm, level, h, partial, partial_centre = per_level[0], per_level[1], per_level[2], per_level[3], per_level[4]
    log_v, log_p, v, p, s, new_var = per_model[0], per_model[1], per_model[2], per_model[3], per_model[4], per_model[5]
    for i in range(len(rows)):
        row = rows[i]
        start, n_levels = hist_starts[row], hist_starts[row + 1] - hist_starts[row]
        n = 0.0
        for e in range(n_levels):
            y = hist_levels[start + e]
            level[e], h[e] = np.float64(y), np.float64(hist_counts[start + e])
            slot[e] = (y // HALF_LEVELS) * ACCUMULATORS + y % ACCUMULATORS
            n += h[e]
        for k in range(n_models):  # element by element: a whole row assigned makes numba compile its error message
            v[k], p[k] = var[i, k], pi[i, k]
        prev_ll = 0.0
        bad = False
        for iteration in range(MAX_ITERATIONS):
            for k in range(n_models):
                log_v[k], log_p[k] = np.log(v[k]), np.log(p[k])
            partial[: 2 * ACCUMULATORS] = 0.0
            for e in range(n_levels):  # log-likelihood: logsumexp over models, shifted by the peak
                peak = -np.inf
                for k in range(n_models):
                    d = level[e] - mean[i, k]
                    log_prob[k, e] = -0.5 * ((LOG_2PI + log_v[k]) + d * d / v[k]) + log_p[k]
                    peak = max(peak, log_prob[k, e])
                total = np.exp(log_prob[0, e] - peak)
                for k in range(1, n_models):
                    total += np.exp(log_prob[k, e] - peak)
                log_norm[e] = np.log(total) + peak
                partial[slot[e]] += h[e] * log_norm[e]
            ll = _pairwise_total(partial) / n
            if iteration >= 2 and ll - prev_ll < TOLERANCE:  # the reference compares steps 1 and 2 first
                break
            underflow, finite = False, True
            for k in range(n_models):  # responsibilities, then each component's weight and variance
                partial[: 2 * ACCUMULATORS] = 0.0
                partial_centre[: 2 * ACCUMULATORS] = 0.0
                any_left = False
                for e in range(n_levels):
                    resp = np.exp(log_prob[k, e] - log_norm[e])
                    any_left |= np.float32(resp) != 0
                    weighted[k, e] = h[e] * resp
                    partial[slot[e]] += weighted[k, e]
                    partial_centre[slot[e]] += weighted[k, e] * level[e]
                underflow |= not any_left
                s[k] = _pairwise_total(partial)
                centre = _pairwise_total(partial_centre) / (s[k] + EPS)
                partial[: 2 * ACCUMULATORS] = 0.0
                for e in range(n_levels):
                    spread = level[e] - centre
                    partial[slot[e]] += weighted[k, e] * spread * spread
                new_var[k] = _pairwise_total(partial) / s[k] + EPS
                finite &= np.isfinite(new_var[k])
            if underflow or not finite:
                bad = True
                break
            for k in range(n_models):
                v[k], p[k] = new_var[k], (s[k] + EPS) / n
            prev_ll = ll
        failed[i] = bad
        for k in range(n_models):
            out[i, k] = pi[i, k] if bad else p[k]


def _em_batch_torch(hist, mean, var, pi) -> tuple:
    """EM on a batch of cells as torch float64 tensors on one device (dense histograms (n, 256),
    means, variances, weights (n, K)): the final weights and whether each cell failed. The same
    operations as `_em_cells`, as whole-batch tensor operations.

    Cells that stop (converged or failed) are frozen by masks and dropped from the working set
    every COMPACT_EVERY iterations, so the loop synchronises with the host rarely.
    """
    import torch  # imported here: only EM on a GPU needs it

    levels = torch.arange(256, dtype=hist.dtype, device=hist.device)
    final_pi = pi.clone()
    failed = torch.zeros_like(hist[:, 0], dtype=torch.bool)
    rows = torch.arange(hist.shape[0], device=hist.device)
    h, mu, v, p, n, present = hist, mean, var.clone(), pi.clone(), hist.sum(1), hist > 0
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
                t[running] for t in (rows, h, mu, v, p, n, present, result, stopped_bad, prev_ll, running)
            )
        diff = levels[None, None, :] - mu[:, :, None]
        log_prob = -0.5 * (LOG_2PI + torch.log(v)[:, :, None] + diff * diff / v[:, :, None]) + torch.log(p)[:, :, None]
        log_norm = torch.logsumexp(log_prob, dim=1)
        ll = (h * log_norm).sum(1) / n
        if iteration >= 2:  # the reference's stored score starts at -inf: steps 1 and 2 are compared first
            converged = running & ((ll - prev_ll) < TOLERANCE)
            result = torch.where(converged[:, None], p, result)
            running = running & ~converged
        resp = torch.exp(log_prob - log_norm[:, None, :])
        underflow = ((resp.to(torch.float32) == 0) | ~present[:, None, :]).all(2).any(1)
        weighted = h[:, None, :] * resp
        s = weighted.sum(2)
        centre = (weighted * levels).sum(2) / (s + EPS)
        spread = levels[None, None, :] - centre[:, :, None]
        new_var = (weighted * spread * spread).sum(2) / s + EPS
        bad = running & (underflow | ~torch.isfinite(new_var).all(1))
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

    On 'cpu' EM runs in the numba kernel `_em_cells`, on every core: no torch import (1.3-1.8 s of every fit's
    start-up), and no work on absent histogram levels. On a CUDA device it runs in torch there,
    in batches. The float64 weights agree to 1e-12 (tested), and so do the float32 LUTs' bits
    wherever those round alike (all tested cases at K = 2 to 4).
    """
    weights = initial_weights(statistics)
    status = np.full(len(statistics.cells), FitStatus.INITIAL_WEIGHTS, dtype=np.int8)
    rows, mean, var, singular = em_cells(statistics)
    status[singular] = FitStatus.EM_FAILED_INITIAL_WEIGHTS
    if device == "cpu":
        pi, failed = _fit_em_on_cpu(statistics, rows, mean, var, weights[rows])
    else:
        pi, failed = _fit_em_on_device(statistics, rows, mean, var, weights[rows], device)
    weights[rows[~failed]] = pi[~failed]
    status[rows] = np.where(failed, FitStatus.EM_FAILED_INITIAL_WEIGHTS, FitStatus.EM)
    return weights, status


def em_cells(statistics: CellStatistics) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The cells EM runs on, their means and variances (len(rows), K), and the cells EM gives up on
    at once: those of at least MIN_PIXELS_FOR_EM pixels, less those with a zero variance (the
    reference's singular covariance). Means and variances of the other cells are never made: most
    cells are small when K is large."""
    eligible = np.flatnonzero(statistics.counts >= MIN_PIXELS_FOR_EM)
    mean, var, zero_var = _moments_of(statistics, eligible)
    singular = zero_var.any(axis=1)
    return eligible[~singular], mean[~singular], var[~singular], eligible[singular]


def _usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS has one: Linux; else all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _em_scratch(n_models: int) -> tuple[np.ndarray, ...]:
    """The scratch of one `_em_cells` call (see there), allocated here: numba compiles every kind of
    array a kernel allocates apart, which made `_em_cells` compile in 0.2 s more."""
    return (
        np.empty((n_models, 256)),
        np.empty((n_models, 256)),
        np.empty((5, 256)),
        np.empty((6, n_models)),
        np.empty(256, np.int64),
    )


def _fit_em_on_cpu(
    statistics: CellStatistics, rows: np.ndarray, mean: np.ndarray, var: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """`fit_em`'s EM for `rows` (their means, variances and initial weights: row i of each is
    rows[i]'s) in `_em_cells` on every core this process may use (the kernel releases the GIL;
    each thread takes every n-th row, so cells of all sizes are spread evenly): weights
    (len(rows), K), failed."""
    pi, failed = np.empty((len(rows), statistics.n_models)), np.empty(len(rows), dtype=bool)
    histogram = statistics.hist_starts(), statistics.levels, statistics.hist_counts
    n_threads = max(1, min(_usable_cores(), len(rows) // MIN_ROWS_PER_THREAD))

    def run(part: int) -> None:
        share = slice(part, None, n_threads)
        part_pi, part_failed = np.empty_like(pi[share]), np.empty_like(failed[share])
        # contiguous copies of the strided shares: one compiled kernel for every thread count
        own = [np.ascontiguousarray(a[share]) for a in (rows, mean, var, weights)]
        _em_cells(own[0], *histogram, *own[1:], part_pi, part_failed, *_em_scratch(statistics.n_models))
        pi[share], failed[share] = part_pi, part_failed

    with ThreadPoolExecutor(n_threads) as pool:
        list(pool.map(run, range(n_threads)))
    return pi, failed


def _fit_em_on_device(
    statistics: CellStatistics, rows: np.ndarray, mean: np.ndarray, var: np.ndarray, weights: np.ndarray, device: str
) -> tuple[np.ndarray, np.ndarray]:
    """`fit_em`'s EM for `rows` (as `_fit_em_on_cpu` takes them) in torch on `device`, BATCH_CELLS
    cells at a time: weights (len(rows), K), failed."""
    import torch

    as_tensor = lambda a: torch.as_tensor(a, dtype=torch.float64, device=device)  # noqa: E731
    pi, failed = np.empty((len(rows), statistics.n_models)), np.empty(len(rows), dtype=bool)
    for start in range(0, len(rows), BATCH_CELLS):
        batch = slice(start, start + BATCH_CELLS)
        batch_pi, batch_failed = _em_batch_torch(
            as_tensor(statistics.dense_histograms(rows[batch])),
            as_tensor(mean[batch]),
            as_tensor(var[batch]),
            as_tensor(weights[batch]),
        )
        pi[batch], failed[batch] = batch_pi.cpu().numpy(), batch_failed.cpu().numpy()
    return pi, failed
