"""Provenance (`info`), and LUT import from the paper's format and export to NPZ/JSON."""

import hashlib
import json
import zipfile

import numpy as np
import torch
import xarray as xr

from helpers import one_line_refusal


def _reference_run(tmp_path, invoke, corpus):
    root, models = corpus
    for args in (
        ["ingest", root, tmp_path / "s.zarr"],
        ["fit", tmp_path / "s.zarr", tmp_path / "lut.zarr"],
        ["apply", tmp_path / "s.zarr", tmp_path / "lut.zarr", tmp_path / "out.zarr"],
    ):
        assert invoke(*args, "--no-progress").exit_code == 0
    return root, models


def test_info_tells_what_made_each_output(tmp_path, invoke, corpus):
    root, models = _reference_run(tmp_path, invoke, corpus)
    store = json.loads(invoke("info", tmp_path / "s.zarr", "--json").stdout)
    assert store["kind"] == "corpus" and store["models"] == models and store["images"] == 3 and store["ground_truth"]
    path = root / "model1" / "img2.png"
    assert store["sources"]["model1"]["img2"] == {"file": "img2.png", "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert store["attributes"]["created_by"].startswith("ensir-flow") and store["attributes"]["source"] == str(root)
    lut = json.loads(invoke("info", tmp_path / "lut.zarr", "--json").stdout)
    assert lut["kind"] == "lut" and lut["bin_width"] == 32 and lut["reference_pixels"] == store["pixels"] * 3
    output = json.loads(invoke("info", tmp_path / "out.zarr", "--json").stdout)
    assert output["kind"] == "ensemble" and output["attributes"]["lut_sha256"] == lut["sha256"]
    human = invoke("info", tmp_path / "s.zarr")
    assert human.exit_code == 0 and "sources: 12 files with SHA-256" in human.stdout
    missing = invoke("info", tmp_path / "nothing.zarr")
    assert missing.exit_code != 0 and "store not found" in missing.stderr


def test_paper_lut_import_then_apply_and_export(tmp_path, invoke, corpus):
    root, models = corpus
    assert invoke("ingest", root, tmp_path / "s.zarr", "--no-progress").exit_code == 0
    table = {(a, b, c): [torch.tensor([0.2, 0.3, 0.5])] * 3 for a in (0, 128) for b in (0, 128) for c in (0, 128)}
    torch.save(table, tmp_path / "paper.pth")
    result = invoke(
        "lut", "import", tmp_path / "paper.pth", tmp_path / "imported.zarr", "--models", ",".join(models), "--bin-width", 128
    )
    assert result.exit_code == 0, result.output
    assert invoke("apply", tmp_path / "s.zarr", tmp_path / "imported.zarr", tmp_path / "o.zarr", "--no-progress").exit_code == 0
    predictions = xr.open_zarr(tmp_path / "s.zarr")["prediction"].values.astype(np.float32)
    expected = np.floor(
        np.float32(0.2) * predictions[0] + np.float32(0.3) * predictions[1] + np.float32(0.5) * predictions[2] + np.float32(0.5)
    )
    np.testing.assert_array_equal(xr.open_zarr(tmp_path / "o.zarr")["ensemble"].values, expected)

    for name in ("lut.npz", "lut.json"):
        assert invoke("lut", "export", tmp_path / "imported.zarr", tmp_path / name).exit_code == 0
    npz = np.load(tmp_path / "lut.npz")
    exported = json.loads((tmp_path / "lut.json").read_text())
    np.testing.assert_array_equal(npz["weights"], np.array(exported["weights"], np.float32))
    assert (
        exported["models"] == models and exported["bin_width"] == 128 and "first model most significant" in exported["bin_index"]
    )
    assert json.loads(str(npz["metadata"]))["models"] == models
    refused = invoke("lut", "export", tmp_path / "imported.zarr", tmp_path / "lut.csv")
    assert refused.exit_code != 0 and "name it *.npz or *.json" in refused.stderr


def test_json_export_leaves_out_flat_indices_a_double_cannot_hold(tmp_path):
    """K = 14 at bin width 16: flat bins up to 16^14 = 2^56 fit int64 but not a JSON reader's
    doubles, so JSON keeps bin_digits only (NPZ keeps both); K = 3 keeps `bin` in JSON."""
    from ensir_flow import stats
    from ensir_flow.lut import fit_lut
    from ensir_flow.pipelines.interchange import export_lut
    from ensir_flow.pipelines.resumable import write_dataset

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 256, (300, 3), dtype=np.uint8)
    for n_models, has_bin in ((14, False), (3, True)):
        predictions = np.clip(truth[None].astype(int) + rng.integers(-20, 21, (n_models, 300, 3)), 0, 255).astype(np.uint8)
        lut = fit_lut(stats.chunk_statistics(predictions, truth, 16), [f"m{k}" for k in range(n_models)], solver="average")
        lut_path = tmp_path / f"lut{n_models}.zarr"
        write_dataset(lut.to_dataset(), str(lut_path)).compute()
        export_lut(str(lut_path), str(tmp_path / f"lut{n_models}.json"))
        export_lut(str(lut_path), str(tmp_path / f"lut{n_models}.npz"))
        exported = json.loads((tmp_path / f"lut{n_models}.json").read_text())
        assert ("bin" in exported) == has_bin and ("bin_omitted" in exported) != has_bin
        assert exported["bin_digits"] == lut.bin_digits.tolist()
        assert "bin" in np.load(tmp_path / f"lut{n_models}.npz")


