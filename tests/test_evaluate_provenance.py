"""evaluate --ensemble scores only an apply output made from the store as it is now."""

import json
import shutil

import pytest
import zarr

from ensir_flow.pipelines.apply import store_fingerprint as apply_fingerprint
from ensir_flow.pipelines.fingerprint import store_fingerprint
from ensir_flow.pipelines.stores import open_store, open_store_index
from helpers import make_corpus

SIZES = ((24, 32), (17, 29), (40, 21))


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


def _refusal(result) -> str:
    """The one line of a refusal (exit 1, no traceback: `invoke` lets exceptions through)."""
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def _store_and_output(invoke, tmp_path, name: str, seed: int):
    """A store of a corpus of SIZES and its apply output."""
    make_corpus(tmp_path / name, sizes=SIZES, seed=seed)
    store, lut, out = (tmp_path / f"{name}{suffix}.zarr" for suffix in ("", "-lut", "-out"))
    _ok(invoke("ingest", tmp_path / name, store, "--no-progress"))
    _ok(invoke("fit", store, lut, "--no-progress"))
    _ok(invoke("apply", store, lut, out, "--no-progress"))
    return store, lut, out


def _set_attributes(path, **values):
    """Change a store's attributes where readers see them (its consolidated metadata too); None deletes."""
    group = zarr.open_group(str(path), mode="r+")
    attrs = dict(group.attrs)
    for key, value in values.items():
        if value is None:
            attrs.pop(key, None)
        else:
            attrs[key] = value
    group.attrs.clear()
    group.attrs.update(attrs)
    zarr.consolidate_metadata(str(path))


def test_an_output_of_another_store_with_the_same_images_is_refused(tmp_path, invoke):
    store, _, _ = _store_and_output(invoke, tmp_path, "a", seed=0)
    other, _, other_out = _store_and_output(invoke, tmp_path, "b", seed=7)  # same stems and sizes, other pixels
    line = _refusal(invoke("evaluate", store, "--ensemble", other_out, "--no-progress"))
    assert line.startswith(f"Error: {other_out}: made from {other}") and f"not from {store}" in line  # by store_id or fingerprint
    _set_attributes(other_out, source_store_id=None)  # as apply wrote outputs before stores had an id: the fingerprint decides
    line = _refusal(invoke("evaluate", store, "--ensemble", other_out, "--no-progress"))
    assert f"{other_out}: made from {other}, not from {store} (their models, images, chunking or source files differ)" in line
    scores = json.loads(_ok(invoke("evaluate", other, "--ensemble", other_out, "--json", "--no-progress")).stdout)
    assert scores["psnr"]["ensemble"] > 30


def test_an_output_made_before_the_store_grew_is_refused_until_apply_adds_the_new_images(tmp_path, invoke):
    full = tmp_path / "full"
    models = make_corpus(full, sizes=(*SIZES, (30, 30)))
    first = tmp_path / "first"
    for folder in ("gt", *models):
        (first / folder).mkdir(parents=True)
        for stem in ("img0", "img1"):
            shutil.copy(full / folder / f"{stem}.png", first / folder / f"{stem}.png")
    store, lut, out = tmp_path / "s.zarr", tmp_path / "lut.zarr", tmp_path / "out.zarr"
    _ok(invoke("ingest", first, store, "--no-progress"))
    _ok(invoke("fit", store, lut, "--no-progress"))
    _ok(invoke("apply", store, lut, out, "--no-progress"))
    _ok(invoke("ingest", full, store, "--append", "--no-progress"))
    line = _refusal(invoke("evaluate", store, "--ensemble", out, "--no-progress"))
    assert f"{out}: made from the first 2 images of {store}, which has 4 since it grew: run apply again" in line
    _ok(invoke("apply", store, lut, out, "--no-progress"))
    scores = json.loads(_ok(invoke("evaluate", store, "--ensemble", out, "--json", "--no-progress")).stdout)
    assert scores["images"] == 4


