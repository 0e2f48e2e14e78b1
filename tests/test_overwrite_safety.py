"""What a command may write: `--overwrite` replaces only ensir-flow's own output of the same kind,
no command writes onto its inputs (or one output onto another), symbolic links are never targets,
and relative paths are resolved once, on the client.

Each refusal is one line naming the target (exit 1), and whatever stood there is left as it was.
"""

import errno
import json
import os
import shutil

import numpy as np
import pytest
import xarray as xr

import ensir_flow
from ensir_flow import api
from ensir_flow.errors import InputError
from ensir_flow.pipelines import evaluate as evaluate_pipeline
from ensir_flow.pipelines import export as export_pipeline
from ensir_flow.pipelines import report as report_pipeline
from ensir_flow.pipelines import targets
from ensir_flow.pipelines.commit import staged_output
from helpers import one_line_refusal


def _tree(root) -> dict:
    """Every file under `root` (or `root` itself) with its bytes: what must not change."""
    root = os.fspath(root)
    if os.path.isfile(root):
        return {"": open(root, "rb").read()}
    return {
        os.path.relpath(os.path.join(folder, name), root): open(os.path.join(folder, name), "rb").read()
        for folder, _, names in os.walk(root)
        for name in names
    }


@pytest.fixture
def fitted(tmp_path, invoke, corpus):
    """A store ingested from the corpus and its LUT."""
    root, _ = corpus
    for args in (["ingest", root, tmp_path / "s.zarr"], ["fit", tmp_path / "s.zarr", tmp_path / "lut.zarr"]):
        result = invoke(*args, "--no-progress")
        assert result.exit_code == 0, result.output
    return tmp_path


def test_ingest_never_writes_onto_its_source(tmp_path, invoke, corpus):
    root, _ = corpus
    before = _tree(root)
    one_line_refusal(
        invoke("ingest", root, root, "--overwrite", "--no-progress"), f"{root}: the store is the input source folder {root}"
    )
    one_line_refusal(invoke("ingest", root, root / "s.zarr", "--no-progress"), "lies inside the input source folder")
    one_line_refusal(invoke("ingest", root / "gt", tmp_path, "--overwrite", "--no-progress"), "contains the input source folder")
    assert _tree(root) == before


def test_outputs_never_overlap_inputs_or_each_other(fitted, invoke):
    store, lut = fitted / "s.zarr", fitted / "lut.zarr"
    before = {path: _tree(path) for path in (store, lut)}
    one_line_refusal(invoke("fit", store, store, "--overwrite", "--no-progress"), f"{store}: the LUT is the input store {store}")
    one_line_refusal(invoke("apply", store, lut, store, "--overwrite", "--no-progress"), "the output is the input store")
    one_line_refusal(invoke("apply", store, lut, lut, "--overwrite", "--no-progress"), "the output is the input LUT")
    one_line_refusal(
        invoke("apply", store, lut, fitted / "out.zarr", "--export-dir", fitted / "out.zarr" / "png", "--no-progress"),
        "the output contains the export folder",
    )
    one_line_refusal(
        invoke("apply", store, lut, fitted / "out.zarr", "--export-dir", store / "png", "--no-progress"),
        "the export folder lies inside the input store",
    )
    with pytest.raises(InputError, match="the export folder lies inside the input store"):
        ensir_flow.export(store, store / "png", progress=False)
    one_line_refusal(invoke("lut", "export", lut, lut, "--overwrite"), "the LUT file is the input LUT")
    assert {path: _tree(path) for path in (store, lut)} == before
    assert not (fitted / "out.zarr").exists()


def test_evaluate_never_writes_its_report_inside_its_inputs(fitted, invoke):
    store, lut, output = fitted / "s.zarr", fitted / "lut.zarr", fitted / "out.zarr"
    assert invoke("apply", store, lut, output, "--no-progress").exit_code == 0
    before = {path: _tree(path) for path in (store, lut, output)}
    one_line_refusal(
        invoke("evaluate", store, "--report", store / "rep", "--no-progress"),
        f"{store / 'rep'}: the report lies inside the input store {store}",
    )
    one_line_refusal(
        invoke("evaluate", store, "--ensemble", output, "--report", output / "rep", "--no-progress"),
        "the report lies inside the input ensemble",
    )
    one_line_refusal(
        invoke("evaluate", store, "--lut", lut, "--report", lut / "r", "--no-progress"), "the report lies inside the input LUT"
    )
    one_line_refusal(invoke("evaluate", store / "predictions", "--report", store, "--no-progress"), "the report contains")
    assert {path: _tree(path) for path in (store, lut, output)} == before


