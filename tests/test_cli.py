"""End-to-end runs of the command line on small synthetic corpora."""

import json

import imageio.v3 as iio
import numpy as np
import pytest
import xarray as xr

from ensir_flow.blend import blend
from ensir_flow.lut import Lut
from helpers import make_corpus, run_workflow


@pytest.mark.parametrize("n_models,bin_width", [(2, 16), (3, 32), (4, 64), (5, 16)])
def test_workflow_for_k_models_and_bin_widths(tmp_path, invoke, n_models, bin_width):
    root = tmp_path / "corpus"
    models = make_corpus(root, n_models=n_models)
    report = run_workflow(invoke, root, tmp_path, bin_width)
    assert report["images"] == 3
    assert set(report["psnr"]) == {*models, "average", "zzpm", "ensemble"} == set(report["ssim"])
    store = xr.open_zarr(tmp_path / "s.zarr")
    assert store["prediction"].dims == ("model", "pixel", "channel")
    assert store.attrs["models"] == models and list(store["model"].values) == models
    lut_ds = xr.open_zarr(tmp_path / "lut.zarr")
    assert lut_ds["weights"].dims == ("bin", "channel", "model")
    bins = lut_ds["bin"].values  # format 2: only the bins with reference pixels, by flat index
    assert lut_ds.attrs["format_version"] == 2 and (np.diff(bins) > 0).all() and bins[-1] < (-(-256 // bin_width)) ** n_models
    assert int(lut_ds["count"].sum()) == store.sizes["pixel"] * 3
    lut = Lut.from_dataset(lut_ds.load())
    ensemble = xr.open_zarr(tmp_path / "out.zarr")["ensemble"].values
    np.testing.assert_array_equal(ensemble, blend(store["prediction"].values, lut.weights, bin_width))
    for stem, h, w, offset in zip(
        store["image"].values, store["height"].values, store["width"].values, store["pixel_offset"].values
    ):
        exported = iio.imread(tmp_path / "png" / f"{stem}.png")
        np.testing.assert_array_equal(exported, ensemble[offset : offset + h * w].reshape(h, w, 3))
    # EnsIR weights are mixture proportions: each cell's weights sum to one (up to EM's 1e-6 terms)
    np.testing.assert_allclose(lut.weights.sum(axis=2), 1.0, atol=1e-4)


@pytest.mark.slow
def test_lut_is_identical_for_any_chunking_and_scheduler(tmp_path, invoke):
    root = tmp_path / "corpus"
    make_corpus(root, sizes=((60, 50), (33, 71), (45, 45)))
    luts = []
    for name, chunk, scheduler in [("a", 1000, "threads"), ("b", 97, "threads"), ("c", 4096, "threads"), ("d", 97, "local")]:
        store, lut = tmp_path / f"{name}.zarr", tmp_path / f"{name}-lut.zarr"
        assert invoke("ingest", root, store, "--chunk-pixels", chunk, "--no-progress").exit_code == 0
        result = invoke("fit", store, lut, "--scheduler", scheduler, "--no-progress")
        assert result.exit_code == 0, result.output
        luts.append(xr.open_zarr(lut).load())
    for other in luts[1:]:
        assert luts[0]["weights"].values.tobytes() == other["weights"].values.tobytes()
        np.testing.assert_array_equal(luts[0]["count"].values, other["count"].values)


def test_production_store_without_ground_truth(tmp_path, invoke):
    reference = tmp_path / "ref"
    make_corpus(reference)
    make_corpus(tmp_path / "prod", with_gt=False, seed=5, sizes=((30, 30), (20, 50)))
    assert invoke("ingest", reference, tmp_path / "ref.zarr", "--no-progress").exit_code == 0
    assert invoke("fit", tmp_path / "ref.zarr", tmp_path / "lut.zarr", "--no-progress").exit_code == 0
    assert invoke("ingest", tmp_path / "prod", tmp_path / "prod.zarr", "--no-progress").exit_code == 0
    assert "ground_truth" not in xr.open_zarr(tmp_path / "prod.zarr")
    result = invoke("apply", tmp_path / "prod.zarr", tmp_path / "lut.zarr", tmp_path / "out.zarr", "--no-progress")
    assert result.exit_code == 0, result.output
    assert xr.open_zarr(tmp_path / "out.zarr").sizes["pixel"] == 900 + 1000
    refused = invoke("fit", tmp_path / "prod.zarr", tmp_path / "lut2.zarr", "--no-progress")
    assert refused.exit_code != 0 and "has no ground truth" in refused.stderr
    assert not (tmp_path / "lut2.zarr").exists()


def test_grayscale_corpus_is_one_channel(tmp_path, invoke):
    root = tmp_path / "gray"
    make_corpus(root, channels=1)
    assert invoke("ingest", root, tmp_path / "g.zarr", "--no-progress").exit_code == 0
    assert xr.open_zarr(tmp_path / "g.zarr").sizes["channel"] == 1
    assert invoke("fit", tmp_path / "g.zarr", tmp_path / "lut.zarr", "--no-progress").exit_code == 0
    result = invoke(
        "apply",
        tmp_path / "g.zarr",
        tmp_path / "lut.zarr",
        tmp_path / "o.zarr",
        "--export-dir",
        tmp_path / "png",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    assert iio.imread(tmp_path / "png" / "img0.png").shape == (24, 32)


def test_dry_run_writes_nothing_and_config_sets_defaults(tmp_path, invoke, corpus):
    root, models = corpus
    result = invoke("ingest", root, tmp_path / "s.zarr", "--dry-run")
    assert result.exit_code == 0 and "3 images" in result.stdout and not (tmp_path / "s.zarr").exists()
    config = tmp_path / "task.yaml"
    config.write_text("models: [model2, model0, model1]\nbin_width: 64\n")
    assert invoke("--config", config, "ingest", root, tmp_path / "s.zarr", "--no-progress").exit_code == 0
    assert xr.open_zarr(tmp_path / "s.zarr").attrs["models"] == ["model2", "model0", "model1"]
    assert invoke("--config", config, "fit", tmp_path / "s.zarr", tmp_path / "l.zarr", "--no-progress").exit_code == 0
    assert xr.open_zarr(tmp_path / "l.zarr").attrs["bin_width"] == 64
    again = invoke("fit", tmp_path / "s.zarr", tmp_path / "l.zarr", "--no-progress")
    assert again.exit_code != 0 and "already exists (pass --overwrite" in again.stderr
    assert invoke("fit", tmp_path / "s.zarr", tmp_path / "l.zarr", "--overwrite", "--no-progress").exit_code == 0
    assert xr.open_zarr(tmp_path / "l.zarr").attrs["bin_width"] == 32


def test_cross_validation_reports_held_out_folds(tmp_path, invoke, corpus):
    root, models = corpus
    assert invoke("ingest", root, tmp_path / "s.zarr", "--chunk-pixels", 500, "--no-progress").exit_code == 0
    result = invoke(
        "evaluate", tmp_path / "s.zarr", "--cv", 3, "--solvers", "em,lsq", "--bin-widths", "32,64", "--json", "--no-progress"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["cv"]["folds"] == 3 and [f["fold"] for f in report["cv"]["per_fold"]] == [0, 1, 2]
    assert [entry["fold"] for entry in report["per_image"]] == [0, 1, 2]
    assert {"em@32", "lsq@32", "em@64", "lsq@64", "average", "zzpm", *models} == set(report["psnr"])
    too_many = invoke("evaluate", tmp_path / "s.zarr", "--cv", 4, "--no-progress")
    assert too_many.exit_code != 0 and "needs between 2 and 3 folds" in too_many.stderr


def test_fit_lsq_records_its_shrinkage_choice(tmp_path, invoke, corpus):
    root, _ = corpus
    assert invoke("ingest", root, tmp_path / "s.zarr", "--no-progress").exit_code == 0
    assert invoke("fit", tmp_path / "s.zarr", tmp_path / "l.zarr", "--solver", "lsq", "--no-progress").exit_code == 0
    attrs = xr.open_zarr(tmp_path / "l.zarr").attrs
    assert attrs["solver"] == "lsq" and "3-fold cross-validation" in attrs["shrinkage_choice"]
    assert float(attrs["shrinkage"]) == float(min(attrs["shrinkage_held_out_mse"], key=attrs["shrinkage_held_out_mse"].get))
    fixed = invoke("fit", tmp_path / "s.zarr", tmp_path / "f.zarr", "--solver", "lsq", "--shrinkage", "25", "--no-progress")
    assert fixed.exit_code == 0 and xr.open_zarr(tmp_path / "f.zarr").attrs["shrinkage"] == 25.0
    bad = invoke("fit", tmp_path / "s.zarr", tmp_path / "g.zarr", "--solver", "lsq", "--shrinkage", "-1", "--no-progress")
    assert bad.exit_code != 0 and "non-negative" in bad.stderr


def test_stores_on_an_fsspec_filesystem(invoke, corpus):
    """memory:// stands in for object storage: every command reads and writes through fsspec."""
    import fsspec

    root, models = corpus
    assert run_workflow(invoke, root, "memory://ensir-test-run")["images"] == 3
    fs = fsspec.filesystem("memory")
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("/ensir-test-run/png", detail=False)) == [
        "img0.png",
        "img1.png",
        "img2.png",
    ]
    assert not [p for p in fs.ls("/ensir-test-run", detail=False) if ".partial-" in p]
    fs.rm("/ensir-test-run", recursive=True)
    # workers of a cluster would write memory:// in their own processes: refused, nothing written
    refused = invoke("ingest", root, "memory://ensir-test-run/c.zarr", "--scheduler", "local", "--no-progress")
    assert refused.exit_code == 2 and "use --scheduler threads" in refused.output
    assert not fs.exists("/ensir-test-run")


def test_zzpm_baseline_through_fit_and_apply(tmp_path, invoke, corpus):
    """fit --solver zzpm records the method; apply computes each image's weights across chunks."""
    from ensir_flow.blend import zzpm

    root, _ = corpus
    assert invoke("ingest", root, tmp_path / "s.zarr", "--chunk-pixels", 300, "--no-progress").exit_code == 0
    assert invoke("fit", tmp_path / "s.zarr", tmp_path / "z.zarr", "--solver", "zzpm", "--no-progress").exit_code == 0
    result = invoke("apply", tmp_path / "s.zarr", tmp_path / "z.zarr", tmp_path / "out.zarr", "--no-progress")
    assert result.exit_code == 0, result.output
    store, ensemble = xr.open_zarr(tmp_path / "s.zarr"), xr.open_zarr(tmp_path / "out.zarr")["ensemble"].values
    predictions = store["prediction"].values
    for offset, count in zip(store["pixel_offset"].values, store["pixel_count"].values):
        np.testing.assert_array_equal(ensemble[offset : offset + count], zzpm(predictions[:, offset : offset + count]))
    report = json.loads(
        invoke("evaluate", tmp_path / "s.zarr", "--ensemble", tmp_path / "out.zarr", "--json", "--no-progress").stdout
    )
    assert report["psnr"]["ensemble"] == report["psnr"]["zzpm"]


def test_inputs_are_stored_when_they_fit_the_layout(tmp_path, invoke):
    make_corpus(tmp_path / "restore", inputs_scale=1)
    assert invoke("ingest", tmp_path / "restore", tmp_path / "r.zarr", "--no-progress").exit_code == 0
    store = xr.open_zarr(tmp_path / "r.zarr")
    lq = iio.imread(tmp_path / "restore" / "lq" / "img1.png")
    offset, count = int(store["pixel_offset"][1]), int(store["pixel_count"][1])
    np.testing.assert_array_equal(store["input"].values[offset : offset + count].reshape(lq.shape), lq)
    assert "lq" in list(store["source"].values)
    make_corpus(tmp_path / "sr", inputs_scale=2)  # super-resolution: inputs are smaller than outputs
    assert invoke("ingest", tmp_path / "sr", tmp_path / "s.zarr", "--no-progress").exit_code == 0
    store = xr.open_zarr(tmp_path / "s.zarr")
    assert "input" not in store and "differ in size" in store.attrs["input"]


def test_compression_changes_bytes_on_disk_not_data(tmp_path, invoke):
    root = tmp_path / "corpus"
    make_corpus(root, sizes=((60, 50), (33, 71)))
    assert invoke("ingest", root, tmp_path / "ref.zarr", "--no-progress").exit_code == 0
    assert invoke("fit", tmp_path / "ref.zarr", tmp_path / "lut.zarr", "--no-progress", "--scheduler", "threads").exit_code == 0
    codecs, values = {}, {}
    for compression in ("lz4", "zstd", "none"):
        store, out = tmp_path / f"{compression}.zarr", tmp_path / f"{compression}-out.zarr"
        assert invoke("ingest", root, store, "--compression", compression, "--no-progress").exit_code == 0
        result = invoke(
            "apply", store, tmp_path / "lut.zarr", out, "--compression", compression, "--no-progress", "--scheduler", "threads"
        )
        assert result.exit_code == 0, result.output
        codecs[compression] = [
            json.loads((path / variable / "zarr.json").read_text())["codecs"]
            for path, variable in ((store, "prediction"), (store, "ground_truth"), (out, "ensemble"))
        ]
        values[compression] = [xr.open_zarr(store)["prediction"].values, xr.open_zarr(out)["ensemble"].values]
        info = json.loads(invoke("info", out, "--json").output)
        assert info["compression"] == {"lz4": "blosc lz4 level 5", "zstd": "zstd level 3", "none": "none"}[compression]
    names = {c: [[codec["name"] for codec in chain] for chain in chains] for c, chains in codecs.items()}
    assert names == {"lz4": [["bytes", "blosc"]] * 3, "zstd": [["bytes", "zstd"]] * 3, "none": [["bytes"]] * 3}
    assert all(chain[1]["configuration"]["cname"] == "lz4" for chain in codecs["lz4"])
    for compression in ("zstd", "none"):
        for a, b in zip(values["lz4"], values[compression]):
            np.testing.assert_array_equal(a, b)
    assert invoke("ingest", root, tmp_path / "x.zarr", "--compression", "gzip").exit_code != 0
    refused = invoke("ingest", root, tmp_path / "zstd.zarr", "--append", "--compression", "lz4")
    assert refused.exit_code == 2 and "--compression: not with --append" in refused.output


@pytest.mark.parametrize(
    "text, message",
    [
        ("bin_widht: 16\n", "unknown key 'bin_widht'"),
        ("metrics:\n  crop_boarder: 4\n", "unknown key 'metrics.crop_boarder'"),
        ("bin_width: 300\n", "'bin_width' must be an integer from 1 to 256"),
        ("solver: eem\n", "'solver' must be one of em, lsq, average, zzpm"),
        ("models: MPRNet\n", "'models' must be a list of model names"),
        ("- just\n- a list\n", "the config must be a mapping"),
    ],
)
def test_config_refuses_unknown_keys_and_bad_values(tmp_path, invoke, corpus, text, message):
    root, _ = corpus
    config = tmp_path / "task.yaml"
    config.write_text(text)
    result = invoke("--config", config, "ingest", root, tmp_path / "s.zarr", "--no-progress")
    assert result.exit_code == 2 and message in result.stderr and str(config) in result.stderr
    assert not (tmp_path / "s.zarr").exists()


def test_config_bin_width_and_solver_reach_cross_validation(tmp_path, invoke, corpus):
    root, _ = corpus
    assert invoke("ingest", root, tmp_path / "s.zarr", "--no-progress").exit_code == 0
    config = tmp_path / "task.yaml"
    config.write_text("bin_width: 64\nsolver: lsq\n")
    result = invoke("--config", config, "evaluate", tmp_path / "s.zarr", "--cv", 3, "--json", "--no-progress")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["options"]["solvers"] == ["lsq"] and report["options"]["bin_widths"] == [64]
    assert set(report["psnr"]) == {"model0", "model1", "model2", "average", "zzpm", "lsq"}


def test_ingest_again_of_the_same_corpus_is_a_no_op_and_a_changed_one_is_refused(tmp_path, invoke, corpus):
    root, _ = corpus
    assert invoke("ingest", root, tmp_path / "s.zarr", "--no-progress").exit_code == 0
    store_files = {p: p.read_bytes() for p in (tmp_path / "s.zarr").rglob("*") if p.is_file()}
    again = invoke("ingest", root, tmp_path / "s.zarr", "--no-progress")
    assert again.exit_code == 0 and "already holds these images: nothing to do" in again.stdout, again.output
    assert {p: p.read_bytes() for p in (tmp_path / "s.zarr").rglob("*") if p.is_file()} == store_files
    other_chunks = invoke("ingest", root, tmp_path / "s.zarr", "--chunk-pixels", 100, "--no-progress")
    assert other_chunks.exit_code == 1 and "already exists (pass --overwrite" in other_chunks.stderr
