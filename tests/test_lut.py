import json
import pickle

import numpy as np
import pytest
import torch

from ensir_flow import stats
from ensir_flow.errors import InputError
from ensir_flow.fit_status import FitStatus
from ensir_flow.lut import Lut, fit_lut, moments_for, read_paper_lut


def _small_lut():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 256, (2000, 3))
    x = np.stack([np.clip(y + rng.integers(-5, 6, y.shape), 0, 255) for _ in range(3)]).astype(np.uint8)
    return fit_lut(stats.chunk_statistics(x, y.astype(np.uint8), 64), ["a", "b", "c"])


def test_dataset_round_trip_keeps_everything():
    lut = _small_lut()
    ds = lut.to_dataset()
    assert ds["weights"].dims == ("bin", "channel", "model")
    assert ds.attrs["models"] == ["a", "b", "c"] and ds.attrs["bin_width"] == 64
    assert ds.attrs["solver"] == "em" and ds.attrs["empty_policy"] == "channel"
    back = Lut.from_dataset(ds)
    np.testing.assert_array_equal(back.weights, lut.weights)
    np.testing.assert_array_equal(back.count, lut.count)
    np.testing.assert_array_equal(back.fit_status, lut.fit_status)
    assert back.count.sum() == 2000 * 3


def test_model_order_matches_models_by_name_and_names_the_difference():
    lut = _small_lut()
    assert lut.model_order(["a", "b", "c"], 3, "lut.zarr") is None
    assert lut.model_order(["c", "a", "b"], 3, "lut.zarr") == (1, 2, 0)  # the LUT's a, b, c in the store
    with pytest.raises(InputError, match="missing from the store: b; not in the LUT: d"):
        lut.model_order(["a", "d", "c"], 3, "lut.zarr")
    with pytest.raises(InputError, match="the store has \\['a', 'a', 'b'\\]"):
        lut.model_order(["a", "a", "b"], 3, "lut.zarr")
    with pytest.raises(InputError, match="3 channels, the store has 1"):
        lut.model_order(["a", "b", "c"], 1, "lut.zarr")


def test_paper_lut_import_round_trip(tmp_path):
    table = {
        (0, 0): [torch.tensor([0.2, 0.8]), torch.tensor([0.5, 0.5])],
        (128, 0): [torch.tensor([1.0, 0.0]), torch.tensor([0.3, 0.7])],
    }
    path = tmp_path / "w.pth"
    torch.save(table, path)
    with pytest.raises(InputError, match=r"holds 2 bins, but 2 models at bin width 128 make 2\^2 = 4"):
        read_paper_lut(path, ["m1", "m2"], 128)  # the paper's code writes every bin
    table.update({(0, 128): [torch.tensor([0.6, 0.4])] * 2, (128, 128): [torch.tensor([0.1, 0.9])] * 2})
    torch.save(table, path)
    lut = read_paper_lut(path, ["m1", "m2"], 128)
    assert lut.weights.shape == (4, 2, 2)
    np.testing.assert_allclose(lut.weights[0], [[0.2, 0.8], [0.5, 0.5]])
    np.testing.assert_allclose(lut.weights[2], [[1.0, 0.0], [0.3, 0.7]])  # (128, 0) -> digits (1, 0) -> bin 2
    np.testing.assert_allclose(lut.weights[1], [[0.6, 0.4], [0.6, 0.4]])  # (0, 128) -> digits (0, 1) -> bin 1
    with pytest.raises(InputError, match="keys are not tuples of 3 bin edges"):
        read_paper_lut(path, ["m1", "m2", "m3"], 128)


