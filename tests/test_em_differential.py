"""Differential test of `fit --solver em` against a plain, per-sample rendering of the paper's EM.

The LUT under test comes out of the real pipeline (PNG folders -> `ingest` -> `fit`, in process,
dask threads). The expected weights come from `plain_em` below: one cell at a time, over the raw
ground-truth values y of that (bin, channel) cell as a vector (not a histogram), in float32 like
the paper's code, written from the method's rules and sharing no code with `ensir_flow.em`:

- initial weights softmax_k(1 / (1e-10 + r_k)), r_k the RMS distance of model k to the per-pixel
  mean of the K predictions; fewer than 100 pixels: those weights, no EM;
- fixed means mu_k = mean of x_k; starting variances mean (x_k - mu_k)^2; a zero one: give up;
- the score starts at -inf; each step is an E step, an M step (s_k = sum r_nk,
  m_k = sum r_nk y_n / (s_k + 1e-6), var_k = sum r_nk (y_n - m_k)^2 / s_k + 1e-6,
  pi_k = (s_k + 1e-6) / n), then the mean log-likelihood under the new parameters; stop when it
  gained <= 1e-5 over the previous step's score (so steps 1 and 2 are compared first), or after
  1001 steps; the weights are those after the last step taken;
- a component whose responsibilities are all exactly zero in float32, or a non-finite variance:
  give up; giving up means the cell keeps its initial weights.

A cell is *precision-dependent* when that loop, run in float32 and in float64, takes a different
number of steps or ends with another status: whether a gain falls below 1e-5 then depends on
rounding, and the weights may legitimately differ by the steps one run takes beyond the other.
Such cells are compared with the float64 run of the same loop instead (the precision
`ensir_flow.em` computes in), never skipped; each must be a near tie, and they are counted and
bounded (see `check`).
"""

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import xarray as xr
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from ensir_flow.lut import Lut

MIN_PIXELS = 100
MAX_STEPS = 1001
TOLERANCE = 1e-5
EPS = 1e-6
WEIGHT_ATOL = 5e-3
# Flags of the LUT's `fit_status` (CF flag_meanings of the LUT format, README "Data layout").
EMPTY_FALLBACK, INITIAL, EM, EM_FAILED = 0, 1, 2, 3
# Precision-dependent fits (see `check`): how close to a tie they must be, and how many may
# differ from the float32 loop by more than WEIGHT_ATOL.
TIE_ULPS = 8
OFF_BY_MORE_FRACTION = 0.02
OFF_BY_MORE_FLOOR = 1


# --------------------------------------------------------------------------------------------
# The plain loop


@dataclass
class PlainResult:
    weights: np.ndarray
    status: int
    steps: int  # EM steps taken (0: no EM)
    scores: list = field(default_factory=list)  # mean log-likelihood after each step


def _log_weighted_densities(y, mu, var, pi, dtype):
    """log(pi_k N(y_n | mu_k, var_k)) as a (K, n) array, in `dtype`."""
    log_2pi = dtype(math.log(2 * math.pi))
    d = y[None, :] - mu[:, None]
    with np.errstate(divide="ignore"):  # log(0) = -inf where a float32 weight underflowed
        log_pi = np.log(pi)
    return dtype(-0.5) * (log_2pi + np.log(var)[:, None] + d * d / var[:, None]) + log_pi[:, None]


def _log_sum_exp(a, dtype):
    """log sum_k exp(a_k) per column, shifted by the column's maximum."""
    top = a.max(axis=0)
    return top + np.log(np.exp(a - top[None, :]).sum(axis=0, dtype=dtype))


def mean_log_likelihood(y, mu, var, pi, dtype=np.float32) -> float:
    y, mu, var, pi = (np.asarray(a, dtype) for a in (y, mu, var, pi))
    return float(_log_sum_exp(_log_weighted_densities(y, mu, var, pi, dtype), dtype).mean(dtype=dtype))


