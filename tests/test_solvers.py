"""The solver registry (`ensir_flow.solvers`): one object per solver, which fit, apply, evaluate, the
API and the CLI ask; and `select`, which gives each cell to its model of least squared error,
checked against a plain numpy reference in the LUT, in apply's output and in evaluate --cv."""

import json

import numpy as np
import pytest
from test_sparse_lut import members

import ensir_flow
from ensir_flow import metrics, schema, stats
from ensir_flow.blend import blend
from ensir_flow.errors import InputError
from ensir_flow.fit_status import FitStatus
from ensir_flow.lut import EMPTY_POLICIES, LUT_SOLVERS, SOLVERS, Lut, fit_lut, moments_for
from ensir_flow.pipelines.lut_io import read_lut
from ensir_flow.solvers import REGISTRY
from helpers import contents


def reference_choices(predictions: np.ndarray, truth: np.ndarray, bin_width: int) -> tuple[dict, np.ndarray]:
    """Plain numpy: each model's sum of squared errors over the pixels of each cell, and the first
    model of the least one: ({(bin digits, channel): model}, each channel's model over all its pixels)."""
    n_models, n_pixels, n_channels = predictions.shape
    errors = (predictions.astype(np.int64) - truth[None].astype(np.int64)) ** 2  # (K, P, C)
    digits = predictions // bin_width
    keys = np.concatenate([digits.reshape(n_models, -1).T, np.tile(np.arange(n_channels), n_pixels)[:, None]], axis=1)
    cells, cell_of = np.unique(keys, axis=0, return_inverse=True)
    sums = np.zeros((len(cells), n_models), np.int64)
    np.add.at(sums, cell_of.reshape(-1), errors.reshape(n_models, -1).T)
    per_cell = {(tuple(int(d) for d in cell[:-1]), int(cell[-1])): int(np.argmin(row)) for cell, row in zip(cells, sums)}
    return per_cell, np.argmin(errors.sum(axis=1).T, axis=1)


def one_hot(model: int, n_models: int) -> np.ndarray:
    weights = np.zeros(n_models, np.float32)
    weights[model] = 1
    return weights


