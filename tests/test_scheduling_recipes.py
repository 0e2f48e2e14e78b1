"""The scheduler recipes of docs/scheduling.md are well-formed, name commands and options that exist,
and the cron line does what it says when a shell runs it."""

import ast
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ensir_flow.cli import main
from helpers import make_corpus

RECIPES = (Path(__file__).resolve().parents[1] / "docs" / "scheduling.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", RECIPES, flags=re.S)


def _ensir_flow_commands(text: str) -> list[list[str]]:
    """Each `ensir-flow ...` invocation in `text`, as its words up to the end of the command."""
    commands = []
    for match in re.finditer(
        r"ensir-flow ((?:ingest|fit|apply|evaluate|info|lut|demo)\b[^&|>;\n\"]*)", text.replace("\\\n", " ")
    ):
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
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "ensir-flow-nightly.timer"), str(tmp_path / "ensir-flow-nightly.service")],
        capture_output=True,
        text=True,
    )
    problems = [line for line in result.stderr.splitlines() if "ensir-flow-nightly" in line]
    assert not problems, result.stderr


@pytest.mark.slow  # two fresh ensir-flow processes: 5 s of CPU, often 15-20 s on a shared machine
def test_cron_line_logs_both_commands(tmp_path, invoke):
    """The documented crontab line, run by `sh` as cron runs it (on a small corpus, in a scratch
    folder, on threads): both commands run and the log holds the output of each."""
    (block,) = _blocks("cron")
    (entry,) = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    command = entry.split(None, 5)[5]  # after the five time fields
    log = tmp_path / "ensir-flow.log"
    script = shlex.quote(str(Path(sys.executable).with_name("ensir-flow")))
    assert command.count("--no-progress") == 2 and "cd /data && " in command and ">> /var/log/ensir-flow.log" in command
    command = (
        command.replace("cd /data && ", f"cd {shlex.quote(str(tmp_path))} && ")
        .replace("/var/log/ensir-flow.log", shlex.quote(str(log)))
        .replace("ensir-flow ", f"{script} ")
        .replace("--no-progress", "--no-progress --scheduler threads")
    )
    make_corpus(tmp_path / "incoming")
    assert invoke("ingest", tmp_path / "incoming", tmp_path / "reference.zarr", "--no-progress").exit_code == 0
    assert invoke("fit", tmp_path / "reference.zarr", tmp_path / "lut.zarr", "--no-progress").exit_code == 0
    run = subprocess.run(["sh", "-c", command], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "" and run.stderr == ""  # everything went to the log
    lines = log.read_text().splitlines()
    assert any(line.startswith("appended 3 new image(s) to frames.zarr") for line in lines), lines
    assert any(line.startswith("wrote ensemble.zarr (3 images)") for line in lines), lines
    assert sorted(p.name for p in (tmp_path / "ensemble-png").iterdir()) == ["img0.png", "img1.png", "img2.png"]