def test_inputs_are_compared_through_symbolic_links(fitted, invoke):
    store, lut = fitted / "s.zarr", fitted / "lut.zarr"
    os.symlink(fitted, fitted / "same")
    before = _tree(store)
    one_line_refusal(
        invoke("fit", fitted / "same" / "s.zarr", store, "--overwrite", "--no-progress"), "the LUT is the input store"
    )
    one_line_refusal(
        invoke("apply", store, lut, fitted / "same" / "lut.zarr", "--overwrite", "--no-progress"), "the output is the input LUT"
    )
    assert _tree(store) == before


def test_overwrite_refuses_what_ensir_flow_did_not_write(fitted, invoke, corpus):
    root, _ = corpus
    store, lut = fitted / "s.zarr", fitted / "lut.zarr"
    folder = fitted / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    plain = fitted / "plain.zarr"
    plain.write_text("a file")
    for args, fragments in [
        (
            ["fit", store, folder],
            [f"{folder}: is a folder that ensir-flow did not write (it holds 'notes.txt')", "not an ensir-flow LUT"],
        ),
        (["fit", store, plain], [f"{plain}: is a file that ensir-flow did not write"]),
        (
            ["apply", store, lut, fitted / "out.zarr", "--export-dir", root / "gt"],
            [f"{root / 'gt'}: is a folder that ensir-flow did not write"],
        ),
        (["ingest", root, folder], ["is a folder that ensir-flow did not write"]),
        (["lut", "export", lut, plain], ["is a file that ensir-flow did not write"]),
    ]:
        before = {path: _tree(path) for path in (folder, plain, root)}
        one_line_refusal(
            invoke(*args, "--overwrite", *(["--no-progress"] if args[0] != "lut" else [])), *fragments, "refusing to replace it"
        )
        assert {path: _tree(path) for path in (folder, plain, root)} == before


def test_overwrite_refuses_ensir_flow_output_of_another_kind(fitted, invoke, corpus):
    root, _ = corpus
    store, lut = fitted / "s.zarr", fitted / "lut.zarr"
    assert invoke("apply", store, lut, fitted / "out.zarr", "--no-progress").exit_code == 0
    before = {path: _tree(path) for path in (store, lut, fitted / "out.zarr")}
    one_line_refusal(
        invoke("ingest", root, lut, "--overwrite", "--no-progress"), f"{lut}: is an ensir-flow LUT, not an ensir-flow pixel store"
    )
    one_line_refusal(
        invoke("fit", store, fitted / "out.zarr", "--overwrite", "--no-progress"),
        "is an ensir-flow apply output, not an ensir-flow LUT",
    )
    shutil.copytree(store, fitted / "copy.zarr")
    one_line_refusal(
        invoke("apply", store, lut, fitted / "copy.zarr", "--overwrite", "--no-progress"),
        "is an ensir-flow pixel store (ingest, predict), not an ensir-flow apply output",
    )
    assert {path: _tree(path) for path in (store, lut, fitted / "out.zarr")} == before


def test_overwrite_replaces_ensir_flow_output_of_the_same_kind(fitted, invoke, corpus):
    root, _ = corpus
    store, lut = fitted / "s.zarr", fitted / "lut.zarr"
    assert invoke("fit", store, lut, "--solver", "average", "--overwrite", "--no-progress").exit_code == 0
    assert xr.open_zarr(lut).attrs["solver"] == "average"
    assert invoke("ingest", root, store, "--chunk-pixels", 700, "--overwrite", "--no-progress").exit_code == 0
    for name in ("l.json", "l.npz"):
        assert invoke("lut", "export", lut, fitted / name).exit_code == 0
        assert targets.kind_of(fitted / name) == targets.LUT_FILE
        assert invoke("lut", "export", lut, fitted / name, "--overwrite").exit_code == 0
    assert invoke("apply", store, lut, fitted / "out.zarr", "--export-dir", fitted / "png", "--no-progress").exit_code == 0
    assert targets.kind_of(fitted / "png") == targets.EXPORT_FOLDER
    assert targets.kind_of(fitted / "out.zarr") == targets.APPLY_OUTPUT
    assert ensir_flow.export(fitted / "out.zarr", fitted / "png", overwrite=True, progress=False).status == "written"