def test_an_output_that_records_no_source_or_another_store_id_is_refused(tmp_path, invoke):
    store, _, out = _store_and_output(invoke, tmp_path, "a", seed=0)
    _set_attributes(store, store_id="store-one")
    _set_attributes(out, source_store_id="store-two")
    line = _refusal(invoke("evaluate", store, "--ensemble", out, "--no-progress"))
    assert f"(store_id store-two), not from {store} (store_id store-one)" in line
    _set_attributes(out, source_store_id=None)  # only the store has one: the fingerprint decides
    _ok(invoke("evaluate", store, "--ensemble", out, "--no-progress"))
    _set_attributes(out, source_fingerprint=None)
    line = _refusal(invoke("evaluate", store, "--ensemble", out, "--no-progress"))
    assert f"{out}: records no source store" in line and f"run apply on {store} again" in line


def test_the_fingerprint_read_with_zarr_is_the_one_apply_records(tmp_path, invoke):
    full = tmp_path / "full"
    make_corpus(full, sizes=SIZES)
    store = tmp_path / "s.zarr"
    _ok(invoke("ingest", full, store, "--chunk-pixels", 300, "--no-progress"))
    with_xarray, with_zarr = open_store(str(store)), open_store_index(str(store))
    for n_images in (None, 1, 2):
        assert (
            store_fingerprint(with_zarr, n_images)
            == store_fingerprint(with_xarray, n_images)
            == apply_fingerprint(with_xarray, n_images)
        )
    assert store_fingerprint(with_zarr, 2) != store_fingerprint(with_zarr)


@pytest.mark.parametrize(
    "option,message",
    [
        (("--cv", 2, "--bin-widths", 0), "bin width must be between 1 and 256, got 0"),
        (("--cv", 2, "--bin-widths", "16,300"), "bin width must be between 1 and 256, got 300"),
        (("--cv", 2, "--bin-widths", "32,32"), "names a bin width twice"),
    ],
)
def test_bad_bin_widths_are_one_line_usage_errors(tmp_path, invoke, corpus, option, message):
    root, _ = corpus
    _ok(invoke("ingest", root, tmp_path / "s.zarr", "--no-progress"))
    result = invoke("evaluate", tmp_path / "s.zarr", *option, "--no-progress")
    assert result.exit_code == 2 and message in result.stderr and "--bin-widths" in result.stderr, result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("extra", [(), ("--cv", 2)])
def test_a_crop_border_that_leaves_an_image_empty_names_the_smallest(tmp_path, invoke, corpus, extra):
    root, _ = corpus
    _ok(invoke("ingest", root, tmp_path / "s.zarr", "--no-progress"))
    line = _refusal(invoke("evaluate", tmp_path / "s.zarr", "--crop-border", 1000, *extra, "--no-progress"))
    assert line == (
        f"Error: {tmp_path / 's.zarr'}: --crop-border 1000 leaves no pixels of its smallest image 'img1' (17x29): at most 8"
    )
    assert _refusal(invoke("evaluate", tmp_path / "s.zarr", "--crop-border", 9, *extra, "--no-progress"))
    _ok(invoke("evaluate", tmp_path / "s.zarr", "--crop-border", 8, "--no-progress"))


def test_the_api_refuses_bad_crop_borders_and_bin_widths(tmp_path):
    import ensir_flow

    for crop_border in (-1, 2.5, True):
        with pytest.raises(ensir_flow.UsageError, match="not a number of pixels") as refused:
            ensir_flow.evaluate(tmp_path / "s.zarr", crop_border=crop_border)
        assert refused.value.option == "--crop-border"
    for widths in ([32.5], [], 0, "8,,16"):
        with pytest.raises(ensir_flow.UsageError) as refused:
            ensir_flow.evaluate(tmp_path / "s.zarr", cv=2, solvers="lsq", bin_widths=widths)
        assert refused.value.option == "--bin-widths"
