"""The Python API never surprises: an unknown keyword is a TypeError, every command takes the CLI's
options under the same names and defaults (and `config=` for `--config`), a plain call runs on
threads, a local cluster is started once per process, and progress follows the CLI's rules."""

import inspect
import os
import re
import subprocess
import sys
import textwrap

import click
import numpy as np
import pytest

import ensir_flow
from ensir_flow import api
from ensir_flow.cli import main
from ensir_flow.pipelines import executor
from helpers import make_corpus

#: Each CLI command (its path under `ensir-flow`) and the API function it calls.
COMMANDS = {
    ("ingest",): api.ingest,
    ("predict",): api.predict,
    ("fit",): api.fit,
    ("apply",): api.apply,
    ("evaluate",): api.evaluate,
    ("info",): api.info,
    ("lut", "import"): api.import_lut,
    ("lut", "export"): api.export_lut,
    ("demo",): api.demo,
}

#: The API commands no CLI command calls, and why.
API_ONLY = {"export": "the CLI writes PNGs with apply --export-dir; export of any variable is for scripts"}
#: The CLI commands with no API function, and why.
CLI_ONLY = {("configs",): "lists installed configs for --config; the API takes a config's name or path"}

#: (command, CLI parameter name) -> why it has no API keyword of its name and default.
CLI_EXCEPTIONS = {
    **{(command, "no_progress"): "--no-progress is progress=False" for command in COMMANDS},
    **{(command, "progress_interval"): "--progress-interval N is progress=N" for command in COMMANDS},
    **{(command, "json"): "--json prints result.to_json()" for command in COMMANDS},
    **{
        (command, "scheduler"): "the CLI defaults to $ENSIR_FLOW_SCHEDULER or 'local', the API to threads "
        "(a script without a main guard cannot start worker processes)"
        for command in COMMANDS
    },
    (("evaluate",), "as_json"): "--json prints result.to_json()",
    (("info",), "as_json"): "info returns the --json object itself",
    (("ingest",), "chunk_pixels"): "None: not given, refused with append=True; the CLI's default applies otherwise",
    (("ingest",), "compression"): "None: not given, refused with append=True; the CLI's default applies otherwise",
    (("predict",), "chunk_pixels"): "None: not given, refused with append=True; the CLI's default applies otherwise",
    (("predict",), "compression"): "None: not given, refused with append=True; the CLI's default applies otherwise",
    (("predict",), "overlap"): "None: not given, refused without tile; 0 otherwise, as the CLI's default",
    (("predict",), "model_specs"): "--model NAME=FILE, repeated, is models= (a mapping, pairs or NAME=FILE strings)",
    (("predict",), "value_range"): "--range is value_range= (range is a Python builtin)",
    (("evaluate",), "bin_widths"): "the CLI's default is the text '32' of the API's default 32",
    (("evaluate",), "folds"): "--cv N is cv=N",
    (("evaluate",), "ensemble_store"): "--ensemble is ensemble=",
    (("evaluate",), "report_dir"): "--report is report=",
    (("evaluate",), "lut_path"): "--lut is lut=",
    (("lut", "export"), "lut_path"): "the LUT argument is lut",
}
#: The commands that accept --no-progress and show no progress anyway (for scripts passing it to all).
QUIET = {("info",), ("lut", "import"), ("lut", "export")}
#: API keywords with no CLI option of their name, and why.
API_EXCEPTIONS = {
    "client": "a distributed.Client exists only in Python",
    "progress": "--no-progress and --progress-interval",
    "config": "--config is an option of the group, before the command",
}
#: For the CLI parameters listed above, the API keyword each one is.
RENAMED = {
    "model_specs": "models",
    "value_range": "value_range",
    "folds": "cv",
    "ensemble_store": "ensemble",
    "report_dir": "report",
    "lut_path": "lut",
    "as_json": None,
    "json": None,
    "no_progress": "progress",
    "progress_interval": "progress",
}


