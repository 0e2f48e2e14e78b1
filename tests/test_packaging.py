"""The package installs as one namespace: no top-level `pipelines` or `cli` module beside it."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_everything_under_ensir_flow(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        cwd=tmp_path,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("ensir_flow-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    package = [n for n in names if not n.startswith("ensir_flow-")]
    assert package and all(n.startswith("ensir_flow/") for n in package), [n for n in package if not n.startswith("ensir_flow/")]
    for module in (
        "ensir_flow/cli.py",
        "ensir_flow/pipelines/apply.py",
        "ensir_flow/pipelines/executor.py",
        "ensir_flow/report/page.py",
    ):
        assert module in names, module
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "ensir-flow = ensir_flow.cli:main" in entry_points
    configs = sorted(
        n.removeprefix("ensir_flow/configs/") for n in names if n.startswith("ensir_flow/configs/") and n.endswith(".yaml")
    )
    assert configs == sorted(path.name for path in (ROOT / "configs").glob("*.yaml")) and configs
    assert "ensir_flow/__main__.py" in names and any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: MIT" in metadata and "Project-URL: Paper, https://arxiv.org/abs/2410.22959" in metadata
    assert "Classifier: Topic :: Scientific/Engineering :: Image Processing" in metadata
    assert "Requires-Dist: bokeh" in metadata  # the Dask dashboard


def test_installed_console_script_works_and_no_top_level_modules_leak(tmp_path):
    for module in ("pipelines", "cli"):
        found = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=tmp_path, capture_output=True, text=True)
        assert found.returncode != 0 and "ModuleNotFoundError" in found.stderr, module
    script = Path(sys.executable).with_name("ensir-flow")
    version = subprocess.run([str(script), "--version"], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert version.stdout.startswith("ensir-flow, version ")


def test_python_dash_m_is_the_command_line(tmp_path):
    version = subprocess.run(
        [sys.executable, "-m", "ensir_flow", "--version"], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert version.stdout.startswith("ensir-flow, version ")
    usage = subprocess.run([sys.executable, "-m", "ensir_flow", "no-such-command"], cwd=tmp_path, capture_output=True, text=True)
    assert usage.returncode == 2 and "Usage: ensir-flow" in usage.stderr


def test_installed_configs_are_listed_and_selected_by_name(tmp_path, invoke, corpus):
    from ensir_flow.config import installed_configs

    names = sorted(path.stem for path in (ROOT / "configs").glob("*.yaml"))
    assert list(installed_configs()) == names
    listed = invoke("configs")
    assert listed.exit_code == 0 and all(f"{name}: " in listed.stdout for name in names)
    root, _ = corpus
    assert invoke("ingest", root, tmp_path / "s.zarr", "--no-progress").exit_code == 0
    by_name = invoke("--config", "deraining-rain100h", "evaluate", tmp_path / "s.zarr", "--dry-run")
    assert by_name.exit_code == 0 and "PSNR, SSIM on Y" in by_name.stdout  # the config's y_channel: true
    by_path = invoke("--config", ROOT / "configs" / "deraining-rain100h.yaml", "evaluate", tmp_path / "s.zarr", "--dry-run")
    assert by_path.exit_code == 0 and by_path.stdout == by_name.stdout
    unknown = invoke("--config", "deblurring", "evaluate", tmp_path / "s.zarr", "--dry-run")
    assert unknown.exit_code == 2 and "deblurring: neither a config file nor an installed config" in unknown.stderr
    assert ", ".join(names) in unknown.stderr


def test_an_installed_config_name_that_is_also_a_file_here_is_refused(tmp_path, monkeypatch, invoke):
    """A file 'deraining-rain100h' in the working folder used to win over the installed config of
    that name, silently (another bin width, solver or metric than the user named)."""
    from ensir_flow.config import installed_configs, load_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "deraining-rain100h").write_text("bin_width: 8\n")
    shadowed = invoke("--config", "deraining-rain100h", "configs")
    assert shadowed.exit_code == 2 and "deraining-rain100h: both an installed config and a file in" in shadowed.stderr
    assert load_config("./deraining-rain100h") == {"bin_width": 8}
    assert load_config(installed_configs()["deraining-rain100h"])["metrics"]["y_channel"] is True
