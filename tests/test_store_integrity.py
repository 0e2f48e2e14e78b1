"""Stores and LUTs edited by hand (their root attributes, an array's shape or dimensions) are
refused in one line naming the store and what is wrong, before anything reads their pixels; and a
LUT's digest, recorded by apply, changes with every attribute that changes what it does."""

import json
import shutil

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from ensir_flow import schema
from ensir_flow.cli import main
from ensir_flow.fit_status import FitStatus
from ensir_flow.lut import Lut
from ensir_flow.pipelines.lut_io import write_lut
from ensir_flow.pipelines.stores import open_store, open_store_index
from helpers import make_corpus

MODELS = ["model0", "model1", "model2"]


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A reference store of 3 images (2,101 pixels, RGB) and an EM-labelled LUT that fits it."""
    root = tmp_path_factory.mktemp("integrity")
    make_corpus(root / "corpus")
    assert _run("ingest", root / "corpus", root / "s.zarr", "--no-progress").exit_code == 0
    n_bins = 2**3  # bin width 128: two ranges per model
    weights = np.random.default_rng(0).dirichlet(np.ones(3), (n_bins, 3)).astype(np.float32)
    write_lut(
        Lut(MODELS, 128, weights, np.ones((n_bins, 3), np.int64), np.full((n_bins, 3), FitStatus.EM, np.int8)), root / "lut.zarr"
    )
    return root


def edited(source, target, attributes=None, shapes=None):
    """A copy of the store `source` at `target` with root `attributes` replaced (None: removed) and
    arrays given {name: (shape, dimension names or None)} in their metadata and the consolidated copy."""
    shutil.copytree(source, target)
    root = json.loads((target / "zarr.json").read_text())
    for key, value in (attributes or {}).items():
        if value is None:
            root["attributes"].pop(key)
        else:
            root["attributes"][key] = value
    for name, (shape, dims) in (shapes or {}).items():
        array = json.loads((target / name / "zarr.json").read_text())
        for metadata in (array, root["consolidated_metadata"]["metadata"][name]):
            grid = metadata["chunk_grid"]["configuration"]
            if len(grid["chunk_shape"]) != len(shape):
                grid["chunk_shape"] = shape
            metadata["shape"] = shape
            if dims is not None:
                metadata["dimension_names"] = dims
        (target / name / "zarr.json").write_text(json.dumps(array))
    (target / "zarr.json").write_text(json.dumps(root))
    return target


def refused(*args) -> str:
    """The one-line error of a CLI run that must fail as bad input (a traceback fails the test)."""
    result = _run(*args, "--no-progress")
    message = result.stderr.strip()
    assert result.exit_code == 1 and message.startswith("Error: ") and "\n" not in message, (result.exit_code, message)
    return message


def test_the_untouched_store_passes_both_readers(reference):
    copy = edited(reference / "s.zarr", reference / "untouched.zarr")
    assert schema.check_store(open_store_index(str(copy)), "s", require=(schema.PREDICTION, schema.GROUND_TRUTH)) == MODELS
    assert schema.check_store(open_store(str(copy)), "s", require=(schema.PREDICTION, schema.GROUND_TRUTH)) == MODELS


@pytest.mark.parametrize(
    "version, expected",
    [
        ("1.5", "attribute schema_version is '1.5', not a schema version"),
        (1.5, "attribute schema_version is 1.5, not a schema version"),
        ("1", "attribute schema_version is '1', not a schema version"),
        (True, "attribute schema_version is True, not a schema version"),
        (0, "attribute schema_version is 0, not a schema version"),
        ([1], "attribute schema_version is [1], not a schema version"),
        (2, "written by a newer ensir-flow (schema 2, this one reads up to 1)"),
        (None, "not an ensir-flow store (no schema_version attribute)"),
    ],
)
def test_a_malformed_schema_version_is_refused(reference, tmp_path, version, expected):
    store = edited(reference / "s.zarr", tmp_path / "s.zarr", {"schema_version": version})
    for args in (
        ("fit", store, tmp_path / "lut.zarr"),
        ("apply", store, reference / "lut.zarr", tmp_path / "out.zarr"),
        ("info", store),
    ):
        message = refused(*args)
        assert "s.zarr: " in message and expected in message, message
    assert not (tmp_path / "lut.zarr").exists() and not (tmp_path / "out.zarr").exists()


@pytest.mark.parametrize(
    "attributes, expected",
    [
        (
            {"models": ["model2", "model1", "model0"]},
            "attribute 'models' ['model2', 'model1', 'model0'] disagrees with the "
            "model coordinate ['model0', 'model1', 'model2']",
        ),
        ({"models": [0, 1, 2]}, "attribute 'models' is [0, 1, 2], not a list of model names"),
        ({"channels": 1}, "has length 3 on dimension channel; the store has 1 channels (attribute 'channels')"),
        ({"channels": "3"}, "attribute 'channels' is '3', not a number of channels"),
    ],
)
def test_attributes_that_disagree_with_the_arrays_are_refused(reference, tmp_path, attributes, expected):
    store = edited(reference / "s.zarr", tmp_path / "s.zarr", attributes)
    for args in (("fit", store, tmp_path / "lut.zarr"), ("info", store)):
        message = refused(*args)
        assert "s.zarr: inconsistent store: " in message and expected in message, message
    assert not (tmp_path / "lut.zarr").exists()


def test_models_relabelled_in_the_attribute_and_coordinate_alone_are_refused(reference, tmp_path):
    """The `source` coordinate names the folder each plane came from: relabelling the models in
    the `models` attribute and the `model` coordinate together leaves it disagreeing."""
    relabelled = ["model2", "model1", "model0"]
    store = edited(reference / "s.zarr", tmp_path / "s.zarr", {"models": relabelled})
    zarr.open_array(store=str(store), path="model", mode="r+")[:] = np.array(relabelled, dtype=object)
    expected = (
        f"s.zarr: inconsistent store: attribute 'models' {relabelled} disagrees with the model folders of the "
        f"source coordinate {MODELS}"
    )
    for args in (("fit", store, tmp_path / "lut.zarr"), ("info", store)):
        message = refused(*args)
        assert expected in message, message
    assert not (tmp_path / "lut.zarr").exists()


@pytest.mark.parametrize(
    "shapes, expected",
    [
        ({"ground_truth": ([2000, 3], None)}, "the pixel axis of ground_truth holds 2,000 pixels, its images 2,101"),
        ({"ground_truth": ([2101, 1], None)}, "ground_truth has length 1 on dimension channel; the store has 3 channels"),
        ({"ground_truth": ([2101, 4], None)}, "ground_truth has length 4 on dimension channel; the store has 3 channels"),
        (
            {"ground_truth": ([3, 2101], ["channel", "pixel"])},
            "ground_truth has dimensions ('channel', 'pixel'), expected ('pixel', 'channel')",
        ),
        ({"prediction": ([3, 2000, 3], None)}, "the pixel axis of prediction holds 2,000 pixels, its images 2,101"),
        ({"prediction": ([2, 2101, 3], None)}, "prediction has length 2 on dimension model; the store has 3 models"),
        ({"height": ([2], None)}, "the image index disagrees on the number of images (image 3, height 2, width 3"),
        ({"image": ([2], None)}, "the image index disagrees on the number of images (image 2, height 3"),
        ({"pixel_count": ([3, 1], ["image", "extra"])}, "pixel_count has dimensions ('image', 'extra'), expected ('image',)"),
        ({"source_file": ([4, 2], None)}, "source_file has length 2 on dimension image; the store has 3 images"),
    ],
)
def test_a_reshaped_array_is_refused_before_fit_reads_it(reference, tmp_path, shapes, expected):
    store = edited(reference / "s.zarr", tmp_path / "s.zarr", shapes=shapes)
    message = refused("fit", store, tmp_path / "lut.zarr")  # reads the store with zarr alone
    assert "s.zarr: inconsistent store: " in message and expected in message, message
    assert not (tmp_path / "lut.zarr").exists()
    refused("info", store)  # xarray refuses dimensions of two lengths itself, as an unreadable store


def test_image_sizes_that_do_not_add_up_to_the_pixel_axis_are_refused(reference, tmp_path):
    store = edited(reference / "s.zarr", tmp_path / "s.zarr")
    import zarr

    height = zarr.open_array(store / "height", mode="r+")
    height[0] = height[0] + 1
    message = refused("fit", store, tmp_path / "lut.zarr")
    assert "the pixel axis of prediction holds 2,101 pixels, its images 2,133" in message, message


def test_apply_records_a_digest_that_changes_with_the_luts_solver(reference, tmp_path):
    n_bins = 2**3
    uniform = np.full((n_bins, 3, 3), 1 / 3, np.float32)  # weights each of these solvers may hold
    statuses = np.full((n_bins, 3), FitStatus.UNIFORM, np.int8)
    write_lut(Lut(MODELS, 128, uniform, np.ones((n_bins, 3), np.int64), statuses), tmp_path / "uniform.zarr")
    recorded = {}
    for solver in ("em", "zzpm", "average"):
        lut = edited(tmp_path / "uniform.zarr", tmp_path / f"{solver}.zarr", {"solver": solver})
        assert _run("apply", reference / "s.zarr", lut, tmp_path / f"out-{solver}.zarr", "--no-progress").exit_code == 0
        attributes = json.loads((tmp_path / f"out-{solver}.zarr" / "zarr.json").read_text())["attributes"]
        assert attributes["solver"] == solver
        recorded[solver] = attributes["lut_sha256"]
    assert len(set(recorded.values())) == 3, recorded
    bogus = edited(reference / "lut.zarr", tmp_path / "bogus.zarr", {"solver": "bogus"})
    message = refused("apply", reference / "s.zarr", bogus, tmp_path / "out-bogus.zarr")
    assert "bogus.zarr: attribute solver is 'bogus', not one of em, lsq, average, zzpm, select, imported" in message
    assert not (tmp_path / "out-bogus.zarr").exists()


@pytest.mark.parametrize(
    "solver, rule", [("average", "every weight 1/K"), ("zzpm", "every weight 1/K"), ("select", "all on one model, or uniform")]
)
def test_a_lut_whose_weights_contradict_its_solver_is_refused(reference, tmp_path, solver, rule):
    """An em LUT relabelled as a solver whose weights follow from its name was applied with the em
    weights, and its output recorded the other solver."""
    lut = edited(reference / "lut.zarr", tmp_path / "lut.zarr", {"solver": solver})
    message = refused("apply", reference / "s.zarr", lut, tmp_path / "out.zarr")
    assert f"lut.zarr: its weights are not those of a {solver} LUT (" in message and rule in message, message
    assert not (tmp_path / "out.zarr").exists()


def test_the_luts_of_solvers_with_a_weights_rule_pass_it(reference, tmp_path):
    for solver in ("average", "select", "zzpm"):
        assert _run("fit", reference / "s.zarr", tmp_path / f"{solver}.zarr", "--solver", solver, "--no-progress").exit_code == 0
        assert _run("info", tmp_path / f"{solver}.zarr").exit_code == 0
