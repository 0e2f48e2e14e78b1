"""Every chunk a reader uses is checked against the XXH3-64 checksum its writer recorded for that position,
and a store replaced or changed during a run is refused: no missing, damaged or swapped chunk and
no replaced store gives a result with exit 0."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

import ensir_flow
from ensir_flow.errors import InputError, TransientError
from ensir_flow.pipelines import resumable
from ensir_flow.pipelines.apply import plan_apply
from ensir_flow.pipelines.chunks import pixel_array, read_pixels
from ensir_flow.pipelines.evaluate import plan_cross_validation, plan_evaluate
from ensir_flow.pipelines.integrity import CHECKSUM_TAIL, CHUNK_CHECKSUMS
from helpers import contents, make_corpus, without_checksums

CHUNK = 500
SIZES = ((24, 32), (17, 29), (40, 21))


@pytest.fixture
def fitted(tmp_path, invoke) -> Path:
    make_corpus(tmp_path / "corpus", sizes=SIZES)
    for args in (
        ("ingest", tmp_path / "corpus", tmp_path / "s.zarr", "--chunk-pixels", CHUNK),
        ("fit", tmp_path / "s.zarr", tmp_path / "lut.zarr"),
        ("apply", tmp_path / "s.zarr", tmp_path / "lut.zarr", tmp_path / "out.zarr"),
    ):
        assert invoke(*args, "--no-progress").exit_code == 0
    return tmp_path


def chunk_file(store: Path, variable: str, index: int) -> Path:
    leading = "0/" if variable == "prediction" else ""
    return store / variable / "c" / f"{leading}{index}" / "0"


def damage(store: Path, variable: str, how: str) -> None:
    """Damage chunk 1 of `variable` as a disk, a copy or a hand would."""
    if how == "missing":
        chunk_file(store, variable, 1).unlink()
    elif how == "swapped":  # valid bytes of another position
        shutil.copy(chunk_file(store, variable, 0), chunk_file(store, variable, 1))
    elif how == "rewritten":  # a valid chunk with one value changed, written behind ensir-flow's back
        array = zarr.open_array(store=str(store), path=variable, mode="r+")
        where = (0,) * (array.ndim - 2) + (CHUNK + 3, 0)
        array[where] = (int(array[where]) + 1) % 256


def one_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.mark.parametrize("how", ["missing", "swapped", "rewritten"])
def test_a_damaged_prediction_chunk_is_refused_by_every_reader(fitted, invoke, how):
    damage(fitted / "s.zarr", "prediction", how)
    named = f"{fitted / 's.zarr'}/prediction: chunk 1 (pixels {CHUNK}:{2 * CHUNK}) is "
    for args, target in [
        (["fit", fitted / "s.zarr", fitted / "lut2.zarr"], "lut2.zarr"),
        (["apply", fitted / "s.zarr", fitted / "lut.zarr", fitted / "out2.zarr"], "out2.zarr"),
        (["evaluate", fitted / "s.zarr"], None),
    ]:
        result = invoke(*args, "--no-progress")
        assert result.exit_code == 1, (args, result.output)
        assert named in one_line(result), args
        assert ("missing" in one_line(result)) == (how == "missing")
        assert target is None or not (fitted / target).exists()


def test_a_chunk_moved_with_its_row_of_checksums_is_refused(fitted, invoke):
    store = fitted / "s.zarr"
    for variable in ("prediction", CHUNK_CHECKSUMS):  # chunks 0 and 1 exchanged, and their checksums with them
        first, second = (chunk_file(store, variable, i) for i in (0, 1))
        if variable == CHUNK_CHECKSUMS:
            first, second = (store / CHUNK_CHECKSUMS / "c" / str(i) / "0" for i in (0, 1))
        saved = first.read_bytes()
        shutil.copy(second, first)
        second.write_bytes(saved)
    result = invoke("apply", store, fitted / "lut.zarr", fitted / "out2.zarr", "--no-progress")
    assert result.exit_code == 1
    assert re.search(r"/prediction: chunk [01] \(pixels \d+:\d+\) is not the chunk written there", one_line(result))
    assert not (fitted / "out2.zarr").exists()


@pytest.mark.parametrize("how", ["missing", "swapped"])
def test_damaged_ground_truth_and_ensemble_chunks_are_refused(fitted, invoke, how):
    damage(fitted / "s.zarr", "ground_truth", how)
    result = invoke("fit", fitted / "s.zarr", fitted / "lut2.zarr", "--no-progress")
    assert result.exit_code == 1 and f"{fitted / 's.zarr'}/ground_truth: chunk 1 " in one_line(result)

    shutil.rmtree(fitted / "s.zarr")
    assert invoke("ingest", fitted / "corpus", fitted / "s.zarr", "--chunk-pixels", CHUNK, "--no-progress").exit_code == 0
    assert (
        invoke("apply", fitted / "s.zarr", fitted / "lut.zarr", fitted / "out.zarr", "--overwrite", "--no-progress").exit_code
        == 0
    )
    damage(fitted / "out.zarr", "ensemble", how)
    result = invoke("evaluate", fitted / "s.zarr", "--ensemble", fitted / "out.zarr", "--no-progress")
    assert result.exit_code == 1 and f"{fitted / 'out.zarr'}/ensemble: chunk 1 " in one_line(result)
    with pytest.raises(InputError, match="ensemble: chunk 1 "):
        ensir_flow.export(fitted / "out.zarr", fitted / "png", scheduler="threads", progress=False)
    assert not (fitted / "png").exists()


def test_an_interrupted_append_leaves_a_store_every_reader_trusts(tmp_path, invoke, monkeypatch):
    """An append rewrites the store's last, partial chunk and its checksums before its commit: killed
    there, the committed store still reads, every chunk checked, as before the append."""
    make_corpus(tmp_path / "all", sizes=(*SIZES, (31, 19), (22, 27)))
    first = tmp_path / "first"
    for folder in (tmp_path / "all").iterdir():
        (first / folder.name).mkdir(parents=True)
        for stem in ("img0", "img1", "img2"):
            shutil.copy(folder / f"{stem}.png", first / folder.name)
    store = tmp_path / "s.zarr"
    assert invoke("ingest", first, store, "--chunk-pixels", CHUNK, "--no-progress").exit_code == 0
    assert invoke("fit", store, tmp_path / "before.zarr", "--no-progress").exit_code == 0
    n_pixels = xr.open_zarr(store).sizes["pixel"]
    assert n_pixels % CHUNK  # the last chunk is partial: the append rewrites it

    def killed(path, attrs):
        raise KeyboardInterrupt

    monkeypatch.setattr(resumable, "commit_metadata", killed)
    with pytest.raises(KeyboardInterrupt):
        ensir_flow.ingest(tmp_path / "all", store, append=True, scheduler="threads", progress=False)
    monkeypatch.undo()
    last = n_pixels // CHUNK
    assert zarr.open_array(store=str(store), path="prediction").shape[1] > n_pixels  # grown, not committed
    assert (
        zarr.open_array(store=str(store), path=CHUNK_CHECKSUMS)[last].tolist()
        != json.loads((store / "zarr.json").read_text())["attributes"][CHECKSUM_TAIL]["xxh3"]
    )  # its row rewritten

    assert invoke("fit", store, tmp_path / "after.zarr", "--no-progress").exit_code == 0
    xr.testing.assert_identical(contents(tmp_path / "after.zarr"), contents(tmp_path / "before.zarr"))
    assert invoke("evaluate", store, "--no-progress").exit_code == 0

    assert invoke("ingest", tmp_path / "all", store, "--append", "--no-progress").exit_code == 0
    assert invoke("ingest", tmp_path / "all", tmp_path / "fresh.zarr", "--chunk-pixels", CHUNK, "--no-progress").exit_code == 0
    appended, fresh = contents(store), contents(tmp_path / "fresh.zarr")
    np.testing.assert_array_equal(appended[CHUNK_CHECKSUMS].values, fresh[CHUNK_CHECKSUMS].values)
    assert appended.attrs[CHECKSUM_TAIL] == fresh.attrs[CHECKSUM_TAIL]
    assert json.loads((store / "zarr.json").read_text())["attributes"]["generation"] == 2


@pytest.mark.parametrize("same_images", [True, False])
@pytest.mark.parametrize("command", ["apply", "evaluate", "cross-validation"])
def test_a_store_replaced_while_it_is_read_is_refused_with_nothing_written(fitted, invoke, same_images, command):
    plan = {
        "apply": lambda: plan_apply(str(fitted / "s.zarr"), str(fitted / "lut.zarr"), str(fitted / "out2.zarr")),
        "evaluate": lambda: plan_evaluate(str(fitted / "s.zarr")),
        "cross-validation": lambda: plan_cross_validation(str(fitted / "s.zarr"), 2),
    }[command]()
    if not same_images:
        make_corpus(fitted / "other", sizes=SIZES, seed=7)
    source = fitted / ("corpus" if same_images else "other")
    assert invoke("ingest", source, fitted / "s.zarr", "--chunk-pixels", CHUNK, "--overwrite", "--no-progress").exit_code == 0
    with pytest.raises(TransientError, match="s.zarr: .*(replaced|not the store this run planned on)"):
        plan.run()
    assert not (fitted / "out2.zarr").exists()


def test_a_worker_that_opens_another_store_at_the_planned_path_is_refused(fitted, invoke):
    """A path resolved to another store on a worker (another working folder, another machine's disk)."""
    source = pixel_array(str(fitted / "s.zarr"), "prediction")
    np.testing.assert_array_equal(
        read_pixels(source, 0, CHUNK), zarr.open_array(store=str(fitted / "s.zarr"), path="prediction")[:, :CHUNK]
    )
    make_corpus(fitted / "other", sizes=SIZES, seed=7)
    assert (
        invoke("ingest", fitted / "other", fitted / "s.zarr", "--chunk-pixels", CHUNK, "--overwrite", "--no-progress").exit_code
        == 0
    )
    with pytest.raises(TransientError, match="not the store this run planned on"):
        read_pixels(source, 0, CHUNK)
    shutil.rmtree(fitted / "s.zarr")
    with pytest.raises(TransientError, match="not found by this worker"):
        read_pixels(source, 0, CHUNK)


def unverified(store: Path) -> str:
    """The line a command that reads `store`, written without chunk checksums, says on stderr."""
    return (
        f"{store}: written without chunk checksums: its chunks are checked for presence only; write it again "
        "(the command that made it, with --overwrite) to have them verified"
    )


def test_a_store_without_checksums_still_reads_and_its_missing_chunks_are_named(fitted, invoke):
    assert "chunks_verified: by their XXH3-64 hashes" in invoke("info", fitted / "s.zarr").stdout
    without_checksums(fitted / "s.zarr")
    assert "chunks_verified: for presence only" in invoke("info", fitted / "s.zarr").stdout
    assert invoke("fit", fitted / "s.zarr", fitted / "lut2.zarr", "--no-progress").exit_code == 0
    xr.testing.assert_identical(contents(fitted / "lut2.zarr").drop_attrs(), contents(fitted / "lut.zarr").drop_attrs())
    assert invoke("apply", fitted / "s.zarr", fitted / "lut.zarr", fitted / "out2.zarr", "--no-progress").exit_code == 0
    assert (contents(fitted / "out2.zarr")["ensemble"] == contents(fitted / "out.zarr")["ensemble"]).all()

    damage(fitted / "s.zarr", "prediction", "missing")
    result = invoke("evaluate", fitted / "s.zarr", "--no-progress")
    notice, refusal = result.stderr.strip().splitlines()
    assert notice == unverified(fitted / "s.zarr")
    assert result.exit_code == 1 and f"prediction: chunk 1 (pixels {CHUNK}:{2 * CHUNK}) is missing" in refusal


def test_every_reader_says_which_of_its_stores_have_no_checksums(fitted, invoke, capsys):
    store, output = fitted / "s.zarr", fitted / "out.zarr"
    readers = {
        "fit": ("fit", store, fitted / "lut2.zarr", "--overwrite"),
        "apply": ("apply", store, fitted / "lut.zarr", fitted / "out2.zarr", "--overwrite"),
        "evaluate": ("evaluate", store, "--ensemble", output),
    }

    def export():
        ensir_flow.export(output, fitted / "png", overwrite=True, progress=False)
        return capsys.readouterr().err

    for args in readers.values():  # stores written with checksums: nothing said
        result = invoke(*args, "--no-progress")
        assert result.exit_code == 0 and result.stderr == "", result.stderr
    assert export() == ""
    without_checksums(store)
    without_checksums(output)
    for name, args in readers.items():
        result = invoke(*args, "--no-progress")
        read = [store, output] if name == "evaluate" else [store]
        assert result.exit_code == 0 and result.stderr.splitlines() == [unverified(path) for path in read], result.stderr
    assert export().splitlines() == [unverified(output)]
