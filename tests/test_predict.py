"""`predict`: base models run on the degraded inputs, straight into a store that fit, apply and
evaluate take as they take an ingested one. The models are small ones the tests build and save as
`torch.export` programs; TorchScript files, deprecated by torch, are made only where a test checks
that they still load."""

import hashlib
import os
import pickle
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import xarray as xr
import zarr

from ensir_flow.errors import InputError
from ensir_flow.models import Inference, check_model_file, model_file, models_loaded, predict_image, tile_spans
from ensir_flow.pipelines.predict import plan_predict
from ensir_flow.pipelines.resumable import resumable_location
from helpers import contents, export, make_corpus, save_export

#: Receptive radius of `ConvNet`: two 3x3 convolutions.
RADIUS = 2


class ConvNet(torch.nn.Module):
    """A small restorer: the input plus a correction from two 3x3 convolutions (radius 2)."""

    def __init__(self, seed: int, channels: int = 3):
        super().__init__()
        torch.manual_seed(seed)
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(channels, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, channels, 3, padding=1)
        )

    def forward(self, x):
        return x + 0.1 * self.body(x)


class Noisy(torch.nn.Module):
    """A stochastic restorer: the input plus noise from torch's global generator."""

    def forward(self, x):
        return x + 0.05 * torch.randn_like(x)