@pytest.mark.parametrize("n_models, bin_width, tied", [(3, 32, False), (3, 64, True), (5, 16, False), (16, 16, True)])
def test_select_gives_each_cell_its_model_of_least_squared_error(n_models, bin_width, tied):
    """Every cell's weights are 1 for the model of least squared error in it (the first of those that
    tie: with `tied`, the last model is a copy of the first, and is never chosen), every other cell's
    the model of least squared error of its channel; blending picks that model's value."""
    predictions, truth = members(n_models, 3000, seed=n_models)
    if tied:
        predictions[-1] = predictions[0]
    lut = fit_lut(stats.chunk_statistics(predictions, truth, bin_width), [f"m{k}" for k in range(n_models)], solver="select")
    per_cell, per_channel = reference_choices(predictions, truth, bin_width)
    filled = 0
    for digits, weights, counts, statuses in zip(lut.bin_digits.tolist(), lut.bin_weights, lut.bin_count, lut.bin_status):
        for c in range(lut.n_channels):
            chosen = per_cell.get((tuple(digits), c))
            if chosen is None:
                assert counts[c] == 0 and statuses[c] == FitStatus.EMPTY_FALLBACK
                np.testing.assert_array_equal(weights[c], lut.fallback[c])
            else:
                filled += 1
                assert counts[c] > 0 and statuses[c] == FitStatus.SELECTED
                np.testing.assert_array_equal(weights[c], one_hot(chosen, n_models))
    assert filled == len(per_cell)
    np.testing.assert_array_equal(lut.fallback, np.stack([one_hot(k, n_models) for k in per_channel]))
    assert lut.fallback_status == FitStatus.EMPTY_FALLBACK
    if tied:
        assert not lut.bin_weights[..., -1].any() and not lut.fallback[:, -1].any()
    chosen = np.array(
        [
            [per_cell[(tuple(int(d) for d in predictions[:, p, c] // bin_width), c)] for c in range(3)]
            for p in range(predictions.shape[1])
        ]
    )
    expected = np.take_along_axis(predictions, chosen[None], axis=0)[0]
    np.testing.assert_array_equal(blend(predictions, lut.lookup_table(), bin_width), expected)


def test_the_registry_is_what_fit_and_lut_readers_allow():
    """fit makes every registered solver but the LUT import; a LUT of any registered solver reads
    back, one of another solver is refused naming those allowed; a fitted LUT's statuses are its
    solver's; select needs the moments of least squares."""
    assert set(SOLVERS) == {name for name, solver in REGISTRY.items() if solver.fit is not None} >= {"em", "lsq", "select"}
    assert set(LUT_SOLVERS) == set(REGISTRY) and set(EMPTY_POLICIES) == {solver.empty_policy for solver in REGISTRY.values()}
    assert moments_for(["em"]) == stats.EM_MOMENTS and moments_for(["em", "select"]) == stats.ALL_MOMENTS
    predictions, truth = members(3, 2000)
    statistics = stats.chunk_statistics(predictions, truth, 32)
    for name in SOLVERS:
        lut = fit_lut(statistics, ["a", "b", "c"], solver=name, shrinkage=10.0)
        assert {int(s) for s in np.unique(lut.bin_status)} | {lut.fallback_status} <= set(REGISTRY[name].statuses), name
        ds = lut.to_dataset()
        assert Lut.from_dataset(ds).digest() == lut.digest()
        assert ds.attrs["empty_policy_description"] == REGISTRY[name].empty_policy_description
    with pytest.raises(InputError, match="attribute solver is 'best', not one of em, lsq, .*select, imported"):
        Lut.from_dataset(ds.assign_attrs(solver="best"))
    with pytest.raises(InputError, match="unknown solver 'imported'"):
        fit_lut(statistics, ["a", "b", "c"], solver="imported")


def test_select_through_fit_apply_info_and_evaluate_cv(tmp_path, invoke, corpus):
    """fit --solver select, apply (each pixel the value of its cell's model of least squared error,
    as the numpy reference chooses them), info, and evaluate --cv 2 --solvers em,select, whose
    held-out scores of select are those of the reference fitted on the other fold's images."""
    root, models = corpus
    store, lut_path, output = tmp_path / "s.zarr", tmp_path / "lut.zarr", tmp_path / "out.zarr"
    assert invoke("ingest", root, store, "--chunk-pixels", 500, "--no-progress").exit_code == 0
    for args in (("fit", store, lut_path, "--solver", "select", "--bin-width", 64), ("apply", store, lut_path, output)):
        result = invoke(*args, "--no-progress")
        assert result.exit_code == 0, result.output
    ds = contents(store)
    predictions = ds[schema.PREDICTION].transpose("model", "pixel", "channel").values
    truth = ds[schema.GROUND_TRUTH].transpose("pixel", "channel").values

    def picked(training: np.ndarray, pixels: np.ndarray) -> np.ndarray:
        """The value of the model the reference fitted on the pixels `training` picks for each of `pixels`."""
        per_cell, per_channel = reference_choices(predictions[:, training], truth[training], 64)
        chosen = np.array(
            [
                [per_cell.get((tuple(int(d) for d in predictions[:, p, c] // 64), c), per_channel[c]) for c in range(3)]
                for p in pixels
            ]
        )
        return np.take_along_axis(predictions[:, pixels], chosen[None], axis=0)[0]

    everything = np.arange(predictions.shape[1])
    np.testing.assert_array_equal(
        contents(output)[schema.ENSEMBLE].transpose("pixel", "channel").values, picked(everything, everything)
    )
    assert read_lut(lut_path).solver == "select"
    info = json.loads(invoke("info", lut_path, "--json").stdout)
    assert info["solver"] == "select" and info["fit_status"].get("selected", 0) > 0

    result = invoke("evaluate", store, "--cv", 2, "--solvers", "em,select", "--bin-widths", 64, "--json", "--no-progress")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {"em", "select", "average", "zzpm", *models} == set(report["psnr"])
    index = schema.ImageIndex.from_dataset(ds)
    spans = [np.arange(offset, offset + count) for offset, count in zip(index.offsets, index.counts)]
    for image, (entry, pixels) in enumerate(zip(report["per_image"], spans)):
        training = np.concatenate([s for other, s in enumerate(spans) if other % 2 != image % 2])
        shape = (int(index.heights[image]), int(index.widths[image]), 3)
        expected = metrics.psnr(picked(training, pixels).reshape(shape), truth[pixels].reshape(shape))
        assert entry["fold"] == image % 2 and entry["psnr"]["select"] == pytest.approx(expected, abs=1e-9)


def test_the_api_fits_and_cross_validates_select(tmp_path, corpus):
    root, _ = corpus
    ensir_flow.ingest(root, tmp_path / "s.zarr", progress=False)
    fitted = ensir_flow.fit(tmp_path / "s.zarr", tmp_path / "lut.zarr", bin_width=64, solver="select", progress=False)
    assert fitted.lut.solver == "select" and fitted.filled_cells > 0
    scored = ensir_flow.evaluate(tmp_path / "s.zarr", cv=2, solvers=["select"], bin_widths=64, progress=False)
    assert np.isfinite(scored.evaluation.means("psnr")["select"])
