"""Models are matched by name: a LUT fitted on the models in one order applies to a store that
holds them in another, with the same bytes; a LUT of other models is refused, naming them."""

import numpy as np
import pytest
import zarr

from helpers import make_corpus


@pytest.fixture
def stores(tmp_path, invoke):
    models = make_corpus(tmp_path / "corpus")
    shuffled = [models[2], models[0], models[1]]
    for store, order in (("in-order.zarr", models), ("shuffled.zarr", shuffled)):
        args = ("ingest", tmp_path / "corpus", tmp_path / store, "--models", ",".join(order), "--chunk-pixels", 700)
        assert invoke(*args, "--no-progress").exit_code == 0
    return tmp_path


def ensemble(path):
    return zarr.open_array(store=str(path), path="ensemble")[...]


@pytest.mark.parametrize("solver", ["em", "lsq", "zzpm"])
def test_a_lut_applies_by_model_name_with_the_bytes_of_the_store_in_its_order(stores, invoke, solver):
    assert invoke("fit", stores / "in-order.zarr", stores / "lut.zarr", "--solver", solver, "--no-progress").exit_code == 0
    for store in ("in-order", "shuffled"):
        result = invoke("apply", stores / f"{store}.zarr", stores / "lut.zarr", stores / f"out-{store}.zarr", "--no-progress")
        assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(ensemble(stores / "out-shuffled.zarr"), ensemble(stores / "out-in-order.zarr"))
    result = invoke("evaluate", stores / "shuffled.zarr", "--ensemble", stores / "out-shuffled.zarr", "--json", "--no-progress")
    assert result.exit_code == 0, result.output


def test_a_lut_fitted_in_the_stores_order_gives_the_same_bytes(stores, invoke):
    for store in ("in-order", "shuffled"):
        assert invoke("fit", stores / f"{store}.zarr", stores / f"lut-{store}.zarr", "--no-progress").exit_code == 0
        result = invoke(
            "apply", stores / "shuffled.zarr", stores / f"lut-{store}.zarr", stores / f"out-{store}.zarr", "--no-progress"
        )
        assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(ensemble(stores / "out-in-order.zarr"), ensemble(stores / "out-shuffled.zarr"))


def test_a_lut_of_other_models_is_refused_naming_the_missing_and_the_extra(tmp_path, stores, invoke):
    make_corpus(tmp_path / "other", n_models=3)
    (tmp_path / "other" / "model1").rename(tmp_path / "other" / "sharper")
    assert invoke("ingest", tmp_path / "other", tmp_path / "other.zarr", "--no-progress").exit_code == 0
    assert invoke("fit", stores / "in-order.zarr", stores / "lut.zarr", "--no-progress").exit_code == 0
    result = invoke("apply", tmp_path / "other.zarr", stores / "lut.zarr", tmp_path / "out.zarr", "--no-progress")
    assert result.exit_code == 1
    assert "missing from the store: model1; not in the LUT: sharper" in result.output
    assert not (tmp_path / "out.zarr").exists()