class Upscale(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")


class Broken(torch.nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how

    def forward(self, x):
        if self.how == "raises":
            raise RuntimeError("boom")
        if self.how == "shape":
            return x[:, :, 1:, :]
        if self.how == "nan":
            return x * float("nan")
        if self.how == "uint8":  # the image as a PNG would hold it, not in the 0..1 it was given
            return (x * 255).round().to(torch.uint8)
        return x[:, :1]  # "channels"


def save_script(module, path) -> Path:
    """`module` as a TorchScript file; torch's deprecation warnings for making one are the test's
    own doing, so they are silenced here (and only here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.(script|save)` is ", category=DeprecationWarning)
        torch.jit.save(torch.jit.script(module.eval()), str(path))
    return Path(path)


@pytest.fixture
def inputs(tmp_path):
    """A corpus of degraded inputs (lq/) and ground truth (gt/), three images of different sizes."""
    root = tmp_path / "corpus"
    make_corpus(root, n_models=1, inputs_scale=1)
    shutil.rmtree(root / "model0")
    return root


@pytest.fixture
def models(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    return {name: save_export(ConvNet(seed), folder / f"{name}.pt2") for name, seed in (("a", 1), ("b", 2), ("c", 3))}


def _model_args(models):
    return [arg for name, path in models.items() for arg in ("--model", f"{name}={path}")]


def _plain_output(module, lq: np.ndarray) -> np.ndarray:
    """What a user's own loop would save as PNG: the model on the whole image, 0..1, rounded."""
    with torch.no_grad():
        y = module(torch.from_numpy(lq).permute(2, 0, 1)[None].float() / 255.0)[0].permute(1, 2, 0).numpy()
    return np.clip(np.floor(y * 255.0 + 0.5), 0, 255).astype(np.uint8)


def test_predict_then_fit_equals_png_then_ingest_then_fit(tmp_path, inputs, models, invoke):
    predicted = invoke("predict", inputs, tmp_path / "p.zarr", *_model_args(models), "--chunk-pixels", 500, "--no-progress")
    assert predicted.exit_code == 0, predicted.output
    # the same models in a plain loop, saved as PNGs, then ingested
    by_hand = tmp_path / "by-hand"
    shutil.copytree(inputs, by_hand)
    loaded = {name: torch.export.load(str(path)).module() for name, path in models.items()}
    for name, module in loaded.items():
        (by_hand / name).mkdir()
        for path in sorted((inputs / "lq").iterdir()):
            iio.imwrite(by_hand / name / path.name, _plain_output(module, iio.imread(path)))
    assert (
        invoke("ingest", by_hand, tmp_path / "i.zarr", "--models", "a,b,c", "--chunk-pixels", 500, "--no-progress").exit_code == 0
    )
    p, i = xr.open_zarr(tmp_path / "p.zarr"), xr.open_zarr(tmp_path / "i.zarr")
    assert p.attrs["models"] == ["a", "b", "c"] and p["prediction"].encoding["chunks"] == i["prediction"].encoding["chunks"]
    for name in ("prediction", "ground_truth", "input", "height", "width", "pixel_offset", "pixel_count", "image"):
        np.testing.assert_array_equal(p[name].values, i[name].values, err_msg=name)
    assert (p["prediction"].values[0] != p["prediction"].values[1]).any()  # the models differ
    for name, path in models.items():
        assert p.attrs["model_files"][name] == {"file": str(path.resolve()), "sha256": model_file(name, path).sha256}
    assert list(p["source"].values) == ["gt", "lq"]
    for store in ("p", "i"):
        assert invoke("fit", tmp_path / f"{store}.zarr", tmp_path / f"{store}-lut.zarr", "--no-progress").exit_code == 0
    lut_p, lut_i = xr.open_zarr(tmp_path / "p-lut.zarr"), xr.open_zarr(tmp_path / "i-lut.zarr")
    assert lut_p["weights"].values.tobytes() == lut_i["weights"].values.tobytes()
    # apply and evaluate take the predicted store as it is
    assert invoke("apply", tmp_path / "p.zarr", tmp_path / "p-lut.zarr", tmp_path / "out.zarr", "--no-progress").exit_code == 0
    scored = invoke("evaluate", tmp_path / "p.zarr", "--ensemble", tmp_path / "out.zarr", "--no-progress")
    assert scored.exit_code == 0 and "ensemble" in scored.stdout
    # the same command again: nothing to do
    again = invoke("predict", inputs, tmp_path / "p.zarr", *_model_args(models), "--chunk-pixels", 500, "--no-progress")
    assert again.exit_code == 0 and "nothing to do" in again.stdout


def test_tiles_equal_whole_images_when_the_overlap_covers_the_receptive_field():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    module = export(ConvNet(4)).module()
    whole = predict_image(module, image, Inference(), 0, "whole")
    for tile, batch in ((2 * RADIUS + 1, 1), (16, 1), (16, 4), (30, 3)):
        tiled = predict_image(module, image, Inference(tile=tile, overlap=RADIUS, batch=batch), 0, "tiled")
        np.testing.assert_array_equal(tiled, whole, err_msg=f"tile {tile} batch {batch}")
    short = predict_image(module, image, Inference(tile=16, overlap=RADIUS - 1), 0, "short")
    assert (short != whole).any()  # an overlap below the receptive radius shows at the seams


def test_tile_spans_cover_each_pixel_once():
    for length, tile, overlap in ((37, 16, 2), (5, 16, 2), (100, 9, 4)):
        spans = tile_spans(length, tile, overlap)
        kept = np.concatenate([np.arange(keep0, keep1) for _, _, keep0, keep1 in spans])
        np.testing.assert_array_equal(kept, np.arange(length))
        for start, stop, keep0, keep1 in spans:
            assert stop - start == min(tile, length) and start <= keep0 < keep1 <= stop
            assert (keep0 - start >= overlap or start == 0) and (stop - keep1 >= overlap or stop == length)
    with pytest.raises(ValueError, match="no centre"):
        tile_spans(10, 4, 2)


def test_tiled_predict_equals_whole_predict_through_the_store(tmp_path, inputs, models, invoke):
    args = _model_args({"a": models["a"]})
    assert invoke("predict", inputs, tmp_path / "whole.zarr", *args, "--no-progress").exit_code == 0
    result = invoke(
        "predict", inputs, tmp_path / "tiled.zarr", *args, "--tile", 12, "--overlap", RADIUS, "--batch", 2, "--no-progress"
    )
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(
        xr.open_zarr(tmp_path / "tiled.zarr")["prediction"].values, xr.open_zarr(tmp_path / "whole.zarr")["prediction"].values
    )


class Evil:
    """A pickle that creates a file when it is loaded."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def _rewrite(source, destination, member, data) -> Path:
    """A copy of the zip archive `source` whose members ending in `member` hold `data`."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(destination, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, data if info.filename.endswith(member) else zin.read(info.filename))
    return Path(destination)


def _crafted_files(tmp_path, models) -> dict[str, Path]:
    """Model files that would create tmp_path/pwned if torch loaded them."""
    target = tmp_path / "pwned"
    evil = tmp_path / "evil"
    evil.mkdir()
    files = {"plain pickle .pt": evil / "plain.pt", "plain pickle .pt2": evil / "plain.pt2", "torch.save .pt": evil / "saved.pt"}
    for name in ("plain pickle .pt", "plain pickle .pt2"):
        files[name].write_bytes(pickle.dumps(Evil(target)))
    torch.save({"weights": Evil(target)}, files["torch.save .pt"])
    script = save_script(ConvNet(1), evil / "clean.pt")
    files["TorchScript with a foreign data.pkl"] = _rewrite(
        script, evil / "script.pt", "/data.pkl", pickle.dumps(Evil(target), protocol=2)
    )
    files["torch.export with a foreign sample input"] = _rewrite(
        models["b"], evil / "export.pt2", "sample_inputs/model.pt", files["torch.save .pt"].read_bytes()
    )
    return files


def test_model_files_that_would_run_code_are_refused_without_running_it(tmp_path, inputs, models, invoke):
    crafted = _crafted_files(tmp_path, models)
    # the crafted export really runs code when torch loads it unchecked: the check is what stops it
    with pytest.raises(Exception):  # noqa: B017 - whatever the crafted code raises once it has run
        torch.export.load(str(crafted["torch.export with a foreign sample input"]))
    assert (tmp_path / "pwned").exists()
    (tmp_path / "pwned").unlink()
    for what, path in crafted.items():
        with pytest.raises(InputError, match="refused") as refused:
            check_model_file(path)
        assert str(path) in str(refused.value), what
        result = invoke("predict", inputs, tmp_path / "s.zarr", "--model", f"evil={path}", "--no-progress")
        assert result.exit_code == 1 and str(path) in result.stderr and len(result.stderr.strip().splitlines()) == 1, what
        assert not (tmp_path / "pwned").exists(), what
        assert not (tmp_path / "s.zarr").exists()
    assert (
        check_model_file(models["a"]) == "export"
        and check_model_file(save_script(ConvNet(1), tmp_path / "a.pt")) == "torchscript"
    )


def test_a_damaged_or_truncated_export_is_refused_in_one_line_naming_it(tmp_path, inputs, models, invoke):
    whole = models["a"].read_bytes()
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(whole[: len(whole) // 2])
    damaged = _rewrite(models["a"], tmp_path / "damaged.pt2", "models/model.json", b'{"not": "a program"')
    for path, says in ((truncated, "a damaged or truncated zip archive"), (damaged, "model 'a' cannot be loaded (")):
        result = invoke("predict", inputs, tmp_path / "s.zarr", "--model", f"a={path}", "--no-progress")
        line = result.stderr.strip()
        assert result.exit_code == 1 and len(line.splitlines()) == 1 and f"{path}: " in line and says in line, line
        assert not (tmp_path / "s.zarr").exists()


def test_torchscript_still_loads_without_a_warning_and_gives_the_bytes_of_torch_export(tmp_path, inputs, invoke):
    """The same models as TorchScript (.pt, deprecated by torch) and torch.export (.pt2) files:
    predict's outputs are the same bytes, the .pt2's provenance is its path and SHA-256 as for any
    file, and loading the .pt passes no deprecation warning on to the user."""
    folder = tmp_path / "models"
    folder.mkdir()
    stores = {}
    for suffix, save in ((".pt", save_script), (".pt2", save_export)):
        files = {"conv": save(ConvNet(9), folder / f"conv{suffix}"), "noisy": save(Noisy(), folder / f"noisy{suffix}")}
        stores[suffix] = tmp_path / f"{suffix[1:]}.zarr"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = invoke("predict", inputs, stores[suffix], *_model_args(files), "--samples", 2, "--no-progress")
        assert result.exit_code == 0 and "deprecat" not in result.output.lower(), result.output
        assert not [str(w.message) for w in caught if "torch.jit" in str(w.message)], suffix
        recorded = xr.open_zarr(stores[suffix]).attrs["model_files"]
        assert recorded == {
            name: {"file": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
            for name, path in files.items()
        }
    script, exported = (xr.open_zarr(stores[suffix]) for suffix in (".pt", ".pt2"))
    assert script["prediction"].values.tobytes() == exported["prediction"].values.tobytes()
    assert (script["prediction"].values[0] != script["prediction"].values[2]).any()  # the models differ


def test_samples_are_seeded_by_image_and_sample(tmp_path, inputs, invoke):
    noisy = save_export(Noisy(), tmp_path / "noisy.pt2")
    args = ["--model", f"n={noisy}", "--samples", 3, "--no-progress"]
    assert invoke("predict", inputs, tmp_path / "one.zarr", *args).exit_code == 0
    assert invoke("predict", inputs, tmp_path / "two.zarr", *args, "--scheduler", "threads").exit_code == 0
    one, two = xr.open_zarr(tmp_path / "one.zarr"), xr.open_zarr(tmp_path / "two.zarr")
    assert one.attrs["models"] == ["n#0", "n#1", "n#2"]
    assert one["prediction"].values.tobytes() == two["prediction"].values.tobytes()
    planes = one["prediction"].values
    assert (planes[0] != planes[1]).any() and (planes[1] != planes[2]).any()
    # a seed belongs to (image, sample): the same image predicted alone gets the same bytes
    alone = tmp_path / "alone"
    for folder in ("lq", "gt"):
        (alone / folder).mkdir(parents=True)
        shutil.copy(inputs / folder / "img1.png", alone / folder)
    assert invoke("predict", alone, tmp_path / "alone.zarr", *args).exit_code == 0
    offset, count = int(one["pixel_offset"].values[1]), int(one["pixel_count"].values[1])
    np.testing.assert_array_equal(xr.open_zarr(tmp_path / "alone.zarr")["prediction"].values, planes[:, offset : offset + count])


def test_super_resolution_is_checked_against_scale(tmp_path, invoke):
    root = tmp_path / "sr"
    make_corpus(root, n_models=1, inputs_scale=2, sizes=((24, 32), (18, 30)))
    shutil.rmtree(root / "model0")
    up = save_export(Upscale(), tmp_path / "up.pt2")
    result = invoke("predict", root, tmp_path / "s.zarr", "--model", f"up={up}", "--scale", 2, "--no-progress")
    assert result.exit_code == 0, result.output
    ds = xr.open_zarr(tmp_path / "s.zarr")
    assert "input" not in ds and "lq/ not stored" in ds.attrs["input"]
    assert ds["height"].values.tolist() == [24, 18] and ds["width"].values.tolist() == [32, 30]
    wrong = invoke("predict", root, tmp_path / "t.zarr", "--model", f"up={up}", "--no-progress")
    assert wrong.exit_code == 1 and "gt" in wrong.stderr and "--scale 1" in wrong.stderr  # gt is twice lq's size


@pytest.mark.parametrize(
    "how, says",
    [
        ("raises", "the model failed (builtins.RuntimeError: boom)"),
        ("one size", "the model failed (Guard failed: x.size()["),  # whichever image fails first: its height or width
        ("shape", "returned (1, 3,"),
        ("nan", "NaN"),
        ("channels", "wrong channel count"),
        ("uint8", "returned torch.uint8 values, expected floating point in 0..1"),
    ],
)
def test_a_failing_model_is_named_with_the_image_and_nothing_is_written(tmp_path, inputs, models, invoke, how, says):
    if how == "raises":  # an exception cannot be exported; TorchScript's interpreter puts its own header before it
        broken = save_script(Broken(how), tmp_path / f"{how}.pt")
    elif how == "one size":  # exported for 24x24 images alone: the program's shape guard fails on the others
        broken = save_export(ConvNet(1), tmp_path / "one-size.pt2", dynamic=False)
    else:
        broken = save_export(Broken(how), tmp_path / f"{how}.pt2")
    result = invoke(
        "predict", inputs, tmp_path / "s.zarr", "--model", f"a={models['a']}", "--model", f"bad={broken}", "--no-progress"
    )
    assert result.exit_code == 1, result.output
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "model 'bad'" in line and "/lq/img" in line and says in line, line
    assert not (tmp_path / "s.zarr").exists()


def test_model_names_of_evaluated_combinations_and_missing_files_are_refused(tmp_path, inputs, models, invoke):
    """A member named 'average' (or zzpm, ensemble) took the combination's row in evaluate's table
    (the model's scores vanished, exit 0); a missing model file was called 'a plain pickle?'."""
    named = invoke("predict", inputs, tmp_path / "s.zarr", "--model", f"average={models['a']}", "--no-progress")
    assert named.exit_code == 1 and "a model named 'average', the name of a combination evaluate scores" in named.stderr
    missing = invoke("predict", inputs, tmp_path / "s.zarr", "--model", f"a={tmp_path / 'nowhere.pt'}", "--no-progress")
    assert missing.exit_code == 1 and missing.stderr.strip().endswith("nowhere.pt: model file not found"), missing.stderr
    assert not (tmp_path / "s.zarr").exists()


def test_a_model_file_swapped_between_plan_and_run_is_refused(tmp_path, inputs, models):
    """The plan hashes each model file; a worker that reads other bytes refuses them, so a store never
    holds outputs of a model its provenance does not name."""
    swapped = tmp_path / "swapped.pt2"
    shutil.copy(models["a"], swapped)
    plan = plan_predict(inputs, str(tmp_path / "s.zarr"), [model_file("a", swapped)])
    shutil.copy(models["c"], swapped)
    with pytest.raises(InputError, match="swapped.pt2: model 'a' changed while the run was under way"):
        plan.run()
    assert not (tmp_path / "s.zarr").exists()


def test_each_model_is_loaded_once_per_process(tmp_path, inputs):
    folder = tmp_path / "fresh"
    folder.mkdir()
    fresh = [model_file(name, save_export(ConvNet(seed), folder / f"{name}.pt2")) for name, seed in (("x", 5), ("y", 6))]
    before = models_loaded()
    plan_predict(inputs, str(tmp_path / "s.zarr"), fresh, chunk_pixels=300).run()  # 3 images, dask's threads
    assert models_loaded() - before == 2


def test_append_predicts_new_stems_only_and_equals_one_run(tmp_path, inputs, models, invoke):
    args = [*_model_args({"a": models["a"]}), "--chunk-pixels", 700, "--no-progress"]
    assert invoke("predict", inputs, tmp_path / "all.zarr", *args).exit_code == 0
    part = tmp_path / "part"
    shutil.copytree(inputs, part)
    for folder in ("lq", "gt"):
        (part / folder / "img2.png").unlink()
    assert invoke("predict", part, tmp_path / "grown.zarr", *args).exit_code == 0
    args = [arg for arg in args if arg not in ("--chunk-pixels", 700)]
    appended = invoke("predict", inputs, tmp_path / "grown.zarr", *args, "--append")
    assert appended.exit_code == 0 and "1 new image" in appended.stdout, appended.output
    grown, whole = xr.open_zarr(tmp_path / "grown.zarr"), xr.open_zarr(tmp_path / "all.zarr")
    for name in ("prediction", "ground_truth", "input", "pixel_offset", "image"):
        np.testing.assert_array_equal(grown[name].values, whole[name].values, err_msg=name)
    other = invoke("predict", inputs, tmp_path / "grown.zarr", "--model", f"a={models['c']}", "--append", "--no-progress")
    assert other.exit_code == 1 and "other model files" in other.stderr


def test_dry_run_writes_nothing_and_usage_errors(tmp_path, inputs, models, invoke):
    dry = invoke("predict", inputs, tmp_path / "s.zarr", *_model_args(models), "--dry-run", "--tile", 64, "--overlap", 4)
    assert dry.exit_code == 0 and "predict 3 images with 3 model(s)" in dry.stdout and "64 px, overlap 4" in dry.stdout
    assert not (tmp_path / "s.zarr").exists()
    for bad in (
        ["--model", "nameonly"],
        ["--model", f"a={models['a']}", "--model", f"a={models['c']}"],
        ["--model", f"a={models['a']}", "--tile", 8, "--overlap", 4],
        ["--model", f"a={models['a']}", "--range", "0-2"],
    ):
        assert invoke("predict", inputs, tmp_path / "s.zarr", *bad).exit_code == 2, bad
    missing = invoke("predict", tmp_path / "nowhere", tmp_path / "s.zarr", "--model", f"a={models['a']}")
    assert missing.exit_code == 1 and "nowhere" in missing.stderr


@pytest.mark.slow
def test_killed_predict_resumes_to_the_same_bytes(tmp_path, inputs, models):
    command = ["predict", str(inputs), "s.zarr", "--model", f"a={models['a']}", "--chunk-pixels", "300", "--no-progress"]
    hook = Path(__file__).with_name("kill_after_writes.py")
    count = tmp_path / "writes.count"
    env = {**os.environ, "ENSIR_FLOW_SCHEDULER": "threads"}
    subprocess.run([sys.executable, hook, "0", count, "--", *command], cwd=tmp_path, env=env, check=True)
    writes = int(count.read_text())
    os.rename(tmp_path / "s.zarr", tmp_path / "clean.zarr")
    for kill_at in (writes * 3 // 4, writes * 4 // 5, writes * 2 // 3):  # a point where some chunks, not all, are written
        killed = subprocess.run([sys.executable, hook, str(kill_at), count, "--", *command], cwd=tmp_path, env=env)
        assert killed.returncode == 137 and not (tmp_path / "s.zarr").exists()
        marks = zarr.open_array(store=resumable_location(str(tmp_path / "s.zarr")), path="chunk_complete", mode="r")[:]
        if 0 < marks.sum() < len(marks):
            break
    assert 0 < marks.sum() < len(marks), (writes, marks)
    resumed = subprocess.run(
        [sys.executable, "-m", "ensir_flow.cli", *command], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0 and "resumed s.zarr" in resumed.stdout, resumed.stderr
    xr.testing.assert_identical(contents(tmp_path / "s.zarr"), contents(tmp_path / "clean.zarr"))


def test_grayscale_inputs_run_as_one_channel(tmp_path, invoke):
    root = tmp_path / "gray"
    make_corpus(root, n_models=1, inputs_scale=1, channels=1)
    shutil.rmtree(root / "model0")
    identity = save_export(torch.nn.Identity(), tmp_path / "identity.pt2", channels=1)
    for value_range in ("0-1", "0-255"):
        store = tmp_path / f"{value_range}.zarr"
        result = invoke("predict", root, store, "--model", f"same={identity}", "--range", value_range, "--no-progress")
        assert result.exit_code == 0, result.output
        ds = xr.open_zarr(store)
        assert ds.sizes["channel"] == 1
        np.testing.assert_array_equal(ds["prediction"].values[0], ds["input"].values)  # 0..1 and back, exactly


def test_models_beyond_the_memory_budget_are_dropped_least_recently_used_first(tmp_path, monkeypatch):
    from ensir_flow import models as model_files

    x, y = (model_file(name, save_export(ConvNet(seed), tmp_path / f"{name}.pt2")) for name, seed in (("x", 7), ("y", 8)))
    size = sum(p.numel() * p.element_size() for p in ConvNet(7).parameters())
    monkeypatch.setattr(model_files, "_memory_budget", lambda device: size)  # room for one model
    before = models_loaded()
    for model in (x, x, y, y, x):
        model_files.loaded_model(model, "cpu")
    assert models_loaded() - before == 3  # x, then y in its place, then x again
    monkeypatch.setattr(model_files, "_memory_budget", lambda device: 2 * size)
    for model in (y, x, y, x):
        model_files.loaded_model(model, "cpu")
    assert models_loaded() - before == 4  # y loaded once more, then both kept


@pytest.mark.slow
def test_a_cluster_of_processes_gives_the_bytes_of_threads(tmp_path, inputs, models, invoke):
    noisy = save_export(Noisy(), tmp_path / "noisy.pt2")
    args = ["--model", f"a={models['b']}", "--model", f"n={noisy}", "--samples", 2, "--chunk-pixels", 400, "--no-progress"]
    assert invoke("predict", inputs, tmp_path / "threads.zarr", *args, "--scheduler", "threads").exit_code == 0
    result = invoke("predict", inputs, tmp_path / "local.zarr", *args, "--scheduler", "local", "--json")
    assert result.exit_code == 0, result.output
    assert (
        xr.open_zarr(tmp_path / "local.zarr")["prediction"].values.tobytes()
        == xr.open_zarr(tmp_path / "threads.zarr")["prediction"].values.tobytes()
    )