def _cli_command(path: tuple[str, ...]) -> click.Command:
    command = main
    for name in path:
        command = command.commands[name]
    return command


def _cli_default(command: click.Command, parameter: click.Parameter):
    if parameter.required:
        return inspect.Parameter.empty
    with click.Context(command) as context:
        return parameter.get_default(context)


def _api_default(parameter: inspect.Parameter):
    return parameter.default


def test_every_cli_command_is_an_api_function_and_back():
    def paths(group, prefix=()):
        for name, command in group.commands.items():
            yield from paths(command, (*prefix, name)) if isinstance(command, click.Group) else [(*prefix, name)]

    assert set(paths(main)) == set(COMMANDS) | set(CLI_ONLY)
    commands = {
        name
        for name in ensir_flow.API
        if inspect.isfunction(getattr(api, name)) and "config" in inspect.signature(getattr(api, name)).parameters
    }
    assert commands == {function.__name__ for function in COMMANDS.values()} | set(API_ONLY)


@pytest.mark.parametrize("path", list(COMMANDS), ids=" ".join)
def test_each_cli_option_is_one_api_keyword_with_the_same_default_and_back(path):
    command, function = _cli_command(path), COMMANDS[path]
    keywords = inspect.signature(function).parameters
    mapped = set()
    for parameter in command.params:
        exception = CLI_EXCEPTIONS.get((path, parameter.name))
        keyword = RENAMED.get(parameter.name, parameter.name) if exception else parameter.name
        if keyword == "progress" and path in QUIET:
            keyword = None
        if keyword is not None:
            assert keyword in keywords, (path, parameter.name)
            mapped.add(keyword)
        if exception is None:
            assert _cli_default(command, parameter) == _api_default(keywords[keyword]), (path, parameter.name)
            assert isinstance(parameter, click.Argument) == (keywords[keyword].kind is keywords[keyword].POSITIONAL_OR_KEYWORD)
    unmapped = set(keywords) - mapped - set(API_EXCEPTIONS)
    # commands that compute take every run option; those that do not (info, lut) take none of them
    assert not unmapped, (path, unmapped)
    for listed_path, name in CLI_EXCEPTIONS:
        if listed_path == path and name not in ("json", "no_progress", "progress_interval", "scheduler"):
            assert name in {parameter.name for parameter in command.params}, (path, name)  # no stale exception


@pytest.mark.parametrize(
    "name", [name for name in ensir_flow.API if name not in ("open_store", "image", "RunOptions", "UsageError")]
)
def test_every_command_refuses_an_unknown_keyword_naming_it(name, tmp_path):
    function = getattr(ensir_flow, name)
    positional = [
        tmp_path / f"p{i}"
        for i, parameter in enumerate(inspect.signature(function).parameters.values())
        if parameter.kind is parameter.POSITIONAL_OR_KEYWORD and parameter.default is parameter.empty
    ]
    with pytest.raises(TypeError, match=rf"^{name}\(\) got an unexpected keyword argument 'not_an_option'$"):
        function(*positional, not_an_option=1)
    assert not list(tmp_path.iterdir())


def test_a_misspelt_option_is_refused_before_anything_is_written(tmp_path, corpus):
    root, _ = corpus
    ensir_flow.ingest(root, tmp_path / "s.zarr", progress=False)
    with pytest.raises(
        TypeError, match=re.escape("fit() got an unexpected keyword argument 'bin_widht' (did you mean 'bin_width'?)")
    ):
        ensir_flow.fit(tmp_path / "s.zarr", tmp_path / "lut16.zarr", bin_widht=16, solver="lsq")
    with pytest.raises(TypeError, match="'solvr'"):
        ensir_flow.fit(tmp_path / "s.zarr", tmp_path / "lut16.zarr", bin_width=16, solvr="lsq")
    with pytest.raises(TypeError, match=re.escape("fit() missing a required argument: 'lut'")):
        ensir_flow.fit(tmp_path / "s.zarr")
    assert not (tmp_path / "lut16.zarr").exists()


