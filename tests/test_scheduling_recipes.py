"""The scheduler recipes of docs/scheduling.md are well-formed, and name commands and options that exist."""

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ensir_flow.cli import main

RECIPES = (Path(__file__).resolve().parents[1] / "docs" / "scheduling.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", RECIPES, flags=re.S)


def _ensir_flow_commands(text: str) -> list[list[str]]:
    """Each `ensir-flow ...` invocation in `text`, as its words up to the end of the command."""
    commands = []
    for match in re.finditer(r"ensir-flow ((?:ingest|fit|apply|evaluate|info|lut|demo)\b[^&|>;\n\"]*)", text.replace("\\\n", " ")):
        commands.append(match.group(1).split())
    return commands


def test_shell_recipes_parse_and_use_real_options(invoke):
    blocks = _blocks("bash") + _blocks("cron")
    assert len(blocks) == 3
    for block in _blocks("bash"):
        subprocess.run(["bash", "-n"], input=block, text=True, check=True)
    seen = 0
    for block in blocks + _blocks("ini") + _blocks("python"):
        for words in _ensir_flow_commands(block):
            command = main.get_command(None, words[0])
            assert command is not None, words
            names = {option for parameter in command.params for option in getattr(parameter, "opts", [])}
            for word in words[1:]:
                if word.startswith("--"):
                    assert word in names, (words, word)
            seen += 1
    assert seen >= 10


def test_python_recipe_parses():
    (block,) = _blocks("python")
    ast.parse(block)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_units_verify(tmp_path):
    service, timer = _blocks("ini")
    (tmp_path / "ensir-flow-nightly.service").write_text(service.replace("/usr/local/bin/ensir-flow", shutil.which("true")))
    (tmp_path / "ensir-flow-nightly.timer").write_text(timer)
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "ensir-flow-nightly.timer"),
                             str(tmp_path / "ensir-flow-nightly.service")], capture_output=True, text=True)
    problems = [line for line in result.stderr.splitlines() if "ensir-flow-nightly" in line]
    assert not problems, result.stderr
