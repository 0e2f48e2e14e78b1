"""The Python API (`ensir_flow.api`): the functions the CLI calls, their results, where they run,
reading stores and self-describing stores (old ones included). The documented examples run in
test_docs.py."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import ensir_flow
from ensir_flow import schema
from ensir_flow.errors import InputError
from helpers import make_corpus, modules_imported_by, save_export, without_checksums


@pytest.fixture
def workflow(tmp_path, corpus):
    """A corpus ingested, a LUT fitted and applied, through the API (on threads: see conftest)."""
    root, models = corpus
    paths = {name: tmp_path / name for name in ("s.zarr", "lut.zarr", "out.zarr", "png")}
    ensir_flow.ingest(root, paths["s.zarr"], progress=False)
    ensir_flow.fit(paths["s.zarr"], paths["lut.zarr"], progress=False)
    ensir_flow.apply(paths["s.zarr"], paths["lut.zarr"], paths["out.zarr"], export_dir=paths["png"], progress=False)
    return root, models, paths


def test_results_say_what_was_written_as_the_cli_json_does(tmp_path, corpus, invoke):
    root, models = corpus
    ingested = ensir_flow.ingest(root, tmp_path / "s.zarr", progress=False)
    assert (ingested.status, ingested.images, ingested.pixels, ingested.models) == (
        "written",
        3,
        24 * 32 + 17 * 29 + 40 * 21,
        models,
    )
    assert ingested.dataset.sizes["image"] == 3 and ingested.outputs == [str(tmp_path / "s.zarr")]
    again = ensir_flow.ingest(root, tmp_path / "s.zarr", progress=False)
    assert again.status == "unchanged" and again.chunks_written == 0
    fitted = ensir_flow.fit(tmp_path / "s.zarr", tmp_path / "lut.zarr", bin_width=64, solver="lsq", shrinkage=10, progress=False)
    assert fitted.lut.bin_width == 64 and fitted.lut.solver == "lsq" and fitted.filled_cells > 0
    applied = ensir_flow.apply(tmp_path / "s.zarr", tmp_path / "lut.zarr", tmp_path / "out.zarr", progress=False)
    assert (applied.status, applied.images, applied.chunks_computed) == ("written", 3, applied.chunks_total)
    assert set(applied.seconds) == {"apply"} and applied.dataset["ensemble"].dtype == np.uint8
    # the CLI's --json object is the result's to_json(), key for key
    cli = json.loads(
        invoke("apply", tmp_path / "s.zarr", tmp_path / "lut.zarr", tmp_path / "cli.zarr", "--json", "--no-progress").stdout
    )
    api = ensir_flow.apply(tmp_path / "s.zarr", tmp_path / "lut.zarr", tmp_path / "api.zarr", progress=False).to_json()
    assert [key for key in cli if key != "outputs"] == [key for key in api if key != "outputs"]
    assert {k: v for k, v in cli.items() if k not in ("outputs", "seconds")} == {
        k: v for k, v in api.items() if k not in ("outputs", "seconds")
    }
    np.testing.assert_array_equal(
        xr.open_zarr(tmp_path / "cli.zarr")["ensemble"].values, xr.open_zarr(tmp_path / "api.zarr")["ensemble"].values
    )


def test_evaluate_gives_tables_as_pandas(workflow):
    _, models, paths = workflow
    scores = ensir_flow.evaluate(paths["s.zarr"], ensemble=paths["out.zarr"], progress=False)
    assert list(scores.table.index) == [*models, "average", "zzpm", "ensemble"]
    assert list(scores.table.columns) == ["psnr", "ssim"]
    assert scores.table.loc["ensemble", "psnr"] == pytest.approx(scores.evaluation.means("psnr")["ensemble"])
    assert scores.per_image.shape == (3 * 6, 2) and scores.per_image.index.names == ["image", "method"]
    assert scores.text.startswith("3 images, RGB") and scores.to_json()["status"] == "scored"
    cv = ensir_flow.evaluate(paths["s.zarr"], cv=3, solvers=["lsq"], bin_widths=[32, 64], progress=False)
    assert {"lsq@32", "lsq@64"} <= set(cv.table.index) and "fold" in cv.per_image.columns


def test_predict_is_the_cli_predict(tmp_path, invoke):
    import shutil

    import torch

    root = tmp_path / "corpus"
    make_corpus(root, n_models=1, inputs_scale=1)
    shutil.rmtree(root / "model0")
    torch.manual_seed(0)
    model = save_export(torch.nn.Conv2d(3, 3, 3, padding=1), tmp_path / "conv.pt2")
    planned = ensir_flow.predict(root, tmp_path / "p.zarr", models={"a": model}, tile=16, overlap=2, dry_run=True)
    assert (
        planned.status == "planned" and "predict 3 images with 1 model(s)" in planned.plan and "16 px, overlap 2" in planned.plan
    )
    assert not (tmp_path / "p.zarr").exists()
    predicted = ensir_flow.predict(root, tmp_path / "p.zarr", models={"a": model}, samples=2, chunk_pixels=500, progress=False)
    assert isinstance(predicted, ensir_flow.api.Predicted) and predicted.outputs == [str(tmp_path / "p.zarr")]
    assert (predicted.status, predicted.images, predicted.models, predicted.chunks_written) == (
        "written",
        3,
        ["a#0", "a#1"],
        predicted.chunks_total,
    )
    assert set(predicted.seconds) == {"predict"} and predicted.dataset.attrs["model_files"]["a"]["file"] == str(model)
    again = ensir_flow.predict(root, tmp_path / "p.zarr", models=[("a", model)], samples=2, chunk_pixels=500, progress=False)
    assert (again.status, again.chunks_written) == ("unchanged", 0)  # (name, file) pairs name the same models
    # the CLI's --json object is the result's to_json(), and the bytes are the same
    cli = json.loads(
        invoke(
            "predict",
            root,
            tmp_path / "cli.zarr",
            "--model",
            f"a={model}",
            "--samples",
            2,
            "--chunk-pixels",
            500,
            "--json",
            "--no-progress",
        ).stdout
    )
    assert {k: v for k, v in cli.items() if k not in ("outputs", "seconds")} == {
        k: v for k, v in predicted.to_json().items() if k not in ("outputs", "seconds")
    }
    np.testing.assert_array_equal(
        xr.open_zarr(tmp_path / "cli.zarr")["prediction"].values, predicted.dataset["prediction"].values
    )
    # append: the images a store lacks, with its models and options
    part = tmp_path / "part"
    shutil.copytree(root, part)
    for folder in ("lq", "gt"):
        (part / folder / "img2.png").unlink()
    ensir_flow.predict(part, tmp_path / "grown.zarr", models=f"a={model}", progress=False)
    grown = ensir_flow.predict(root, tmp_path / "grown.zarr", models=f"a={model}", append=True, progress=False)
    assert (grown.status, grown.images_added, grown.to_json()["images_added"]) == ("updated", 1, 1)
    assert ensir_flow.open_store(tmp_path / "grown.zarr").sizes["image"] == 3


def test_dry_run_describes_and_writes_nothing(tmp_path, corpus):
    root, _ = corpus
    planned = ensir_flow.ingest(root, tmp_path / "s.zarr", dry_run=True)
    assert planned.status == "planned" and "ingest 3 images of 3 models" in planned.plan
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize(
    "call, message, option",
    [
        (
            lambda root, tmp: ensir_flow.ingest(root, tmp / "s.zarr", append=True, compression="zstd"),
            "--compression: not with --append",
            None,
        ),
        (
            lambda root, tmp: ensir_flow.fit(tmp / "s.zarr", tmp / "l.zarr", solver="lsq", shrinkage=-1),
            "neither 'auto' nor a non-negative number",
            "--shrinkage",
        ),
        (lambda root, tmp: ensir_flow.evaluate(tmp / "s.zarr", cv=2, solvers="average"), "name a solver to fit", "--solvers"),
        (lambda root, tmp: ensir_flow.evaluate(tmp / "s.zarr", cv=2, bin_widths="16,x"), "comma-separated list", "--bin-widths"),
        (lambda root, tmp: ensir_flow.evaluate(tmp / "s.zarr", cv=2, ensemble=tmp / "o.zarr"), "use one or the other", None),
        (lambda root, tmp: ensir_flow.ingest(root, "memory://api/s.zarr", scheduler="local"), "use --scheduler threads", None),
        (
            lambda root, tmp: ensir_flow.apply(tmp / "s.zarr", tmp / "l.zarr", tmp / "o.zarr", png_compression=9),
            "--png-compression: only with --export-dir",
            None,
        ),
        # predict's refusals come before any model file is read (none of these files exists)
        (
            lambda root, tmp: ensir_flow.predict(root, tmp / "p.zarr", models={"a": "a.pt"}, overlap=2),
            "--overlap: only with --tile",
            None,
        ),
        (
            lambda root, tmp: ensir_flow.predict(root, tmp / "p.zarr", models={"a": "a.pt"}, tile=8, overlap=4),
            "leaves no centre",
            "--tile",
        ),
        (
            lambda root, tmp: ensir_flow.predict(root, tmp / "p.zarr", models=["a=a.pt", "nameonly"]),
            "is not NAME=FILE",
            "--model",
        ),
        (
            lambda root, tmp: ensir_flow.predict(root, tmp / "p.zarr", models=[("a", "a.pt"), ("a", "b.pt")]),
            "must be unique",
            "--model",
        ),
        (lambda root, tmp: ensir_flow.predict(root, tmp / "p.zarr", models={}), "name at least one model", "--model"),
        (
            lambda root, tmp: ensir_flow.predict(root, tmp / "p.zarr", models={"a": "a.pt"}, append=True, chunk_pixels=500),
            "--chunk-pixels: not with --append",
            None,
        ),
        (
            lambda root, tmp: ensir_flow.predict(root, tmp / "p.zarr", models={"a": "a.pt"}, value_range="0-2"),
            "'0-2' is not one of",
            "--range",
        ),
    ],
)
def test_the_cli_refusals_are_the_api_refusals(tmp_path, corpus, call, message, option):
    root, _ = corpus
    with pytest.raises(ensir_flow.UsageError, match=re.escape(message)) as refused:
        call(root, tmp_path)
    assert refused.value.option == option
    assert not list(tmp_path.glob("*.zarr"))


def test_bad_input_is_an_input_error_naming_the_file(tmp_path):
    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'missing.zarr'}: store not found")):
        ensir_flow.fit(tmp_path / "missing.zarr", tmp_path / "lut.zarr", progress=False)
    with pytest.raises(InputError, match="store not found"):
        ensir_flow.open_store(tmp_path / "missing.zarr")


def test_runs_on_the_active_client_or_the_one_passed(tmp_path, corpus):
    from distributed import Client, LocalCluster, get_task_stream

    root, _ = corpus
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            with get_task_stream(client) as on_active:
                ensir_flow.ingest(root, tmp_path / "a.zarr", progress=False)
            with get_task_stream(client) as on_threads:
                ensir_flow.ingest(root, tmp_path / "b.zarr", scheduler="threads", progress=False)
            with pytest.raises(ensir_flow.UsageError, match="memory:// exists in this process only"):
                ensir_flow.ingest(root, "memory://api/c.zarr", progress=False)
        with Client(cluster, set_as_default=False) as passed:
            with get_task_stream(passed) as on_passed:
                ensir_flow.ingest(root, tmp_path / "c.zarr", client=passed, progress=False)
    assert on_active.data and on_passed.data and not on_threads.data
    for name in ("b.zarr", "c.zarr"):
        np.testing.assert_array_equal(
            xr.open_zarr(tmp_path / name)["prediction"].values, xr.open_zarr(tmp_path / "a.zarr")["prediction"].values
        )


def test_image_reads_one_image_from_the_ragged_axis(workflow):
    root, models, paths = workflow
    import imageio.v3 as iio

    out, store = ensir_flow.open_store(paths["out.zarr"]), ensir_flow.open_store(paths["s.zarr"])
    for i, stem in enumerate(["img0", "img1", "img2"]):
        exported = iio.imread(paths["png"] / f"{stem}.png")
        np.testing.assert_array_equal(ensir_flow.image(out, stem), exported)
        np.testing.assert_array_equal(ensir_flow.image(out, i), exported)
        np.testing.assert_array_equal(
            ensir_flow.image(store, stem, variable="ground_truth"), iio.imread(root / "gt" / f"{stem}.png")
        )
        np.testing.assert_array_equal(
            ensir_flow.image(store, stem, variable="prediction", model=models[2]), iio.imread(root / models[2] / f"{stem}.png")
        )
    assert ensir_flow.image(out, -1).shape == (40, 21, 3) and ensir_flow.image(out, 1).dtype == np.uint8
    for which, kwargs, message in [
        ("img9", {}, "not in the store"),
        (3, {}, "holds 3 images"),
        ("img0", {"variable": "prediction"}, "say which with model="),
        ("img0", {"variable": "prediction", "model": "other"}, "model 'other': not in the store"),
        ("img0", {"variable": "prediction", "model": 5}, "holds 3 models"),
        ("img0", {"model": 0}, "no model dimension"),
        ("img0", {"variable": "input"}, "no variable"),
    ]:
        with pytest.raises(InputError, match=re.escape(message)):
            ensir_flow.image(store if kwargs.get("variable") == "prediction" else out, which, **kwargs)


def test_stores_describe_themselves(tmp_path, workflow):
    _, models, paths = workflow
    for path in (paths["s.zarr"], paths["out.zarr"]):
        ds = ensir_flow.open_store(path)
        assert ds.attrs["Conventions"].startswith("CF-")
        assert list(ds["channel"].values) == ["R", "G", "B"]
        missing = [name for name in ds.variables if "long_name" not in ds[name].attrs]
        assert not missing, (path, missing)
        assert ds["pixel_count"].attrs["sample_dimension"] == "pixel" and ds["height"].attrs["units"] == "1"
    store, out = ensir_flow.open_store(paths["s.zarr"]), ensir_flow.open_store(paths["out.zarr"])
    assert list(store["model"].values) == models and store["prediction"].attrs["valid_range"] == [0, 255]
    assert out["chunk_complete"].attrs["flag_meanings"] == "not_written written"
    assert "long_name" in repr(out["ensemble"]) or "EnsIR ensemble" in repr(out["ensemble"].attrs)
    gray = tmp_path / "gray"
    make_corpus(gray, channels=1)
    assert list(ensir_flow.ingest(gray, tmp_path / "g.zarr", progress=False).dataset["channel"].values) == ["Y"]


def _strip_to_an_old_store(path: Path) -> None:
    """Make `path` look written before stores described themselves: no channel coordinate, no CF
    attributes (only xarray's own and the ragged layout's sample_dimension), no Conventions."""
    import shutil

    keep = {"_ARRAY_DIMENSIONS", "sample_dimension", "description", "_FillValue"}
    without_checksums(path)
    shutil.rmtree(path / "channel")
    for meta in path.glob("*/zarr.json"):
        doc = json.loads(meta.read_text())
        doc["attributes"] = {k: v for k, v in doc.get("attributes", {}).items() if k in keep}
        meta.write_text(json.dumps(doc))
    root = json.loads((path / "zarr.json").read_text())
    root["attributes"].pop("Conventions")
    entries = root["consolidated_metadata"]["metadata"]
    entries.pop("channel")
    for entry in entries.values():
        entry["attributes"] = {k: v for k, v in entry.get("attributes", {}).items() if k in keep}
    (path / "zarr.json").write_text(json.dumps(root))


def test_stores_written_before_the_attributes_still_work(tmp_path):
    root = tmp_path / "corpus"
    make_corpus(root, sizes=((24, 32), (17, 29)))
    store, lut, out = tmp_path / "s.zarr", tmp_path / "lut.zarr", tmp_path / "out.zarr"
    ensir_flow.ingest(root, store, progress=False)
    _strip_to_an_old_store(store)
    old = ensir_flow.open_store(store)
    assert "channel" not in old.coords and "Conventions" not in old.attrs and not old["prediction"].attrs
    assert ensir_flow.ingest(root, store, progress=False).status == "unchanged"  # not refused as another store
    ensir_flow.fit(store, lut, progress=False)
    ensir_flow.apply(store, lut, out, progress=False)
    _strip_to_an_old_store(out)
    assert ensir_flow.image(ensir_flow.open_store(out), "img1").shape == (17, 29, 3)
    make_corpus(tmp_path / "grown", sizes=((24, 32), (17, 29), (40, 21)))
    assert ensir_flow.ingest(tmp_path / "grown", store, append=True, progress=False).images_added == 1
    updated = ensir_flow.apply(store, lut, out, progress=False)
    assert (updated.status, updated.images_added) == ("updated", 1)
    fresh = ensir_flow.apply(store, lut, tmp_path / "fresh.zarr", progress=False)
    np.testing.assert_array_equal(updated.dataset["ensemble"].values, fresh.dataset["ensemble"].values)
    assert "channel" not in ensir_flow.open_store(out).coords  # an old output keeps its layout


def test_package_exports_the_api_lazily():
    assert set(ensir_flow.API) <= set(dir(ensir_flow)) and ensir_flow.image is schema.image
    loaded = modules_imported_by("import ensir_flow")
    assert "ensir_flow.api" not in loaded and "dask" not in loaded  # workers import the package: it stays cheap
    with pytest.raises(AttributeError):
        ensir_flow.not_a_function  # noqa: B018


def test_export_writes_any_single_image_variable_as_pngs(tmp_path, workflow):
    import imageio.v3 as iio

    root, _, paths = workflow
    exported = ensir_flow.export(paths["s.zarr"], tmp_path / "gt-png", variable="ground_truth", progress=False)
    assert (exported.status, exported.images) == ("written", 3)
    for stem in ("img0", "img1", "img2"):
        np.testing.assert_array_equal(iio.imread(tmp_path / "gt-png" / f"{stem}.png"), iio.imread(root / "gt" / f"{stem}.png"))
    with pytest.raises(InputError, match="'prediction' holds one image per model"):
        ensir_flow.export(paths["s.zarr"], tmp_path / "p-png", variable="prediction", progress=False)
    assert not (tmp_path / "p-png").exists()