def plain_initial_weights(x, dtype=np.float32) -> np.ndarray:
    x = np.asarray(x, dtype)
    per_pixel_mean = x.mean(axis=0, dtype=dtype)
    r = np.sqrt(((x - per_pixel_mean[None, :]) ** 2).mean(axis=1, dtype=dtype))
    logits = dtype(1) / (dtype(1e-10) + r)
    e = np.exp(logits - logits.max())
    return e / e.sum(dtype=dtype)


def plain_starting_point(x, dtype=np.float32):
    """Fixed means and starting variances of the K components."""
    x = np.asarray(x, dtype)
    mu = x.mean(axis=1, dtype=dtype)
    var = ((x - mu[:, None]) ** 2).mean(axis=1, dtype=dtype)
    return mu, var


def plain_em(x, y, dtype=np.float32, max_steps: int = MAX_STEPS) -> PlainResult:
    """The paper's EM on one cell: x (K, n) predictions, y (n,) ground truth, per sample."""
    dtype = np.dtype(dtype).type
    x, y = np.asarray(x, dtype), np.asarray(y, dtype)
    n = y.shape[0]
    initial = plain_initial_weights(x, dtype)
    if n < MIN_PIXELS:
        return PlainResult(initial, INITIAL, 0)
    mu, var = plain_starting_point(x, dtype)
    if (var == 0).any():
        return PlainResult(initial, EM_FAILED, 0)
    pi, eps, tolerance = initial, dtype(EPS), dtype(TOLERANCE)
    score = dtype(-np.inf)
    scores = []
    for step in range(1, max_steps + 1):
        # E step, with the parameters of the previous step
        log_p = _log_weighted_densities(y, mu, var, pi, dtype)
        resp = np.exp(log_p - _log_sum_exp(log_p, dtype)[None, :])
        # the paper's code runs in float32: a component none of whose responsibilities survive
        # in float32 has s_k = 0 there, a 0/0 variance, and the cell is given up
        if (resp.astype(np.float32) == 0).all(axis=1).any():
            return PlainResult(initial, EM_FAILED, step, scores)
        # M step (mu stays fixed; m is only used for the variance)
        s = resp.sum(axis=1, dtype=dtype)
        m = (resp * y[None, :]).sum(axis=1, dtype=dtype) / (s + eps)
        d = y[None, :] - m[:, None]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            var = (resp * d * d).sum(axis=1, dtype=dtype) / s + eps
        if not np.isfinite(var).all():
            return PlainResult(initial, EM_FAILED, step, scores)
        pi = (s + eps) / dtype(n)
        # score with the new parameters; the first comparison is step 2 against step 1
        previous, score = score, _log_sum_exp(_log_weighted_densities(y, mu, var, pi, dtype), dtype).mean(dtype=dtype)
        scores.append(float(score))
        if score - previous <= tolerance:
            break
    return PlainResult(pi.astype(np.float64), EM, step, scores)


# --------------------------------------------------------------------------------------------
# Corpora, the pipeline under test, and the comparison


def _cli_main():
    """The click entry point."""
    from ensir_flow.cli import main

    return main