def test_a_symbolic_link_is_never_a_target(fitted, invoke):
    store, lut = fitted / "s.zarr", fitted / "lut.zarr"
    os.symlink(lut, fitted / "link.zarr")
    os.symlink(fitted / "nowhere.zarr", fitted / "dangling.zarr")
    before = _tree(lut)
    for target in ("link.zarr", "dangling.zarr"):
        for overwrite in ([], ["--overwrite"]):
            one_line_refusal(
                invoke("fit", store, fitted / target, *overwrite, "--no-progress"), f"{fitted / target}: is a symbolic link"
            )
            assert os.path.islink(fitted / target)
    assert _tree(lut) == before and not (fitted / "nowhere.zarr").exists()


def test_a_target_swapped_before_the_commit_is_not_deleted(fitted):
    lut = fitted / "lut.zarr"
    for kind in (targets.LUT, None):  # None: the kind of what was staged
        with pytest.raises(InputError, match="is a folder that ensir-flow did not write"):
            with staged_output(str(lut), overwrite=True, kind=kind) as staging:
                shutil.copytree(fitted / "s.zarr" if kind else lut, staging)
                if kind is None:
                    shutil.rmtree(lut)
                else:
                    shutil.move(lut, fitted / "kept.zarr")
                lut.mkdir()
                (lut / "notes.txt").write_text("mine")
        assert _tree(lut) == {"notes.txt": b"mine"}
        assert not [p.name for p in fitted.iterdir() if p.name.startswith(".lut.zarr")]  # staging and lock gone
        shutil.rmtree(lut)
        shutil.copytree(fitted / "kept.zarr", lut)


def test_demo_replaces_only_a_demo_folder(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "corpus").mkdir()
    (folder / "thesis.tex").write_text("mine")
    with pytest.raises(InputError, match="is a folder that ensir-flow did not write"):
        api.demo(folder, overwrite=True, dry_run=True)
    (folder / "thesis.tex").unlink()
    (folder / "models").mkdir()
    assert targets.kind_of(folder) is None  # a user's corpus/ and models/: the names alone are no demo's
    with pytest.raises(InputError, match="is a folder that ensir-flow did not write"):
        api.demo(folder, overwrite=True, dry_run=True)
    (folder / targets.DEMO_MARK).write_text(targets.demo_mark())  # what the demo writes first
    assert targets.kind_of(folder) == targets.DEMO_FOLDER
    assert api.demo(folder, overwrite=True, dry_run=True).status == "planned"


def test_a_folder_of_pngs_is_an_export_folder_only_if_every_png_was_exported(fitted, invoke):
    exported = fitted / "png"
    assert invoke("apply", fitted / "s.zarr", fitted / "lut.zarr", fitted / "o.zarr", "--export-dir", exported).exit_code == 0
    mixed = fitted / "mixed"
    shutil.copytree(fitted / "corpus" / "gt", mixed)  # a user's PNGs
    shutil.copy(next(exported.iterdir()), mixed / "copied.png")  # and one exported PNG
    before = _tree(mixed)
    assert targets.kind_of(exported) == targets.EXPORT_FOLDER and targets.kind_of(mixed) is None
    result = invoke("apply", fitted / "s.zarr", fitted / "lut.zarr", fitted / "o2.zarr", "--export-dir", mixed, "--overwrite")
    assert result.exit_code == 1 and "a folder that ensir-flow did not write" in result.stderr
    assert _tree(mixed) == before


