"""Hostile inputs: crafted stems, export folders holding foreign files, broken LUTs, tiny images.

Each is refused with one line naming the file or store and the problem (exit 1), and nothing is
written where it should not be; or, for SSIM on images smaller than its window, scored as BasicSR
scores them (NaN) without a traceback.
"""

import json
import math
import os
import warnings

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import xarray as xr
import zarr

from ensir_flow import lut as lut_module
from ensir_flow import metrics
from ensir_flow.errors import InputError
from ensir_flow.images import check_stem, png_text
from ensir_flow.lut import SUM_TOLERANCE, Lut, check_weights, read_paper_lut
from ensir_flow.pipelines.executor import threaded_compute
from ensir_flow.pipelines.export import check_export_target, export
from helpers import REFERENCE, make_corpus, one_line_refusal

PAPER_LUT = REFERENCE / "luts" / "weight_GoPro_MPRNet_Restormer_DGUNet_b32_rgb.pth"
PAPER_MODELS = ["MPRNet", "Restormer", "DGUNet"]


def _tree(root) -> dict:
    """Every path under `root` with its bytes (None for folders): what a refused run must not change."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def _ingest(invoke, root, store):
    result = invoke("ingest", root, store, "--no-progress")
    assert result.exit_code == 0, result.output


def _set_stems(store, stems: dict) -> None:
    """Craft a store: overwrite stems of the `image` coordinate ({position: stem}) as anyone could."""
    image = zarr.open_group(str(store), mode="r+")["image"]
    for position, stem in stems.items():
        image[position] = stem
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(str(store))


# --- stems -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stem",
    [
        "",
        ".",
        "..",
        "../x",
        "../../../x/ESCAPED",
        "..x",
        "a/b",
        "a\\b",
        "/etc/passwd",
        "C:x",
        "C:\\x",
        "a\x00b",
        "line\nbreak",
        "tab\there",
        "esc\x1b[31m",
        "del\x7f",
    ],
)
def test_unsafe_stems_are_refused(stem):
    with pytest.raises(InputError) as refused:
        check_stem(stem, "s.zarr")
    message = str(refused.value)
    assert message.startswith("s.zarr: image name ") and "\n" not in message, message


@pytest.mark.parametrize("stem", ["img0", "GOPR0372_07_00-000051", "a.b", ".hidden", "with space", "ünïcode", "x..y", "frame:12"])
def test_plain_stems_pass(stem):
    assert check_stem(stem, "s.zarr") == stem


@pytest.mark.parametrize("name", ["...png", "..sneaky.png", "line\nbreak.png", "esc\x1b[2Jape.png"])
def test_ingest_refuses_a_file_name_that_cannot_be_a_stem(tmp_path, invoke, corpus, name):
    root, models = corpus
    for folder in ["gt", *models]:
        os.rename(root / folder / "img1.png", root / folder / name)
    result = invoke("ingest", root, tmp_path / "s.zarr", "--no-progress")
    message = one_line_refusal(result, "image name", str(root / models[0]))
    assert repr(name[:-4]) in message
    assert not (tmp_path / "s.zarr").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


# --- export: crafted stems, foreign files, folders that cannot be made ----------------------------


@pytest.fixture
def fitted(tmp_path, invoke, corpus):
    """A store, its LUT and an apply output (no export yet)."""
    root, _ = corpus
    _ingest(invoke, root, tmp_path / "s.zarr")
    for args in (
        ["fit", tmp_path / "s.zarr", tmp_path / "lut.zarr"],
        ["apply", tmp_path / "s.zarr", tmp_path / "lut.zarr", tmp_path / "out.zarr"],
    ):
        result = invoke(*args, "--no-progress")
        assert result.exit_code == 0, result.output
    return tmp_path


def test_crafted_stem_never_escapes_the_export_folder_direct(fitted):
    _set_stems(fitted / "out.zarr", {1: "../../escaped"})
    target = fitted / "deep" / "a" / "png"
    before = _tree(fitted)
    for overwrite in (False, True):
        with pytest.raises(InputError, match=r"out\.zarr: image name '\.\./\.\./escaped' contains a path separator"):
            check_export_target(target, ["img0", "../../escaped"], overwrite, source=fitted / "out.zarr")
        with pytest.raises(InputError, match=r"'\.\./\.\./escaped'"):
            export(str(fitted / "out.zarr"), str(target), threaded_compute, overwrite)
    assert _tree(fitted) == before
    assert not list(fitted.rglob("*escaped*"))


def test_crafted_stem_refused_by_apply_export(tmp_path, invoke, corpus):
    root, _ = corpus
    _ingest(invoke, root, tmp_path / "s.zarr")
    assert invoke("fit", tmp_path / "s.zarr", tmp_path / "lut.zarr", "--no-progress").exit_code == 0
    _set_stems(tmp_path / "s.zarr", {0: "../../../x/ESCAPED", 2: "..\\..\\WIN"})
    target = tmp_path / "deep" / "a" / "png"
    result = invoke(
        "apply", tmp_path / "s.zarr", tmp_path / "lut.zarr", tmp_path / "out.zarr", "--export-dir", target, "--no-progress"
    )
    one_line_refusal(result, "ESCAPED")
    assert not target.exists()
    assert not [
        p for p in tmp_path.rglob("*") if "ESCAPED" in p.name or "WIN" in p.name or p.suffix == ".png" and "corpus" not in p.parts
    ]
    assert not (tmp_path.parent / "x").exists()


def test_duplicate_stems_refused(fitted):
    _set_stems(fitted / "out.zarr", {2: "img0"})
    with pytest.raises(InputError, match="'img0' is used by two images"):
        export(str(fitted / "out.zarr"), str(fitted / "png"), threaded_compute)
    assert not (fitted / "png").exists()


def test_overwrite_never_deletes_foreign_files(fitted, invoke):
    png = fitted / "png"
    apply = ["apply", fitted / "s.zarr", fitted / "lut.zarr", fitted / "out2.zarr", "--export-dir", png, "--no-progress"]
    assert invoke(*apply).exit_code == 0
    assert sorted(p.name for p in png.iterdir()) == ["img0.png", "img1.png", "img2.png"]
    mark = png_text((png / "img0.png").read_bytes())
    assert (
        mark["Software"].startswith("ensir-flow ")
        and mark["Variable"] == "ensemble"
        and mark["Source"] == str(fitted / "out2.zarr")
    )
    for foreign, make in (
        ("notes.txt", lambda p: p.write_text("mine")),
        ("holiday.png", lambda p: iio.imwrite(p, np.zeros((4, 4, 3), np.uint8))),  # a PNG ensir-flow did not write
        ("sub/", lambda p: (p.mkdir(), (p / "keep.txt").write_text("mine"))),
    ):
        path = png / foreign.rstrip("/")
        make(path)
        before = _tree(fitted)
        result = invoke(
            *apply[:3], fitted / f"out-{len(before)}.zarr", *apply[4:], "--overwrite"
        )  # a new output: the export runs
        one_line_refusal(result, str(png), repr(foreign), "did not write")
        with pytest.raises(InputError, match=f"holds {foreign!r}"):
            check_export_target(png, ["img0", "img1", "img2"], True)
        with pytest.raises(InputError, match=f"holds {foreign!r}"):
            export(str(fitted / "out.zarr"), str(png), threaded_compute, overwrite=True)
        assert _tree(png.parent / "png") == {k[len("png/") :]: v for k, v in before.items() if k.startswith("png/")}
        assert path.exists()
        os.remove(path) if path.is_file() else (os.remove(path / "keep.txt"), path.rmdir())


def test_overwrite_replaces_a_folder_of_our_own_files(fitted):
    png, store = fitted / "png", str(fitted / "out.zarr")
    export(store, str(png), threaded_compute)
    with pytest.raises(InputError, match="already exists"):
        export(store, str(png), threaded_compute)
    with pytest.raises(InputError, match="already exists"):
        check_export_target(png, ["img0", "img1", "img2"], False)
    os.rename(png / "img0.png", png / "from-another-store.png")  # marked: an export wrote it
    (png / "img2.png").write_bytes(b"not even a PNG, but named as this store's image")  # its name makes it no export's
    with pytest.raises(InputError, match="holds 'img2.png', which ensir-flow's export did not write"):
        check_export_target(png, ["img0", "img1", "img2"], True)
    (png / "img2.png").unlink()
    check_export_target(png, ["img0", "img1", "img2"], True)
    export(store, str(png), threaded_compute, overwrite=True)
    assert sorted(p.name for p in png.iterdir()) == ["img0.png", "img1.png", "img2.png"]
    ds = xr.open_zarr(store)
    for stem, h, w, offset in zip(
        ds["image"].values, ds["height"].values, ds["width"].values, np.cumsum([0, *ds["pixel_count"].values[:-1]])
    ):
        np.testing.assert_array_equal(
            iio.imread(png / f"{stem}.png"), ds["ensemble"].values[offset : offset + h * w].reshape(h, w, 3)
        )
    assert not [p for p in fitted.iterdir() if p.name.startswith(".png.")]  # no staging, retired copy or lock left


def test_export_folder_that_cannot_be_created_is_refused_up_front(fitted, invoke):
    blocker = fitted / "file.txt"
    blocker.write_text("a regular file")
    for target in (blocker / "png", blocker / "a" / "b" / "png"):
        with pytest.raises(InputError, match=f"cannot be created: {blocker} is a file"):
            check_export_target(target, ["img0"], False)
        with pytest.raises(InputError, match=f"cannot be created: {blocker} is a file"):
            export(str(fitted / "out.zarr"), str(target), threaded_compute)
    for overwrite in (False, True):  # the folder named is itself a file: never replaced
        with pytest.raises(InputError, match="is a file, not a folder"):
            check_export_target(blocker, ["img0"], overwrite)
    before = _tree(fitted)
    result = invoke(
        "apply", fitted / "s.zarr", fitted / "lut.zarr", fitted / "out.zarr", "--export-dir", blocker / "png", "--no-progress"
    )
    one_line_refusal(result, str(blocker))
    assert blocker.read_text() == "a regular file"
    assert {k: v for k, v in _tree(fitted).items() if not k.startswith("out.zarr")} == {
        k: v for k, v in before.items() if not k.startswith("out.zarr")
    }


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a user that file permissions apply to")
def test_export_folder_in_a_read_only_parent_is_refused(fitted):
    parent = fitted / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(InputError, match="no permission to write"):
            check_export_target(parent / "png", ["img0"], False)
    finally:
        parent.chmod(0o755)


def test_export_folder_without_write_permission_is_refused_up_front(fitted, monkeypatch):
    """The same refusal as above, for users (root among them) whom file permissions do not stop."""
    import ensir_flow.pipelines.export as export_module

    denied = str(fitted / "ro")
    (fitted / "ro").mkdir()
    monkeypatch.setattr(export_module.os, "access", lambda path, mode: str(path) != denied)
    with pytest.raises(InputError, match=f"no permission to write in {denied}"):
        check_export_target(fitted / "ro" / "new" / "png", ["img0"], False)
    with pytest.raises(InputError, match="no permission to write"):
        export(str(fitted / "out.zarr"), denied + "/png", threaded_compute)
    assert list((fitted / "ro").iterdir()) == []


def test_export_checks_work_through_fsspec(fitted):
    import fsspec

    fs = fsspec.filesystem("memory")
    base = "memory://ensir-hostile"
    try:
        export(str(fitted / "out.zarr"), f"{base}/png", threaded_compute)
        assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("/ensir-hostile/png", detail=False)) == [
            "img0.png",
            "img1.png",
            "img2.png",
        ]
        export(str(fitted / "out.zarr"), f"{base}/png", threaded_compute, overwrite=True)
        fs.pipe("/ensir-hostile/png/notes.txt", b"mine")
        with pytest.raises(InputError, match="holds 'notes.txt'"):
            export(str(fitted / "out.zarr"), f"{base}/png", threaded_compute, overwrite=True)
        assert fs.cat("/ensir-hostile/png/notes.txt") == b"mine"
        fs.pipe("/ensir-hostile/blocker", b"file")
        with pytest.raises(InputError, match="memory://ensir-hostile/blocker is a file"):
            check_export_target(f"{base}/blocker/png", ["img0"], False)
    finally:
        fs.rm("/ensir-hostile", recursive=True)


# --- LUTs ----------------------------------------------------------------------------------------


def _damage_lut(path, bin_, channel, values):
    weights = zarr.open_group(str(path), mode="r+")["weights"]
    weights[bin_, channel] = values


@pytest.mark.parametrize(
    "values, problem",
    [
        ([np.nan, 0.5, 0.5], "not finite"),
        ([np.inf, 0.0, 0.0], "not finite"),
        ([-0.2, 0.6, 0.6], "negative weight"),
        ([0.5, 0.5, 0.5], "summing to 1.5"),
    ],
)
def test_apply_refuses_a_broken_lut(tmp_path, invoke, corpus, values, problem):
    root, _ = corpus
    _ingest(invoke, root, tmp_path / "s.zarr")
    assert invoke("fit", tmp_path / "s.zarr", tmp_path / "lut.zarr", "--no-progress").exit_code == 0
    _damage_lut(tmp_path / "lut.zarr", 5, 1, values)  # the 6th bin stored (a LUT stores the bins with data only)
    stored = zarr.open_group(str(tmp_path / "lut.zarr"), mode="r")
    flat, edges = int(stored["bin"][5]), tuple(int(d) * 32 for d in stored["bin_digits"][5])
    result = invoke(
        "apply",
        tmp_path / "s.zarr",
        tmp_path / "lut.zarr",
        tmp_path / "out.zarr",
        "--export-dir",
        tmp_path / "png",
        "--no-progress",
    )
    one_line_refusal(result, str(tmp_path / "lut.zarr"), f"bin {flat} (lower edges {edges}; stored row 5), channel 1", problem)
    assert not (tmp_path / "out.zarr").exists() and not (tmp_path / "png").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_apply_names_the_lut_whose_chunk_is_corrupt(tmp_path, invoke, corpus):
    """A LUT is read whole before anything is written: a chunk its codec cannot decode is the LUT's
    fault, named so (not the output's, as when it was read through dask inside the run)."""
    root, _ = corpus
    _ingest(invoke, root, tmp_path / "s.zarr")
    assert invoke("fit", tmp_path / "s.zarr", tmp_path / "lut.zarr", "--no-progress").exit_code == 0
    (chunk,) = [path for path in (tmp_path / "lut.zarr" / "weights").rglob("*") if path.is_file() and path.name != "zarr.json"]
    chunk.write_bytes(b"not zstd")
    result = invoke("apply", tmp_path / "s.zarr", tmp_path / "lut.zarr", tmp_path / "out.zarr", "--no-progress")
    one_line_refusal(result, str(tmp_path / "lut.zarr"), "not a readable Zarr store", "decompression")
    assert not (tmp_path / "out.zarr").exists()


def test_lut_weights_within_tolerance_pass_and_beyond_are_refused():
    weights = np.full((8, 2, 3), 1 / 3, np.float32)
    check_weights(weights, 128)
    weights[3, 1] = [0.2, 0.3, 0.5 + 0.9 * SUM_TOLERANCE]
    check_weights(weights, 128)
    weights[3, 1, 2] += 0.2 * SUM_TOLERANCE
    with pytest.raises(InputError, match=r"lut.zarr: bin 3 \(lower edges \(0, 128, 128\)\), channel 1 has weights summing to"):
        check_weights(weights, 128, "lut.zarr")
    ds = Lut(["a", "b", "c"], 128, weights, np.zeros((8, 2)), np.zeros((8, 2), np.int8)).to_dataset()
    with pytest.raises(InputError, match="mine.zarr: bin 3"):
        Lut.from_dataset(ds, source="mine.zarr")


@pytest.mark.parametrize("name", ["weights", "fallback_weights"])
@pytest.mark.parametrize("values", [lambda w: w > 0.3, lambda w: w.astype(str), lambda w: (w * 100).astype(np.int64)])
def test_lut_weights_that_are_not_numbers_of_a_float_type_are_refused_in_one_line(name, values):
    weights = np.full((2, 2, 3), 1 / 3, np.float32)
    ds = Lut(
        ["a", "b", "c"],
        128,
        weights,
        np.zeros((2, 2)),
        np.zeros((2, 2), np.int8),
        bin_digits=np.array([[0, 0, 0], [1, 1, 1]]),
        fallback=weights[0],
    ).to_dataset()
    ds[name] = ds[name].copy(data=values(ds[name].values))
    with pytest.raises(InputError, match=rf"^theirs.zarr: {name} are of type .*, not floating point; not a usable LUT$"):
        Lut.from_dataset(ds, source="theirs.zarr")


def test_lut_weights_are_checked_block_by_block_and_the_first_bad_cell_named(monkeypatch):
    monkeypatch.setattr(lut_module, "CHECK_BLOCK_BINS", 3)
    weights = np.full((8, 2, 3), 1 / 3, np.float32)
    weights[7, 0, 1], weights[4, 1, 0], weights[5, 0, 2] = np.nan, -0.1, 0.9
    with pytest.raises(
        InputError,
        match=r"lut.zarr: bin 4 \(lower edges \(128, 0, 0\)\), channel 1 has a negative weight .*"
        r"3 bad cell\(s\) in all",
    ):
        check_weights(weights, 128, "lut.zarr")


def _paper_table(edges_per_model, channels=3, weights=(0.2, 0.3, 0.5)):
    import itertools

    return {key: [torch.tensor(weights)] * channels for key in itertools.product(*edges_per_model)}


def test_paper_lut_import_refuses_incomplete_or_misfitting_tables(tmp_path):
    path = tmp_path / "w.pth"
    models = ["a", "b", "c"]
    torch.save(_paper_table([(0, 128)] * 3), path)
    assert read_paper_lut(path, models, 128).weights.shape == (8, 3, 3)
    with pytest.raises(InputError, match=r"holds 8 bins, but 3 models at bin width 64 make 4\^3 = 64"):
        read_paper_lut(path, models, 64)
    table = _paper_table([(0, 128)] * 3)
    del table[(0, 0, 128)]
    torch.save(table, path)
    with pytest.raises(InputError, match="holds 7 bins"):
        read_paper_lut(path, models, 128)
    torch.save(_paper_table([(0, 100)] * 3), path)
    with pytest.raises(InputError, match=r"key \(0, 0, 100\) is not a tuple of bin lower edges at bin width 128"):
        read_paper_lut(path, models, 128)
    torch.save(_paper_table([(0, 256)] * 3), path)
    with pytest.raises(InputError, match="multiples of 128 in 0..255"):
        read_paper_lut(path, models, 128)
    torch.save(_paper_table([(0, 128)] * 3, weights=(0.2, float("nan"), 0.8)), path)
    with pytest.raises(InputError, match=r"w.pth: bin 0 \(lower edges \(0, 0, 0\)\), channel 0 has a weight that is not finite"):
        read_paper_lut(path, models, 128)
    torch.save(_paper_table([(0, 128)] * 3, weights=(0.2, 0.3, 0.6)), path)
    with pytest.raises(InputError, match="summing to 1.1"):
        read_paper_lut(path, models, 128)


@pytest.mark.skipif(not REFERENCE.is_dir(), reason=f"reference data not found at {REFERENCE} (../shared is absent)")
def test_published_lut_imports_at_its_own_bin_width_only(tmp_path, invoke):
    lut = read_paper_lut(PAPER_LUT, PAPER_MODELS, 32)
    sums = lut.weights.astype(np.float64).sum(axis=2)
    assert np.abs(sums - 1).max() < SUM_TOLERANCE / 1000  # far inside the tolerance
    models = ",".join(PAPER_MODELS)
    ok = invoke("lut", "import", PAPER_LUT, tmp_path / "b32.zarr", "--models", models, "--bin-width", 32)
    assert ok.exit_code == 0, ok.output
    for width in (16, 64):
        result = invoke("lut", "import", PAPER_LUT, tmp_path / f"b{width}.zarr", "--models", models, "--bin-width", width)
        one_line_refusal(result, PAPER_LUT.name, "holds 512 bins", f"bin width {width}")
        assert not (tmp_path / f"b{width}.zarr").exists()


# --- SSIM on images smaller than its window --------------------------------------------------------


def test_ssim_of_an_image_smaller_than_the_window_is_nan_as_in_basicsr():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (11, 30, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    from test_metrics import _ssim_oracle

    assert metrics.ssim(a, b) == pytest.approx(_ssim_oracle(a, b), abs=1e-9)  # the smallest scorable size
    for x, y, options in (
        (a[:10], b[:10], {}),
        (a[:, :10], b[:, :10], {}),
        (a, b, {"crop_border": 1}),
        (a[:1, :1], b[:1, :1], {}),
        (a[:5, :, 0], b[:5, :, 0], {"y_channel": True}),
    ):
        assert math.isnan(metrics.ssim(x, y, **options))
        assert math.isfinite(metrics.psnr(x, y, **options))


def test_evaluate_an_image_smaller_than_the_ssim_window(tmp_path, invoke):
    root = tmp_path / "corpus"
    make_corpus(root, sizes=((24, 32), (8, 29), (40, 21)))
    _ingest(invoke, root, tmp_path / "s.zarr")
    result = invoke("evaluate", tmp_path / "s.zarr", "--json", "--no-progress")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    small = next(entry for entry in scores["per_image"] if entry["image"] == "img1")
    assert all(value is None or math.isnan(value) for value in small["ssim"].values())  # NaN (or null): no SSIM
    assert all(math.isfinite(value) for value in small["psnr"].values())
    others = [entry for entry in scores["per_image"] if entry["image"] != "img1"]
    assert all(0 < value <= 1 for entry in others for value in entry["ssim"].values())
    assert all(math.isfinite(value) for value in scores["psnr"].values())
    table = invoke("evaluate", tmp_path / "s.zarr", "--no-progress")
    assert table.exit_code == 0 and "Traceback" not in table.output and "model0" in table.stdout


@pytest.mark.parametrize("name", ["average", "lsq"])
def test_evaluate_refuses_a_store_whose_model_is_named_as_a_combination(tmp_path, invoke, corpus, name):
    # ingest refuses such folders now; a store written before, or by someone else, can still hold one
    root, models = corpus
    store = tmp_path / "s.zarr"
    _ingest(invoke, root, store)
    group = zarr.open_group(str(store), mode="r+")
    group.attrs["models"] = [name, *models[1:]]
    group["model"][0] = name
    group["source"][0] = name  # the model folders it was ingested from, as such a store records them
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(str(store))
    for args in (["evaluate", store], ["evaluate", store, "--cv", "2", "--solvers", "em"]):
        result = invoke(*args, "--no-progress")
        assert result.exit_code == 1, result.output
        assert f"a model named '{name}'" in one_line_refusal(result, str(store))