def fit_through_cli(root: Path, work: Path, bin_width: int) -> Lut:
    """ingest `root` (gt/ + one folder per model) and fit an EM LUT, in process on dask threads."""
    from click.testing import CliRunner

    runner, main = CliRunner(), _cli_main()
    store, lut = work / "store.zarr", work / "lut.zarr"
    for args in (["ingest", root, store], ["fit", store, lut, "--bin-width", bin_width, "--solver", "em"]):
        result = runner.invoke(main, [str(a) for a in args] + ["--scheduler", "threads", "--no-progress"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    return Lut.from_dataset(xr.open_zarr(lut).load())


def write_corpus(root: Path, images: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """images: (ground truth (h, w, C), predictions (K, h, w, C)), uint8; model folders m0..m{K-1}."""
    n_models = images[0][1].shape[0]
    for folder in ["gt"] + [f"m{k}" for k in range(n_models)]:
        (root / folder).mkdir(parents=True)
    squeeze = lambda a: a[:, :, 0] if a.shape[2] == 1 else a  # noqa: E731
    for i, (truth, predictions) in enumerate(images):
        iio.imwrite(root / "gt" / f"img{i}.png", squeeze(truth))
        for k in range(n_models):
            iio.imwrite(root / f"m{k}" / f"img{i}.png", squeeze(predictions[k]))


@dataclass
class Corpus:
    seed: int
    n_models: int
    bin_width: int
    channels: int
    sizes: list
    gains: list
    biases: list
    noises: list
    amplitude: float  # ground-truth swing around 127: above ~128 it saturates at 0 and 255

    def images(self) -> list[tuple[np.ndarray, np.ndarray]]:
        rng = np.random.default_rng(self.seed)
        out = []
        for h, w in self.sizes:
            yy, xx = np.mgrid[0:h, 0:w]
            phase = rng.uniform(0, 2 * np.pi, self.channels)
            smooth = np.sin(xx[..., None] / rng.uniform(3, 12) + phase) * np.cos(yy[..., None] / rng.uniform(3, 12))
            truth = np.clip(np.rint(127 + self.amplitude * smooth + rng.normal(0, 6, (h, w, self.channels))), 0, 255)
            predictions = np.stack(
                [
                    np.clip(np.rint(127 + g * (truth - 127) + b + rng.normal(0, s, truth.shape)), 0, 255)
                    for g, b, s in zip(self.gains, self.biases, self.noises)
                ]
            )
            out.append((truth.astype(np.uint8), predictions.astype(np.uint8)))
        return out


def reference_cells(images, bin_width: int):
    """Per (bin, channel) cell: its raw (x (K, n), y (n,)); and per channel all its pixels."""
    n_models, channels = images[0][1].shape[0], images[0][0].shape[2]
    nb = math.ceil(256 / bin_width)
    y = np.concatenate([t.reshape(-1, channels) for t, _ in images])  # (P, C)
    x = np.concatenate([p.reshape(n_models, -1, channels) for _, p in images], axis=1)  # (K, P, C)
    flat = sum((x[k].astype(np.int64) // bin_width) * nb ** (n_models - 1 - k) for k in range(n_models))
    cells = {}
    for c in range(channels):
        for b in np.unique(flat[:, c]):
            at = flat[:, c] == b
            cells[int(b), c] = (x[:, at, c], y[at, c])
    whole_channels = [(x[:, :, c], y[:, c]) for c in range(channels)]
    return cells, whole_channels


@dataclass
class Dependent:
    """A precision-dependent cell: where the float32 and float64 runs of the plain loop part."""

    label: object
    steps32: int
    steps64: int
    diff32: float  # max |LUT - float32 loop| (informative: the cell is checked against float64)
    diff64: float  # max |LUT - float64 loop|
    tie_ulps: float | None  # |float64 gain - 1e-5| at the step where one run stops, in float32 ulps of the score


@dataclass
class Comparison:
    cells: int = 0  # cells with data
    statuses: dict = field(default_factory=dict)  # cells per status of the float32 loop
    em_cells: int = 0  # cells whose float32 loop runs EM (n >= 100, starting variances > 0)
    fits: int = 0  # EM fits compared: em_cells plus the channel fits behind empty cells
    checked_max_diff: float = 0.0  # max |LUT - float32 loop| over what is not precision-dependent
    dependent: list = field(default_factory=list)  # Dependent
    failures: list = field(default_factory=list)

    @property
    def dependent_max_diff(self) -> float:
        return max((d.diff32 for d in self.dependent), default=0.0)

    @property
    def off_by_more(self) -> list:
        """Precision-dependent fits whose weights are more than WEIGHT_ATOL from the float32 loop."""
        return [d for d in self.dependent if d.diff32 > WEIGHT_ATOL]


def _tie_ulps(single: PlainResult, double: PlainResult) -> float | None:
    """Where both runs end with EM after different step counts: at the first step where one
    stops, how far the float64 gain lies from the threshold, in units of float32 resolution at
    the score (a gain between two float32 scores is a multiple of that)."""
    if single.status != EM or double.status != EM:
        return None
    step = min(single.steps, double.steps)  # >= 2: no run stops before comparing steps 1 and 2
    gain = double.scores[step - 1] - double.scores[step - 2]
    return float(abs(gain - TOLERANCE) / np.spacing(np.float32(abs(double.scores[step - 1]))))


def compare_cell(comparison: Comparison, label, lut_weights, lut_status, x, y, counts_as_cell=True) -> None:
    """One cell (or, with `lut_status` None, a channel's fallback weights, status not checked)."""
    single, double = plain_em(x, y, np.float32), plain_em(x, y, np.float64)
    comparison.fits += single.steps > 0
    if counts_as_cell:
        comparison.cells += 1
        comparison.em_cells += single.steps > 0
        comparison.statuses[single.status] = comparison.statuses.get(single.status, 0) + 1
    diff = float(np.abs(lut_weights - single.weights).max())
    if (single.steps, single.status) != (double.steps, double.status):
        expected, diff64 = double, float(np.abs(lut_weights - double.weights).max())
        comparison.dependent.append(Dependent(label, single.steps, double.steps, diff, diff64, _tie_ulps(single, double)))
        diff = diff64
    else:
        expected = single
        comparison.checked_max_diff = max(comparison.checked_max_diff, diff)
    if lut_status not in (None, expected.status) or not diff <= WEIGHT_ATOL:
        comparison.failures.append(
            f"cell {label}: n={len(y)}, LUT status {lut_status} weights {np.round(lut_weights, 4).tolist()}; "
            f"plain loop status {expected.status} after {expected.steps} steps, weights "
            f"{np.round(expected.weights, 4).tolist()} (float32 {single.steps} steps, float64 {double.steps})"
        )


def compare(lut: Lut, images, bin_width: int) -> Comparison:
    """Every cell of `lut` against the plain loop over the raw pixels of that cell."""
    cells, whole_channels = reference_cells(images, bin_width)
    comparison = Comparison()
    for (b, c), (x, y) in sorted(cells.items()):
        if lut.count[b, c] != len(y):
            comparison.failures.append(f"cell {(b, c)}: LUT count {lut.count[b, c]}, {len(y)} pixels in the corpus")
            continue
        compare_cell(comparison, (b, c), lut.weights[b, c], int(lut.fit_status[b, c]), x, y)
    if int((lut.count > 0).sum()) != len(cells):
        comparison.failures.append(f"{int((lut.count > 0).sum())} cells with data in the LUT, {len(cells)} in the corpus")
    # empty cells take the weights of their whole channel (every channel has data here)
    for c, (x, y) in enumerate(whole_channels):
        empty = np.flatnonzero(lut.count[:, c] == 0)
        if not len(empty):
            continue
        same = (lut.weights[empty, c] == lut.weights[empty[0], c]).all()
        if not same or not (lut.fit_status[empty, c] == EMPTY_FALLBACK).all():
            comparison.failures.append(f"channel {c}: empty cells are not all the same channel fallback")
        compare_cell(comparison, ("channel", c), lut.weights[empty[0], c], None, x, y, counts_as_cell=False)
    return comparison


def off_by_more_bound(fits: int) -> int:
    return max(OFF_BY_MORE_FLOOR, int(OFF_BY_MORE_FRACTION * fits))


def check(comparison: Comparison) -> None:
    """Every cell agrees with the plain loop; precision-dependent cells are explained and bounded.

    A cell is compared with the float32 loop (the paper's precision) unless it is
    precision-dependent; then with the float64 loop, which must agree as closely. Why such cells
    exist: a float32 score near -4 is resolved only to 4.8e-7 (one ulp), so the tolerance 1e-5
    is about 21 ulps and a gain taken between two rounded scores is uncertain by 5-10% of it.
    Where EM crawls (gains shrinking by a percent or less per step, hundreds of steps) the
    float32 and float64 runs cross the threshold at different steps. Over the benchmark's 240
    corpora that is ~10% of the EM fits, nearly all within 5e-3 of each other anyway. So:
    - each one must be such a near tie: where one run stops, the float64 gain lies within
      TIE_ULPS float32 ulps of 1e-5 (the benchmark sees at most ~4). Anything else, including
      the two runs ending with different statuses (never seen), would be a real difference
      between the two precisions, i.e. a bug in the oracle;
    - those whose LUT weights are more than 5e-3 from the float32 loop (the only ones the paper's
      precision does not vouch for) are at most max(1, 2% of the EM fits) per corpus (the
      benchmark: 11 of ~2,800 fits, never two in one corpus).
    """
    assert not comparison.failures, "\n".join(comparison.failures[:20])
    unexplained = [d for d in comparison.dependent if d.tie_ulps is None or d.tie_ulps > TIE_ULPS]
    assert not unexplained, f"float32 and float64 loops part for another reason than a near tie: {unexplained}"
    assert len(comparison.off_by_more) <= off_by_more_bound(comparison.fits), (
        f"{len(comparison.off_by_more)} precision-dependent fits beyond {WEIGHT_ATOL} of the float32 loop "
        f"out of {comparison.fits}: {comparison.off_by_more}"
    )


# --------------------------------------------------------------------------------------------
# Tests


@st.composite
def corpora(draw):
    n_models = draw(st.integers(2, 4))
    per_model = lambda s: draw(st.lists(s, min_size=n_models, max_size=n_models))  # noqa: E731
    return Corpus(
        seed=draw(st.integers(0, 2**32 - 1)),
        n_models=n_models,
        bin_width=draw(st.sampled_from([16, 32, 64, 128])),
        channels=draw(st.sampled_from([1, 3])),
        # one image big enough for cells of a few hundred pixels, then 1 to 3 of any size up to 48 x 64
        sizes=[draw(st.tuples(st.integers(24, 48), st.integers(32, 64)))]
        + draw(st.lists(st.tuples(st.integers(4, 48), st.integers(4, 64)), min_size=1, max_size=3)),
        gains=per_model(st.floats(0.7, 1.3)),
        biases=per_model(st.sampled_from([-60, -25, -8, 0, 5, 15, 40])),
        noises=per_model(st.floats(0.5, 25)),
        amplitude=draw(st.sampled_from([60, 110, 160])),
    )


# No shrinking: each example runs the pipeline, and a failing corpus prints as a few numbers anyway.
@settings(
    max_examples=10,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(corpus=corpora())
def test_fit_matches_plain_reference_loop(corpus):
    images = corpus.images()
    with tempfile.TemporaryDirectory() as tmp:
        write_corpus(Path(tmp) / "corpus", images)
        lut = fit_through_cli(Path(tmp) / "corpus", Path(tmp), corpus.bin_width)
    check(compare(lut, images, corpus.bin_width))


def _saturated_corpus(n: int = 60000, seed: int = 80):
    """One grayscale image of near-white ground truth (mean 259 before clipping, so about half of
    it is 255) and four models that are too dark by 25, 25, 25 and 40 levels (noise 10, 5, 10, 20),
    all clipped to 0..255, as ([(truth, predictions)], the pixel arrays x (K, n), y (n,))."""
    rng = np.random.default_rng(seed)
    y = np.clip(np.rint(rng.normal(259, 23, n)), 0, 255)
    x = np.stack(
        [
            np.clip(np.rint(y + bias + rng.normal(0, noise, n)), 0, 255)
            for bias, noise in [(-25, 10), (-25, 5), (-25, 10), (-40, 20)]
        ]
    ).astype(np.uint8)
    shape = (240, n // 240, 1)
    return [(y.astype(np.uint8).reshape(shape), x.reshape((4, *shape)))], x, y.astype(np.uint8)


def test_cell_whose_first_step_lowers_the_likelihood(tmp_path):
    """Cell (7, 7, 6, 7) of a saturated corpus: ground truth clipped at 255, model 2 one range
    below the others. Its first EM step lowers the likelihood; a convergence test that compared
    it with the starting score would stop there, with weights far from the paper's."""
    images, x, y = _saturated_corpus()
    flat = 7 * 8**3 + 7 * 8**2 + 6 * 8 + 7
    at = sum((x[k] // 32).astype(np.int64) * 8 ** (3 - k) for k in range(4)) == flat
    x_cell, y_cell = x[:, at], y[at]
    # the case is what it claims to be (plain loop, float32 as the paper)
    mu, var = plain_starting_point(x_cell)
    start = mean_log_likelihood(y_cell, mu, var, plain_initial_weights(x_cell))
    reference = plain_em(x_cell, y_cell)
    after_one = plain_em(x_cell, y_cell, max_steps=1)  # where a check against the start would stop
    assert len(y_cell) >= 2000 and (y_cell == 255).mean() > 0.2
    assert reference.status == EM and reference.steps >= 3 and reference.scores[0] < start
    assert np.abs(reference.weights - after_one.weights).max() > 0.5
    assert reference.steps == plain_em(x_cell, y_cell, np.float64).steps
    # through the pipeline
    write_corpus(tmp_path / "corpus", images)
    lut = fit_through_cli(tmp_path / "corpus", tmp_path, 32)
    assert lut.count[flat, 0] == len(y_cell) and lut.fit_status[flat, 0] == EM
    np.testing.assert_allclose(lut.weights[flat, 0], reference.weights, rtol=0, atol=WEIGHT_ATOL)
    # and every other cell of that corpus
    check(compare(lut, images, 32))


def test_plain_loop_rules_by_hand():
    """The oracle's own rules, on data small enough to reason about."""
    rng = np.random.default_rng(5)
    y = rng.integers(100, 140, 99)
    x = np.stack([y, np.clip(y + rng.integers(-6, 7, 99), 0, 255)])
    few = plain_em(x, y)
    assert (few.status, few.steps) == (INITIAL, 0)
    # two models are symmetric about their per-pixel mean: r_0 = r_1, uniform initial weights
    np.testing.assert_allclose(few.weights, [0.5, 0.5], atol=1e-6)
    y = rng.integers(100, 140, 400)
    constant = np.stack([np.full(400, 120), y])
    assert plain_em(constant, y).status == EM_FAILED
    # responsibilities of a component far from every y underflow in float32 -> initial weights
    far = np.stack([np.arange(400) % 2, np.full(400, 200)])
    y_far = rng.integers(195, 206, 400)
    result = plain_em(far, y_far)
    assert result.status == EM_FAILED
    np.testing.assert_allclose(result.weights, plain_initial_weights(far))
    # an ordinary cell converges and its scores never stop on the first step
    y = rng.integers(60, 200, 600)
    x = np.stack([np.clip(y + rng.normal(0, s, 600), 0, 255).round() for s in (2, 6, 15)])
    ok = plain_em(x, y)
    gains = np.diff(ok.scores)
    assert ok.status == EM and 2 <= ok.steps <= MAX_STEPS and len(ok.scores) == ok.steps
    assert gains[-1] <= TOLERANCE and (gains[:-1] > TOLERANCE).all()
    np.testing.assert_allclose(ok.weights.sum(), 1.0, atol=1e-5)
