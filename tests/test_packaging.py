"""The package installs as one namespace: no top-level `pipelines` or `cli` module beside it."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_everything_under_ensir_flow(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
                    str(ROOT)], check=True, cwd=tmp_path, capture_output=True)
    (wheel,) = tmp_path.glob("ensir_flow-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    package = [n for n in names if not n.startswith("ensir_flow-")]
    assert package and all(n.startswith("ensir_flow/") for n in package), [n for n in package if not n.startswith("ensir_flow/")]
    for module in ("ensir_flow/cli.py", "ensir_flow/pipelines/apply.py", "ensir_flow/pipelines/executor.py",
                   "ensir_flow/report/page.py"):
        assert module in names, module
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "ensir-flow = ensir_flow.cli:main" in entry_points


def test_installed_console_script_works_and_no_top_level_modules_leak(tmp_path):
    for module in ("pipelines", "cli"):
        found = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=tmp_path, capture_output=True, text=True)
        assert found.returncode != 0 and "ModuleNotFoundError" in found.stderr, module
    script = Path(sys.executable).with_name("ensir-flow")
    version = subprocess.run([str(script), "--version"], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert version.stdout.startswith("ensir-flow, version ")
