"""The embedded demo corpus and the quick-start command that runs the whole workflow on it."""

import hashlib
import json
import os
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest
import xarray as xr

from ensir_flow.demo_corpus import DEMO_MODELS, build_demo_corpus, save_demo_models
from ensir_flow.metrics import psnr
from ensir_flow.models import Inference, check_model_file, loaded_model, model_file, predict_image


def _digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_corpus_is_ragged_paired_deterministic_and_restores(tmp_path):
    root = tmp_path / "a"
    root.mkdir()  # an existing empty folder is fine
    stems = sorted(build_demo_corpus(root))
    assert sorted(p.name for p in root.iterdir()) == ["gt", "lq"]
    assert 6 <= len(stems) <= 8
    for folder in ("gt", "lq"):
        assert sorted(p.name for p in (root / folder).iterdir()) == [f"{s}.png" for s in stems], folder
    # the base models are torch.export programs that predict accepts; their outputs as predict computes them
    paths = save_demo_models(tmp_path / "models")
    models = list(paths)
    assert models == list(DEMO_MODELS) and all(
        check_model_file(path) == "export" and path.suffix == ".pt2" for path in paths.values()
    )
    images = {(folder, s): iio.imread(root / folder / f"{s}.png") for folder in ("gt", "lq") for s in stems}
    gray = images["lq", stems[0]][:37, :61, :1]
    for name, path in paths.items():
        module = loaded_model(model_file(name, path), "cpu")
        for s in stems:
            images[name, s] = predict_image(module, images["lq", s], Inference(), 0, name)
        # exported for any batch, channel count and size: batches of tiles, a small grayscale image
        tiled = predict_image(module, gray, Inference(tile=24, overlap=4, batch=3), 0, name)
        assert tiled.shape == gray.shape and tiled.dtype == np.uint8, name
    for (folder, stem), image in images.items():
        assert image.dtype == np.uint8 and image.shape == images["gt", stem].shape, (folder, stem)
    shapes = [images["gt", s].shape for s in stems]
    assert all(len(s) == 3 and s[2] == 3 for s in shapes)
    assert len({s[:2] for s in shapes}) == len(stems)  # ragged: every image has its own size
    assert all(0.05e6 <= h * w <= 0.15e6 for h, w, _ in shapes)

    build_demo_corpus(tmp_path / "b", seed=0)
    assert _digest(root) == _digest(tmp_path / "b")

    def mean_psnr(folder):
        return np.mean([psnr(images[folder, s], images["gt", s]) for s in stems])

    degraded = mean_psnr("lq")
    restored = {model: mean_psnr(model) for model in models}
    for model, score in restored.items():
        assert score > degraded + 0.5, (model, score, degraded)
    assert max(restored.values()) - min(restored.values()) < 2.0  # close: an ensemble has something to gain


def test_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty") as refused:
        build_demo_corpus(tmp_path)
    assert str(tmp_path) in str(refused.value)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.slow
def test_demo_command_runs_the_whole_workflow(tmp_path, invoke):
    # as the README runs it: its own process, a local cluster, progress lines on stderr (no terminal)
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "ensir_flow", "demo", str(run)],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "ENSIR_FLOW_SCHEDULER"},
    )
    assert result.returncode == 0, result.stderr
    # a progress listener that reached the scheduler after a quick stage's futures were released
    # used to wait for them until the cluster closed, and that wait's cancellation was logged
    assert "Traceback" not in result.stderr and " ERROR " not in result.stderr, result.stderr
    lut = xr.open_zarr(run / "lut.zarr")
    assert lut.attrs["solver"] == "em" and lut.attrs["bin_width"] == 32 and lut.attrs["reference_images"] == 3
    # the held-out half was applied and exported: every PNG is its image of the output store
    output = xr.open_zarr(run / "ensemble.zarr")
    stems = [str(s) for s in output["image"].values]
    assert sorted(p.stem for p in (run / "ensemble-png").glob("*.png")) == sorted(stems) and len(stems) == 3
    for stem, h, w, offset in zip(stems, output["height"].values, output["width"].values, output["pixel_offset"].values):
        pixels = output["ensemble"].values[offset : offset + h * w].reshape(h, w, 3)
        np.testing.assert_array_equal(iio.imread(run / "ensemble-png" / f"{stem}.png"), pixels)
    # the printed scores are those of the stores it wrote, held out, and the cross-validation table follows
    scores = invoke("evaluate", run / "heldout.zarr", "--ensemble", run / "ensemble.zarr", "--json", "--no-progress")
    psnr = json.loads(scores.stdout)["psnr"]
    printed = result.stdout.split("choosing a solver")
    assert len(printed) == 2
    for method in ("ensemble", "average", *DEMO_MODELS):
        assert f"{method.ljust(15)}  {psnr[method]:9.3f}" in printed[0], method
    assert "3-fold cross-validation" in printed[1] and "\nem " in printed[1] and "\nlsq " in printed[1]
    # run again, it finds its finished demo there: nothing written, the same summary
    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    again = invoke("demo", run, "--no-progress")
    assert again.exit_code == 0, again.output
    assert again.stdout == f"{run} already holds this demo: nothing to do\n{result.stdout}"
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before
    # a demo of another version is not this one's: replacing it needs --overwrite
    metadata = json.loads((run / "corpus.zarr" / "zarr.json").read_text())
    metadata["attributes"]["created_by"] = "ensir-flow 0.0.1 predict"
    (run / "corpus.zarr" / "zarr.json").write_text(json.dumps(metadata))
    other = invoke("demo", run, "--no-progress")
    assert other.exit_code == 1 and "already exists (pass --overwrite" in other.stderr