def test_a_client_or_address_in_the_wrong_keyword_is_a_type_error_saying_where_it_goes(tmp_path, corpus):
    from distributed import Client

    root, _ = corpus
    with Client(processes=False, n_workers=1, dashboard_address=None) as client:
        with pytest.raises(TypeError, match=re.escape("not a Client (a distributed Client goes in client=)")):
            ensir_flow.ingest(root, tmp_path / "s.zarr", scheduler=client, progress=False)
    with pytest.raises(
        TypeError, match=re.escape("client= takes a distributed Client, not a str (an address goes in scheduler=)")
    ):
        ensir_flow.ingest(root, tmp_path / "s.zarr", client="tcp://127.0.0.1:8786", progress=False)
    assert not list(tmp_path.glob("s.zarr*"))


def test_config_sets_the_defaults_the_cli_config_sets_and_keywords_override_it(tmp_path, corpus, invoke):
    root, models = corpus
    config = tmp_path / "task.yaml"
    config.write_text(
        f"models: [{models[2]}, {models[0]}, {models[1]}]\nbin_width: 64\nsolver: lsq\nshrinkage: 5\nmetrics:\n  crop_border: 2\n"
    )
    ingested = ensir_flow.ingest(root, tmp_path / "s.zarr", config=config, progress=False)
    assert ingested.models == [models[2], models[0], models[1]]
    fitted = ensir_flow.fit(tmp_path / "s.zarr", tmp_path / "lut.zarr", config=config, progress=False)
    assert (fitted.lut.bin_width, fitted.lut.solver) == (64, "lsq")
    cli = invoke("--config", config, "fit", tmp_path / "s.zarr", tmp_path / "cli.zarr", "--no-progress", "--json")
    assert cli.exit_code == 0, cli.output
    np.testing.assert_array_equal(
        ensir_flow.open_store(tmp_path / "cli.zarr")["weights"].values,
        ensir_flow.open_store(tmp_path / "lut.zarr")["weights"].values,
    )
    overridden = ensir_flow.fit(tmp_path / "s.zarr", tmp_path / "em.zarr", config=config, solver="em", progress=False)
    assert (overridden.lut.bin_width, overridden.lut.solver) == (64, "em")
    scored = ensir_flow.evaluate(tmp_path / "s.zarr", config=config, progress=False)
    assert scored.evaluation.options["crop_border"] == 2
    installed = ensir_flow.fit(tmp_path / "s.zarr", tmp_path / "x.zarr", config="deblurring-gopro", dry_run=True)
    assert installed.status == "planned" and "32" in installed.plan
    with pytest.raises(ensir_flow.UsageError, match="neither a config file nor an installed config") as refused:
        ensir_flow.fit(tmp_path / "s.zarr", tmp_path / "y.zarr", config="no-such-config")
    assert refused.value.option == "--config" and not (tmp_path / "y.zarr").exists()


def test_a_plain_call_runs_on_threads_whatever_the_cli_default(tmp_path, corpus, monkeypatch):
    root, _ = corpus
    monkeypatch.setenv("ENSIR_FLOW_SCHEDULER", "local")

    def no_cluster(**options):
        raise AssertionError("a cluster was started")

    monkeypatch.setattr(executor, "local_cluster", no_cluster)
    assert ensir_flow.ingest(root, tmp_path / "s.zarr", progress=False).status == "written"


@pytest.fixture
def in_process_clusters(monkeypatch):
    """scheduler='local' clusters with one in-process worker, counted as they start."""
    started = []
    make = executor.local_cluster

    def counted(**options):
        started.append(options)
        return make(n_workers=1, processes=False, **options)

    monkeypatch.setattr(executor, "local_cluster", counted)
    yield started
    executor.close_local_cluster()


