"""The HTML report: its content, its figures, and how a real headless browser renders it."""

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner

from ensir_flow.errors import InputError
from ensir_flow.lut import Lut
from ensir_flow.pipelines.report import write_report
from ensir_flow.report.figures import lut_weight_maps
from helpers import make_corpus, run_workflow

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SIZES = ((48, 64), (40, 56), (36, 60), (52, 44))
ODD_MODEL = "m<b>$x$&amp;"
ODD_STEM = 'img <i>"1" $&'


class Tables(HTMLParser):
    """The text of every cell of every table with an id: {id: [[cell, ...] per row]}."""

    def __init__(self, page: str):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._table = self._cell = None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        if tag == "table" and dict(attrs).get("id"):
            self._table = self.tables.setdefault(dict(attrs)["id"], [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag in ("td", "th") and self._cell is not None:
            self._table[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _invoke(*args):
    """conftest's `invoke` for module-scoped fixtures: the CLI in-process, returning click's Result."""
    from ensir_flow.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def rgb_report(tmp_path_factory):
    """An RGB reference store of 3 models, its LUT and `apply` output, and the report of its evaluation."""
    root = tmp_path_factory.mktemp("rgb")
    models = make_corpus(root / "corpus", sizes=SIZES)
    for folder in ["gt", *models]:  # names that HTML and matplotlib must show as written
        (root / "corpus" / folder / "img1.png").rename(root / "corpus" / folder / f"{ODD_STEM}.png")
    (root / "corpus" / models[1]).rename(root / "corpus" / ODD_MODEL)
    models[1] = ODD_MODEL
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ENSIR_FLOW_SCHEDULER", "threads")
        summary = run_workflow(_invoke, root / "corpus", root)
    store, lut, output = root / "s.zarr", root / "lut.zarr", root / "out.zarr"
    report = root / "report"
    report.mkdir()
    (report / "stale.txt").write_text("left by an earlier run")
    with pytest.raises(InputError, match="already exists"):
        write_report(report, summary, str(store), str(output), str(lut))
    with pytest.raises(InputError, match="ensir-flow did not write"):  # --overwrite replaces only its own reports
        write_report(report, summary, str(store), str(output), str(lut), overwrite=True)
    assert (report / "stale.txt").exists()
    (report / "stale.txt").unlink()
    report.rmdir()
    write_report(report, summary, str(store), str(output), str(lut))
    page = write_report(report, summary, str(store), str(output), str(lut), overwrite=True)
    return page, summary, models


def _check_figures(page: Path) -> list[str]:
    """Every PNG the page references exists, is a valid, non-trivial PNG, and none is left unreferenced."""
    referenced = re.findall(r'src="([^"]+)"', page.read_text(encoding="utf-8"))
    assert referenced and all(name.endswith(".png") and "/" not in name for name in referenced)
    for name in referenced:
        data = (page.parent / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 500, name
        image = iio.imread(page.parent / name)
        assert min(image.shape[:2]) >= 16 and np.ptp(image) > 0, name
    assert sorted(p.name for p in page.parent.glob("*.png")) == sorted(referenced)
    return referenced


def test_report_shows_every_method_image_and_figure(rgb_report):
    page, summary, models = rgb_report
    assert page.name == "index.html" and not (page.parent / "stale.txt").exists()
    text = page.read_text(encoding="utf-8")
    assert "<script" not in text and "http://" not in text and "https://" not in text
    tables = Tables(text).tables
    methods = list(summary["psnr"])
    assert {"ensemble", "average", "zzpm", *models} == set(methods)
    assert [row[0] for row in tables["means"][1:]] == methods
    assert sorted(row[0] for row in tables["per-image"][1:]) == sorted(e["image"] for e in summary["per_image"])
    assert ODD_STEM in {e["image"] for e in summary["per_image"]} and "<b>" not in text and "<i>" not in text
    assert "in-sample" in text and "cross-validation" not in tables
    figures = _check_figures(page)
    assert {"gain.png", "lut-weights.png"} <= set(figures)
    assert any(name.startswith("worst-") for name in figures) and any(name.startswith("best-") for name in figures)
    best_psnr = max(float(row[1]) for row in tables["means"][1:])
    assert re.search(rf'<td class="best">{best_psnr:.3f}</td>', text)


@pytest.fixture
def chromium(tmp_path):
    """A command prefix running Debian's chromium headless, or a skip when it is not installed."""
    executable = shutil.which("chromium")
    if executable is None:
        pytest.skip("chromium not on PATH (apt-get install chromium): the report is not rendered in a browser")
    return [
        executable,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1280,2000",
    ]


@pytest.mark.slow
def test_report_renders_in_headless_browser(rgb_report, chromium, tmp_path):
    page, summary, _ = rgb_report
    screenshot = tmp_path / "report.png"
    subprocess.run([*chromium, f"--screenshot={screenshot}", page.as_uri()], check=True, capture_output=True, timeout=60)
    pixels = iio.imread(screenshot)
    assert pixels.shape[:2] == (2000, 1280) and pixels.astype(np.float64).var() > 0
    dom = subprocess.run([*chromium, "--dump-dom", page.as_uri()], check=True, capture_output=True, text=True, timeout=60).stdout
    tables = Tables(dom).tables
    assert [row[0] for row in tables["means"][1:]] == list(summary["psnr"])
    assert len(tables["per-image"]) == 1 + summary["images"]


def test_report_of_cross_validation_on_grayscale_with_inputs(tmp_path, invoke):
    models = make_corpus(tmp_path / "corpus", n_models=2, sizes=SIZES, channels=1)
    store, lut = tmp_path / "store.zarr", tmp_path / "lut.zarr"
    for args in (
        ["ingest", tmp_path / "corpus", store],
        ["fit", store, lut, "--bin-width", 16],
        ["evaluate", store, "--cv", 2, "--solvers", "em,lsq", "--json"],
    ):
        result = invoke(*args, "--no-progress")
        assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    ds = xr.open_zarr(store)
    inputs = xr.Dataset({"input": (("pixel", "channel"), ds["ground_truth"].values // 2)}, attrs=ds.attrs)
    inputs.to_zarr(store, mode="a")
    page = write_report(tmp_path / "report", summary, str(store), lut_path=str(lut))
    text = page.read_text(encoding="utf-8")
    tables = Tables(text).tables
    assert (
        [row[0] for row in tables["cross-validation"][2:]] == list(summary["psnr"]) == [*models, "average", "zzpm", "em", "lsq"]
    )
    assert len(tables["cross-validation"][1]) == 2 * (summary["cv"]["folds"] + 1)
    assert "held out" in text and "grayscale" in text
    assert re.search(r"<figcaption>input<", text) and "ensemble" not in summary["psnr"]
    _check_figures(page)


def test_lut_weight_maps_average_the_other_models_bins_by_count():
    # 3 models at bin width 128: 2 ranges each, bin b = 4 * r0 + 2 * r1 + r2; one channel
    weights = np.zeros((8, 1, 3), np.float32)
    count = np.zeros((8, 1), np.int64)
    weights[4 * 1 + 2 * 0 + 0, 0], count[4, 0] = (1, 0, 0), 30  # r0=1, r1=0, r2=0
    weights[4 * 1 + 2 * 0 + 1, 0], count[5, 0] = (0, 0, 1), 10  # r0=1, r1=0, r2=1
    weights[0, 0] = (0, 1, 0)  # r0=r1=r2=0 without reference pixels
    lut = Lut(["a", "b", "c"], 128, weights, count, np.zeros((8, 1), np.int8))
    maps = lut_weight_maps(lut)
    assert maps.shape == (2, 2, 1, 3)
    np.testing.assert_allclose(maps[1, 0, 0], (0.75, 0, 0.25))
    assert np.isnan(maps[0, 0]).all() and np.isnan(maps[0, 1]).all() and np.isnan(maps[1, 1]).all()
    lut.count[:] = 0  # an imported LUT has no counts: its maps average uniformly
    np.testing.assert_allclose(lut_weight_maps(lut)[0, 0, 0], (0, 0.5, 0))


def test_evaluate_report_option_draws_the_lut_of_the_scored_output(tmp_path, invoke, corpus):
    root, _ = corpus
    run_workflow(invoke, root, tmp_path)
    result = invoke(
        "evaluate", tmp_path / "s.zarr", "--ensemble", tmp_path / "out.zarr", "--report", tmp_path / "report", "--no-progress"
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report" / "index.html").is_file() and (tmp_path / "report" / "lut-weights.png").is_file()


def test_lut_weight_maps_of_a_sparse_lut_equal_those_of_its_dense_table():
    rng = np.random.default_rng(3)
    n_bins, stored = 4**4, np.sort(rng.choice(4**4, 40, replace=False))  # 4 models at bin width 64
    weights = rng.dirichlet(np.ones(4), (40, 3)).astype(np.float32)
    count = rng.integers(0, 50, (40, 3))
    digits = np.stack([stored // 4 ** (3 - k) % 4 for k in range(4)], axis=1)
    fallback = rng.dirichlet(np.ones(4), 3).astype(np.float32)
    sparse = Lut(list("abcd"), 64, weights, count, np.zeros((40, 3), np.int8), bin_digits=digits, fallback=fallback)
    dense = Lut(list("abcd"), 64, sparse.weights, sparse.count, sparse.fit_status)
    assert len(dense.bin_digits) == n_bins
    np.testing.assert_allclose(lut_weight_maps(sparse), lut_weight_maps(dense), equal_nan=True)
    for lut in (sparse, dense):
        lut.bin_count[:] = 0  # without counts, every bin counts once, the unstored ones with the fallback
    np.testing.assert_allclose(lut_weight_maps(sparse), lut_weight_maps(dense), rtol=1e-6)
    assert not np.isnan(lut_weight_maps(sparse)).any()
