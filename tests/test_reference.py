"""Fidelity to the paper's own code on its published GoPro reference set (../shared)."""

import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import xarray as xr

from ensir_flow import metrics
from ensir_flow.lut import Lut, read_paper_lut
from helpers import REFERENCE

pytestmark = [
    pytest.mark.skipif(not REFERENCE.is_dir(), reason=f"reference data not found at {REFERENCE} (../shared is absent)"),
    pytest.mark.slow,
]
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "deblurring-gopro.yaml"
MODELS = ["MPRNet", "Restormer", "DGUNet"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from click.testing import CliRunner

    from ensir_flow.cli import main

    out = tmp_path_factory.mktemp("reference")
    runner = CliRunner()
    for args in (
        ["ingest", REFERENCE / "deblurring", out / "ref.zarr"],
        ["fit", out / "ref.zarr", out / "lut.zarr", "--bin-width", 32],
        ["apply", out / "ref.zarr", out / "lut.zarr", out / "ens.zarr", "--export-dir", out / "png"],
    ):
        result = runner.invoke(main, ["--config", str(CONFIG), *map(str, args), "--no-progress"])
        assert result.exit_code == 0, result.output
    result = runner.invoke(
        main,
        [
            "--config",
            str(CONFIG),
            "evaluate",
            str(out / "ref.zarr"),
            "--ensemble",
            str(out / "ens.zarr"),
            "--json",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_weights_match_published_lut(run):
    out, _ = run
    ours = Lut.from_dataset(xr.open_zarr(out / "lut.zarr").load())
    assert ours.models == MODELS
    published = read_paper_lut(REFERENCE / "luts" / "weight_GoPro_MPRNet_Restormer_DGUNet_b32_rgb.pth", MODELS, 32)
    filled = ours.count > 0
    assert filled.sum() == 455
    assert np.abs(ours.weights - published.weights)[filled].max() < 5e-3


def test_ensembled_images_match_published_output(run):
    out, _ = run
    equal = total = 0
    worst = 0
    for expected_path in sorted((REFERENCE / "expected" / "deblurring-b32").iterdir()):
        ours = iio.imread(out / "png" / f"{expected_path.stem}.png").astype(int)
        expected = iio.imread(expected_path).astype(int)
        equal += int((ours == expected).sum())
        total += expected.size
        worst = max(worst, int(np.abs(ours - expected).max()))
    assert total == 10 * 1280 * 720 * 3
    assert equal / total >= 0.99
    assert worst <= 1


def test_evaluation_ranks_ensemble_first(run):
    _, report = run
    psnr = report["psnr"]
    assert report["images"] == 10
    assert psnr["ensemble"] > psnr["average"]
    assert all(psnr["ensemble"] > psnr[m] for m in MODELS)
    # the paper's code measured DGUNet at 35.313 dB; its 35.582 (ensemble) and 35.542 (average) are
    # on unrounded float outputs, while ours are scored as the uint8 images users get: the paper's
    # own ensembled PNGs score the same as ours.
    assert psnr["DGUNet"] == pytest.approx(35.313, abs=2e-3)
    published = [
        metrics.psnr(iio.imread(path), iio.imread(REFERENCE / "deblurring" / "gt" / path.name))
        for path in sorted((REFERENCE / "expected" / "deblurring-b32").iterdir())
    ]
    assert psnr["ensemble"] == pytest.approx(np.mean(published), abs=2e-3)


def test_cross_validation_ranks_lsq_above_em_above_average(run):
    """Targets on the reference set, 2-fold cross-validation by image, held-out RGB PSNR."""
    from click.testing import CliRunner

    from ensir_flow.cli import main

    out, _ = run
    result = CliRunner().invoke(
        main, ["evaluate", str(out / "ref.zarr"), "--cv", "2", "--solvers", "em,lsq", "--json", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    psnr = report["cv"]["psnr"]
    assert report["cv"]["folds"] == 2 and len(report["cv"]["per_fold"]) == 2
    best_single = max(psnr[m] for m in MODELS)
    assert psnr["lsq"] >= psnr["em"] + 0.05
    assert psnr["lsq"] >= best_single + 0.05
    assert psnr["em"] > psnr["average"]