def test_the_api_starts_one_local_cluster_per_process_and_prints_its_link_once(tmp_path, corpus, in_process_clusters, capsys):
    root, _ = corpus
    ensir_flow.ingest(root, tmp_path / "s.zarr", scheduler="local", dashboard_address=":0", progress=False)
    ensir_flow.fit(tmp_path / "s.zarr", tmp_path / "lut.zarr", scheduler="local", dashboard_address=":0", progress=False)
    with pytest.raises(ensir_flow.UsageError, match="memory:// exists in this process only"):
        ensir_flow.ingest(root, "memory://strict/s.zarr", scheduler="local")
    assert len(in_process_clusters) == 1
    assert capsys.readouterr().err.count("dask dashboard: ") == 1
    from distributed import default_client

    with pytest.raises(ValueError):
        default_client()  # the API's cluster is not the process's default client: plain calls stay on threads
    executor.close_local_cluster()
    ensir_flow.apply(
        tmp_path / "s.zarr", tmp_path / "lut.zarr", tmp_path / "o.zarr", scheduler="local", dashboard_address=None, progress=False
    )
    assert len(in_process_clusters) == 2  # a closed one is started again when asked for


def test_progress_in_the_api_is_lines_when_stderr_is_not_a_terminal(tmp_path, corpus, capsys):
    root, _ = corpus
    ensir_flow.ingest(root, tmp_path / "s.zarr")
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(
        re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} ingest: (started|done in [\d.]+ s)$", line) for line in lines
    ), lines
    ensir_flow.ingest(root, tmp_path / "t.zarr", progress=False)
    assert capsys.readouterr().err == ""
    with pytest.raises(ensir_flow.UsageError, match="not a finite number of seconds"):
        ensir_flow.ingest(root, tmp_path / "u.zarr", progress=float("nan"))


SCRIPT = """
import ensir_flow

print("top level ran", flush=True)
{body}
"""


def _run_script(tmp_path, body: str) -> subprocess.CompletedProcess:
    if not (tmp_path / "corpus").exists():
        make_corpus(tmp_path / "corpus")
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(SCRIPT).format(body=textwrap.dedent(body)))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "ENSIR_FLOW_SCHEDULER")}
    return subprocess.run([sys.executable, script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_a_cluster_asked_for_by_a_script_without_a_main_guard_is_refused_in_one_line(tmp_path):
    run = _run_script(tmp_path, 'ensir_flow.ingest("corpus", "s.zarr", scheduler="local")\n')
    assert run.returncode == 1 and run.stdout == "top level ran\n"  # no worker process ran the script again
    assert run.stderr.count("Traceback") == 1 and run.stderr.endswith(
        f"ensir_flow.api.UsageError: {tmp_path / 'script.py'}, line 5: scheduler='local' starts worker processes, which "
        'import this script and would run it again: put its calls under `if __name__ == "__main__":` (or run on '
        "scheduler='threads')\n"
    ), run.stderr
    assert not (tmp_path / "s.zarr").exists()
    # a plain call (threads) needs no guard
    plain = _run_script(tmp_path, 'print(ensir_flow.ingest("corpus", "t.zarr", progress=False).status)\n')
    assert (plain.returncode, plain.stdout, plain.stderr) == (0, "top level ran\nwritten\n", "")


@pytest.mark.slow
def test_a_guarded_script_reuses_one_local_cluster_quietly(tmp_path):
    run = _run_script(
        tmp_path,
        """
        if __name__ == "__main__":
            for store in ("s.zarr", "t.zarr"):
                print(ensir_flow.ingest("corpus", store, scheduler="local", dashboard_address=":0", progress=False).status)
            print(ensir_flow.fit("s.zarr", "lut.zarr", scheduler="local", progress=False).status)
    """,
    )
    assert run.returncode == 0, run.stderr
    # (the workers import the script: its top level, outside the guard, runs in each of them)
    assert [line for line in run.stdout.splitlines() if line != "top level ran"] == ["written"] * 3
    assert re.fullmatch(r"dask dashboard: http://[\w.]+:\d+/status\n", run.stderr), run.stderr
