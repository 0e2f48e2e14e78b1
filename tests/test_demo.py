"""The embedded demo corpus and the quick-start command that runs the whole workflow on it."""

import hashlib

import imageio.v3 as iio
import numpy as np
import pytest

from ensir_flow.demo import DEMO_MODELS, build_demo_corpus
from ensir_flow.metrics import psnr


def _digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.png"))}


def test_corpus_is_ragged_paired_deterministic_and_restores(tmp_path):
    models = build_demo_corpus(tmp_path / "a")
    assert models == list(DEMO_MODELS)
    stems = sorted(p.stem for p in (tmp_path / "a" / "gt").iterdir())
    assert len(stems) >= 6
    for folder in ("lq", *models):
        assert sorted(p.stem for p in (tmp_path / "a" / folder).iterdir()) == stems
    shapes = {iio.imread(tmp_path / "a" / "gt" / f"{s}.png").shape for s in stems}
    assert len(shapes) == len(stems) and all(len(s) == 3 and s[2] == 3 for s in shapes)
    build_demo_corpus(tmp_path / "b")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")

    def mean_psnr(folder):
        return np.mean([psnr(iio.imread(tmp_path / "a" / folder / f"{s}.png"), iio.imread(tmp_path / "a" / "gt" / f"{s}.png")) for s in stems])

    degraded = mean_psnr("lq")
    for model in models:
        assert mean_psnr(model) > degraded + 0.5, model
    with pytest.raises(FileExistsError, match="not empty"):
        build_demo_corpus(tmp_path / "a")


def test_demo_command_runs_the_whole_workflow(tmp_path, invoke):
    result = invoke("demo", tmp_path / "run", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "ensemble" in result.stdout and "average" in result.stdout
    assert len(list((tmp_path / "run" / "ensemble-png").glob("*.png"))) == 3
    again = invoke("demo", tmp_path / "run", "--no-progress")
    assert again.exit_code != 0 and "already exists" in again.stderr