def test_report_folders_are_recognised_by_their_page(tmp_path):
    report = tmp_path / "report"
    report.mkdir()
    (report / "gain.png").write_bytes(b"png")
    (report / "index.html").write_text("<html><footer>Made by ensir-flow 1.0 from s.zarr.</footer></html>")
    assert targets.kind_of(report) == targets.REPORT_FOLDER
    (report / "index.html").write_text("<html>my page</html>")
    assert targets.kind_of(report) is None


def test_lut_files_are_recognised_by_their_keys(tmp_path):
    keys = {key: 1 for key in targets.LUT_FILE_KEYS}
    (tmp_path / "ours.json").write_text(json.dumps(keys))
    (tmp_path / "theirs.json").write_text(json.dumps({"weights": []}))
    np.savez(tmp_path / "ours.npz", metadata=np.array(json.dumps(keys)))
    np.savez(tmp_path / "theirs.npz", weights=np.zeros(3))
    assert [targets.kind_of(tmp_path / name) for name in ("ours.json", "theirs.json", "ours.npz", "theirs.npz")] == [
        targets.LUT_FILE,
        None,
        targets.LUT_FILE,
        None,
    ]


def test_relative_paths_are_resolved_on_the_client(tmp_path, corpus, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ingested = ensir_flow.ingest("corpus", "s.zarr", progress=False)
    ensir_flow.fit("s.zarr", "lut.zarr", progress=False)
    applied = ensir_flow.apply("s.zarr", "lut.zarr", "out.zarr", progress=False)
    assert ingested.outputs == ["s.zarr"] and applied.outputs == ["out.zarr"]  # as the user wrote them
    assert xr.open_zarr(tmp_path / "s.zarr").attrs["source"] == str(tmp_path / "corpus")
    attrs = xr.open_zarr(tmp_path / "out.zarr").attrs
    assert (attrs["source"], attrs["lut"]) == (str(tmp_path / "s.zarr"), str(tmp_path / "lut.zarr"))
    assert xr.open_zarr(tmp_path / "lut.zarr").attrs["reference_store"] == str(tmp_path / "s.zarr")


def test_evaluate_resolves_relative_paths_on_the_client(tmp_path, corpus, monkeypatch):
    """Workers of a cluster resolve a relative path against their own working folder: evaluate
    plans, scores and reports on the paths made absolute here, once."""
    monkeypatch.chdir(tmp_path)
    ensir_flow.ingest("corpus", "s.zarr", progress=False)
    ensir_flow.fit("s.zarr", "lut.zarr", progress=False)
    ensir_flow.apply("s.zarr", "lut.zarr", "out.zarr", progress=False)
    seen = []
    for name in ("plan_evaluate", "plan_cross_validation"):
        planner = getattr(evaluate_pipeline, name)
        monkeypatch.setattr(evaluate_pipeline, name, lambda *args, planner=planner: seen.append(args[0]) or planner(*args))
    monkeypatch.setattr(report_pipeline, "write_report", lambda *args: seen.extend([args[0], *args[2:]]) or "index.html")

    scored = ensir_flow.evaluate("s.zarr", ensemble="out.zarr", report="rep", lut="lut.zarr", progress=False)
    assert scored.outputs == ["rep"]  # as the user wrote it
    ensir_flow.evaluate("s.zarr", cv=2, solvers="em", report="rep-cv", progress=False)
    store = str(tmp_path / "s.zarr")
    assert seen == [
        store,
        str(tmp_path / "rep"),
        store,
        str(tmp_path / "out.zarr"),
        str(tmp_path / "lut.zarr"),
        store,
        str(tmp_path / "rep-cv"),
        store,
        None,
        None,
    ]


def test_a_full_disk_under_the_export_folder_names_it(fitted, invoke, monkeypatch):
    def disk_full(*args, **kwargs):  # write() reports no file name
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(export_pipeline, "write_png", disk_full)
    result = invoke(
        "apply", fitted / "s.zarr", fitted / "lut.zarr", fitted / "out.zarr", "--export-dir", fitted / "png", "--no-progress"
    )
    message = one_line_refusal(result, f"{fitted / '.png.partial'}", "No space left on device", "free space")
    assert f"{fitted / 'out.zarr'}:" not in message
    assert not (fitted / "png").exists()