class _RunsCode:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_paper_lut_import_refuses_code(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as file:
        pickle.dump({(0, 0): _RunsCode()}, file)
    with pytest.raises(InputError, match="not a loadable weights-only EnsIR LUT"):
        read_paper_lut(path, ["m1", "m2"], 128)


def _stored_files(root) -> dict[str, object]:
    """Every file of a store by relative path: metadata documents parsed, chunks as bytes."""
    return {
        str(path.relative_to(root)): json.loads(path.read_bytes()) if path.name == "zarr.json" else path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.mark.parametrize(
    "n_models, bin_width, pixels, channels, solver",
    [
        (3, 64, 2000, 3, "em"),  # the paper's case: a flat bin coordinate, one chunk per array
        (8, 32, 10_000, 3, "em"),  # weights cut into several chunks by zarr
        (16, 16, 300, 1, "lsq"),  # no flat bin coordinate (it does not fit 64 bits): bin_digits only
        (3, 32, 0, 3, "average"),  # no stored bins: zero-length arrays
    ],
)
def test_lut_store_written_with_zarr_alone_is_what_xarray_writes(tmp_path, n_models, bin_width, pixels, channels, solver):
    from ensir_flow.pipelines.lut_io import read_lut, write_lut
    from ensir_flow.pipelines.resumable import write_dataset

    rng = np.random.default_rng(n_models)
    truth = rng.integers(0, 256, (pixels, channels), dtype=np.uint8)
    predictions = np.clip(truth + rng.normal(0, 20, (n_models, pixels, channels)), 0, 255).astype(np.uint8)
    lut = fit_lut(stats.chunk_statistics(predictions, truth, bin_width), [f"m{k}" for k in range(n_models)], solver=solver)
    lut.attrs["created_by"] = "test"
    write_dataset(lut.to_dataset(), tmp_path / "xarray.zarr").compute()
    write_lut(lut, tmp_path / "zarr.zarr")
    assert _stored_files(tmp_path / "zarr.zarr") == _stored_files(tmp_path / "xarray.zarr")
    back = read_lut(tmp_path / "zarr.zarr")
    assert back.digest() == lut.digest() and back.attrs["created_by"] == "test"


@pytest.mark.parametrize("n_models, bin_width", [(3, 32), (8, 32), (16, 16)])
def test_statistics_of_em_moments_alone_give_the_same_luts(n_models, bin_width):
    """`fit` gathers only the moments its solver uses (`moments_for`): the same LUT bits as from
    all moments; least squares needs the cross products and refuses without them."""
    rng = np.random.default_rng(n_models)
    truth = rng.integers(0, 256, (3000, 3), dtype=np.uint8)
    predictions = np.clip(truth + rng.normal(0, 12, (n_models, 3000, 3)), 0, 255).astype(np.uint8)
    models = [f"m{k}" for k in range(n_models)]
    every = stats.chunk_statistics(predictions, truth, bin_width)
    alone = stats.chunk_statistics(predictions, truth, bin_width, moments_kind=stats.EM_MOMENTS)
    for solver in ("em", "average", "zzpm"):
        assert moments_for([solver]) == stats.EM_MOMENTS
        mine, reference = fit_lut(alone, models, solver=solver), fit_lut(every, models, solver=solver)
        assert mine.digest() == reference.digest()
        np.testing.assert_array_equal(mine.bin_count, reference.bin_count)
        np.testing.assert_array_equal(mine.bin_status, reference.bin_status)
    assert moments_for(["em", "lsq"]) == stats.ALL_MOMENTS
    with pytest.raises(ValueError, match="only the moments EM uses"):
        fit_lut(alone, models, solver="lsq")


def _swapped(values: np.ndarray) -> np.ndarray:
    """`values` with the first two entries of its last axis swapped where they differ most (weights
    summing to 1 still, but another table)."""
    values = values.copy()
    flat = values.reshape(-1, values.shape[-1])
    row = int(np.argmax(np.abs(flat[:, 0] - flat[:, 1])))
    flat[row, [0, 1]] = flat[row, [1, 0]]
    return values


@pytest.mark.parametrize("n_models, bin_width, same_bins_width", [(3, 64, 65), (8, 32, 33)])
def test_the_digest_changes_with_everything_a_reader_uses(n_models, bin_width, same_bins_width):
    """Apply records `digest()` as what it blended with: any attribute or array that changes a
    result (blend, report, export) changes it, for a dense (small) table and a sparse one alike,
    while the table read back unedited keeps it."""
    rng = np.random.default_rng(n_models)
    truth = rng.integers(0, 256, (2000, 3), dtype=np.uint8)
    predictions = np.clip(truth + rng.normal(0, 12, (n_models, 2000, 3)), 0, 255).astype(np.uint8)
    lut = fit_lut(stats.chunk_statistics(predictions, truth, bin_width), [f"m{k}" for k in range(n_models)])
    assert lut.is_small == (n_models == 3) and len(lut.bin_digits) < lut.n_bins  # some cells take the fallback
    ds = lut.to_dataset()
    assert Lut.from_dataset(ds).digest() == lut.digest()
    reordered = lut.models[::-1]

    def edit(name, value):
        edited = ds.copy(deep=True)
        if name in edited.attrs:
            edited.attrs[name] = value
        else:
            edited[name] = edited[name].copy(data=value)
        return edited

    edits = {
        "solver": [edit("solver", solver) for solver in ("lsq", "imported")],  # fitted weights: zzpm and average refuse them
        "empty_policy": [edit("empty_policy", "as published")],
        "bin_width": [edit("bin_width", same_bins_width)],  # the same number of ranges, so the same bins
        "models": [edit("models", reordered).assign_coords(model=np.array(reordered, dtype=object))],
        "weights": [edit("weights", _swapped(ds["weights"].values))],
        "fallback_weights": [edit("fallback_weights", _swapped(ds["fallback_weights"].values))],
        "count": [edit("count", ds["count"].values + 1)],
        "fit_status": [
            edit(
                "fit_status",
                np.where(ds["fit_status"].values == FitStatus.EM, FitStatus.INITIAL_WEIGHTS, ds["fit_status"].values).astype(
                    np.int8
                ),
            )
        ],
        "fallback_fit_status": [edit("fallback_fit_status", int(FitStatus.UNIFORM))],
    }
    for name, datasets in edits.items():
        for edited in datasets:
            assert Lut.from_dataset(edited).digest() != lut.digest(), name


@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("solver", "bogus", "attribute solver is 'bogus', not one of em, lsq, average, zzpm, select, imported"),
        ("solver", ["em"], "attribute solver is ['em'], not one of em, lsq, average, zzpm, select, imported"),
        ("empty_policy", "nearest", "attribute empty_policy is 'nearest', not one of channel, as published"),
        ("format_version", "1.5", "LUT format version '1.5' is not one this version reads (1, 2)"),
        ("format_version", "2", "LUT format version '2' is not one this version reads (1, 2)"),
        ("format_version", 3, "LUT format version 3 is not one this version reads (1, 2)"),
        ("fallback_fit_status", "0", "attribute fallback_fit_status is '0', not a fit status"),
    ],
)
def test_an_unknown_value_of_an_enumerated_attribute_is_refused(name, value, expected):
    ds = _small_lut().to_dataset()
    ds.attrs[name] = value
    with pytest.raises(InputError) as refused:
        Lut.from_dataset(ds, "lut.zarr")
    assert str(refused.value).startswith("lut.zarr: ") and expected in str(refused.value)
    assert "\n" not in str(refused.value)


def test_coordinates_that_disagree_with_the_luts_attributes_are_refused():
    ds = _small_lut().to_dataset()
    with pytest.raises(
        InputError,
        match=r"lut.zarr: the channel coordinate \['B', 'G', 'R'\] disagrees with the LUT's 3 "
        r"channels \['R', 'G', 'B'\]",
    ):
        Lut.from_dataset(ds.assign_coords(channel=np.array(["B", "G", "R"], dtype=object)), "lut.zarr")
    with pytest.raises(
        InputError,
        match=r"lut.zarr: the model coordinate \['c', 'b', 'a'\] disagrees with the models "
        r"attribute \['a', 'b', 'c'\]",
    ):
        Lut.from_dataset(ds.assign_coords(model=np.array(["c", "b", "a"], dtype=object)), "lut.zarr")