def _paper_lut(path, weights=(0.2, 0.3, 0.5)) -> None:
    """A LUT in the paper's form: K = 3 models at bin width 128 (8 bins)."""
    torch.save({(a, b, c): [torch.tensor(weights)] * 3 for a in (0, 128) for b in (0, 128) for c in (0, 128)}, path)


def _restamped(path) -> None:
    """`path`, an NPZ, rewritten with every entry's bytes as they were and another time stamp."""
    with zipfile.ZipFile(path) as archive:
        entries = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for info, data in entries:
            info.date_time = (1999, 1, 1, 0, 0, 0)
            archive.writestr(info, data)


def test_lut_import_and_export_run_again_leave_their_outputs_unchanged(tmp_path, invoke):
    _paper_lut(tmp_path / "paper.pth")
    imported = ("lut", "import", tmp_path / "paper.pth", tmp_path / "lut.zarr", "--models", "a,b,c", "--bin-width", 128)
    assert invoke(*imported).exit_code == 0
    before = {path: path.read_bytes() for path in (tmp_path / "lut.zarr").rglob("*") if path.is_file()}
    again = invoke(*imported)
    assert again.exit_code == 0 and "nothing to do" in again.stdout
    assert {path: path.read_bytes() for path in (tmp_path / "lut.zarr").rglob("*") if path.is_file()} == before
    for name in ("l.npz", "l.json"):
        assert invoke("lut", "export", tmp_path / "lut.zarr", tmp_path / name).exit_code == 0
    _restamped(tmp_path / "l.npz")  # as a run at another time writes it
    for name in ("l.npz", "l.json"):
        written = (tmp_path / name).read_bytes()
        again = invoke("lut", "export", tmp_path / "lut.zarr", tmp_path / name, "--json")
        assert again.exit_code == 0 and json.loads(again.stdout)["status"] == "unchanged"
        assert (tmp_path / name).read_bytes() == written

    # other inputs onto these outputs still need --overwrite
    _paper_lut(tmp_path / "other.pth", (0.5, 0.3, 0.2))
    for args in (
        ("lut", "import", tmp_path / "other.pth", tmp_path / "lut.zarr", "--models", "a,b,c", "--bin-width", 128),
        ("lut", "import", tmp_path / "paper.pth", tmp_path / "lut.zarr", "--models", "c,b,a", "--bin-width", 128),
    ):
        one_line_refusal(invoke(*args), f"{tmp_path / 'lut.zarr'}: already exists (pass --overwrite")
    other = ("lut", "import", tmp_path / "other.pth", tmp_path / "other.zarr", "--models", "a,b,c", "--bin-width", 128)
    assert invoke(*other).exit_code == 0
    for name in ("l.npz", "l.json"):
        one_line_refusal(invoke("lut", "export", tmp_path / "other.zarr", tmp_path / name), "already exists (pass --overwrite")
    assert {path: path.read_bytes() for path in (tmp_path / "lut.zarr").rglob("*") if path.is_file()} == before
