"""The README and the documentation pages: their Python examples run, the README's quick start is
the setup CI runs, and the pages hold what a user reads, not how the code came to be."""

import re
from pathlib import Path

import numpy as np
import pytest

from helpers import make_corpus

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


def _run_python_blocks(page: Path, folder: Path, monkeypatch) -> dict:
    """Run the Python blocks of `page` in order, in one namespace, in `folder` holding a corpus."""
    make_corpus(folder / "corpus")
    monkeypatch.chdir(folder)
    namespace: dict = {}
    for block in _blocks(page.read_text(), "python"):
        exec(compile(block, str(page), "exec"), namespace)  # noqa: S102 - the page's own examples
    return namespace


def test_readme_python_example_runs(tmp_path, monkeypatch):
    (_,) = _blocks(README.read_text(), "python")
    namespace = _run_python_blocks(README, tmp_path, monkeypatch)
    assert (tmp_path / "png" / "img0.png").exists()
    assert namespace["scores"].table.loc["ensemble", "psnr"] > 0
    assert namespace["first"].dtype == np.uint8 and namespace["first"].ndim == 3


def test_python_guide_examples_run(tmp_path, monkeypatch):
    page = DOCS / "python.md"
    assert len(_blocks(page.read_text(), "python")) >= 3
    namespace = _run_python_blocks(page, tmp_path, monkeypatch)
    assert (tmp_path / "png" / "img0.png").exists()
    assert namespace["scores"].table.loc["ensemble", "psnr"] > 0 and "em" in namespace["comparison"].table.index


def test_readme_quick_start_is_the_demo_then_the_tests():
    first, second = _blocks(README.read_text(), "bash")[:2]
    assert (
        first
        == "python3 -m venv .venv && .venv/bin/pip install -q -c constraints.txt -e . && .venv/bin/ensir-flow demo demo-run\n"
    )
    assert second == "python3 -m venv .venv && .venv/bin/pip install -q -c constraints.txt -e '.[test]' && .venv/bin/pytest -q\n"


def test_readme_is_short_and_its_links_resolve():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    links = re.findall(r"\]\(((?:docs/)?[\w./-]+\.md)(?:#[\w-]+)?\)", text)
    assert len(links) >= 10
    for link in links:
        assert (ROOT / link).is_file(), link


@pytest.mark.parametrize("page", [README, ROOT / "CHANGELOG.md", *sorted(DOCS.glob("*.md"))], ids=lambda path: path.name)
def test_pages_speak_of_the_code_not_its_history(page):
    text = page.read_text()
    history = re.findall(
        r"\b(?:stop|round|issue|commit) \d+\b|\b[0-9a-f]{7}\b(?= \()|\btarget(?:s)?\b.{0,20}\bmet\b", text, flags=re.IGNORECASE
    )
    assert not history, history
