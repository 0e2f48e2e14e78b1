"""No option value makes a command hang, run without bound or print a traceback: values that would
are refused at once, in one line naming the option (exit 2, as click's own usage errors)."""

import json
import math
import socket
import time

import numpy as np
import pytest

import ensir_flow
from ensir_flow import lsq, schema
from ensir_flow.api import MAX_CHUNK_PIXELS, MAX_SAMPLES, MAX_SCALE, MIN_CHUNK_PIXELS, MIN_TILE, UsageError
from ensir_flow.errors import InputError
from ensir_flow.pipelines import executor


def _refused(result, option: str, value: str) -> None:
    """Exit 2, click's usage lines and one error line naming `option` and `value`; no traceback."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 2, result.output
    assert len(errors) == 1 and option in errors[0] and value in errors[0], result.stderr
    assert "Traceback" not in result.output


@pytest.fixture
def store(tmp_path, invoke, corpus):
    root, _ = corpus
    assert invoke("ingest", root, tmp_path / "s.zarr", "--no-progress").exit_code == 0
    return tmp_path / "s.zarr"


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "-1", "1e16", "1e308", "1e400", "none"])
def test_a_shrinkage_lsq_cannot_use_is_refused_before_any_work(store, tmp_path, invoke, value):
    start = time.monotonic()
    result = invoke("fit", store, tmp_path / "l.zarr", "--solver", "lsq", "--shrinkage", value, "--no-progress")
    _refused(result, "--shrinkage", value)
    assert time.monotonic() - start < 5 and not (tmp_path / "l.zarr").exists()


def test_the_largest_shrinkage_fits_a_lut_of_channel_wide_weights(store, tmp_path, invoke):
    result = invoke(
        "fit", store, tmp_path / "l.zarr", "--solver", "lsq", "--shrinkage", f"{lsq.MAX_SHRINKAGE:g}", "--no-progress"
    )
    assert result.exit_code == 0, result.output
    weights = ensir_flow.open_store(tmp_path / "l.zarr")["weights"].values
    assert np.isfinite(weights).all() and np.allclose(weights.sum(axis=-1), 1.0, atol=1e-4)


@pytest.mark.parametrize("shrinkage", [math.inf, -math.inf, math.nan, -1.0, 1e300, True, "many", [1.0]])
def test_the_api_refuses_the_same_shrinkages(store, tmp_path, shrinkage):
    with pytest.raises(UsageError, match="neither 'auto' nor a non-negative number") as refused:
        ensir_flow.fit(store, tmp_path / "l.zarr", solver="lsq", shrinkage=shrinkage, scheduler="threads", progress=False)
    assert refused.value.option == "--shrinkage"


def test_fit_lsq_refuses_a_strength_it_cannot_solve_with():
    """A non-finite strength makes inf/NaN systems on which LAPACK's SVD need not return."""
    for strength in (math.inf, math.nan, -1.0, 2 * lsq.MAX_SHRINKAGE):
        with pytest.raises(ValueError, match="shrinkage"):
            lsq.fit_lsq(None, strength)  # refused before the statistics are looked at
    assert lsq.is_shrinkage(0) and lsq.is_shrinkage(np.float32(10)) and lsq.is_shrinkage(lsq.MAX_SHRINKAGE)
    assert not any(lsq.is_shrinkage(v) for v in (math.nan, math.inf, -0.5, True, "10", None))


@pytest.mark.parametrize("value", [1, MIN_CHUNK_PIXELS - 1, MAX_CHUNK_PIXELS + 1, 10**20])
def test_chunk_pixels_out_of_bounds_are_refused(tmp_path, invoke, corpus, value):
    root, _ = corpus
    result = invoke("ingest", root, tmp_path / "s.zarr", "--chunk-pixels", value, "--no-progress")
    _refused(result, "--chunk-pixels", str(value))
    assert not (tmp_path / "s.zarr").exists()


def test_the_smallest_chunks_still_ingest(tmp_path, invoke, corpus):
    root, _ = corpus
    result = invoke("ingest", root, tmp_path / "s.zarr", "--chunk-pixels", MIN_CHUNK_PIXELS, "--no-progress", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["chunks_total"] == math.ceil(2101 / MIN_CHUNK_PIXELS)  # the corpus's 2,101 pixels


@pytest.mark.parametrize("chunk_pixels", [0, 1, MAX_CHUNK_PIXELS + 1, 100.5, True])
def test_the_api_refuses_the_same_chunk_sizes(tmp_path, corpus, chunk_pixels):
    root, _ = corpus
    with pytest.raises(UsageError, match="is not a whole number from 64 to 16,777,216") as refused:
        ensir_flow.ingest(root, tmp_path / "s.zarr", chunk_pixels=chunk_pixels, scheduler="threads", progress=False)
    assert refused.value.option == "--chunk-pixels" and not (tmp_path / "s.zarr").exists()


def test_chunks_over_two_gib_are_refused_naming_the_largest_that_fits():
    """Many models at a large --chunk-pixels: blosc would fail on the chunk, in a traceback."""
    with pytest.raises(InputError, match=r"--chunk-pixels 16777216: .* 2\.3 GiB.*; 14,316,120 at most here"):
        schema.pixel_encoding((50, MAX_CHUNK_PIXELS, 3))
    assert schema.pixel_encoding((3, MAX_CHUNK_PIXELS, 3))["chunks"] == (3, MAX_CHUNK_PIXELS, 3)


@pytest.mark.parametrize(
    "args, option, value",
    [
        (["--tile", MIN_TILE - 1], "--tile", str(MIN_TILE - 1)),
        (["--samples", MAX_SAMPLES + 1], "--samples", str(MAX_SAMPLES + 1)),
        (["--scale", MAX_SCALE + 1], "--scale", str(MAX_SCALE + 1)),
        (["--scale", 10**20], "--scale", str(10**20)),
        (["--chunk-pixels", 1], "--chunk-pixels", "1"),
    ],
)
def test_predict_options_that_would_run_for_hours_or_overflow_are_refused(tmp_path, invoke, corpus, args, option, value):
    root, _ = corpus
    model = tmp_path / "a.pt"
    model.write_bytes(b"never read: the options are refused first")
    result = invoke("predict", root, tmp_path / "p.zarr", "--model", f"a={model}", *args, "--no-progress")
    _refused(result, option, value)


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"tile": MIN_TILE - 1}, "--tile"),
        ({"samples": MAX_SAMPLES + 1}, "--samples"),
        ({"scale": 10**20}, "--scale"),
        ({"batch": 0}, "--batch"),
        ({"samples": 2.5}, "--samples"),
    ],
)
def test_the_api_refuses_the_same_predict_options(tmp_path, corpus, kwargs, option):
    root, _ = corpus
    with pytest.raises(UsageError) as refused:
        ensir_flow.predict(root, tmp_path / "p.zarr", models={"a": tmp_path / "a.pt"}, scheduler="threads", **kwargs)
    assert refused.value.option == option


@pytest.mark.parametrize("option", ["--worker-timeout", "--progress-interval"])
@pytest.mark.parametrize("value", ["inf", "nan", "1e400", "-1"])
def test_seconds_that_are_not_finite_are_refused(store, tmp_path, invoke, option, value):
    _refused(invoke("fit", store, tmp_path / "l.zarr", option, value, "--no-progress"), option, value.lstrip("-"))


@pytest.mark.parametrize(
    "run, option",
    [
        ({"worker_timeout": math.inf}, "--worker-timeout"),
        ({"worker_timeout": math.nan}, "--worker-timeout"),
        ({"progress": math.nan}, "--progress-interval"),
        ({"progress": -1.0}, "--progress-interval"),
    ],
)
def test_the_api_refuses_the_same_seconds(store, tmp_path, run, option):
    with pytest.raises(UsageError) as refused:
        ensir_flow.fit(store, tmp_path / "l.zarr", scheduler="threads", **run)
    assert refused.value.option == option


@pytest.mark.parametrize(
    "address",
    ["garbage:::x", ":99999", "127.0.0.1:", "127.0.0.1:http", "[::1]:8787", "no-such-host.invalid:8787", "192.0.2.1:8787"],
)
def test_a_dashboard_address_no_cluster_can_serve_is_one_line(tmp_path, invoke, corpus, address):
    root, _ = corpus
    result = invoke("ingest", root, tmp_path / "s.zarr", "--scheduler", "local", "--dashboard-address", address, "--no-progress")
    _refused(result, "--dashboard-address", address)
    assert not (tmp_path / "s.zarr").exists()


def test_the_same_address_from_the_environment_or_the_api(tmp_path, invoke, corpus, monkeypatch):
    root, _ = corpus
    monkeypatch.setenv(executor.DASHBOARD_ADDRESS_ENV, "garbage:::x")
    _refused(invoke("ingest", root, tmp_path / "s.zarr", "--no-progress"), "--dashboard-address", "garbage:::x")
    with pytest.raises(UsageError, match="garbage:::x: not") as refused:
        ensir_flow.ingest(root, tmp_path / "s.zarr", scheduler="local", dashboard_address="garbage:::x", progress=False)
    assert refused.value.option == "--dashboard-address" and not (tmp_path / "s.zarr").exists()


def test_dashboard_addresses_a_cluster_can_serve_pass():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for address in (None, f"127.0.0.1:{port}", ":0", "8787", "localhost:8787", f"{socket.gethostname()}:0"):
        executor.check_dashboard_address(address)


def test_a_config_that_is_not_utf8_is_one_line(tmp_path, invoke, corpus):
    root, _ = corpus
    config = tmp_path / "task.yaml"
    config.write_bytes(b"bin_width: 16\n# caf\xe9 au lait\n")
    result = invoke("--config", config, "ingest", root, tmp_path / "s.zarr", "--no-progress")
    _refused(result, "--config", str(config))
    assert "not UTF-8 text: byte 0xe9 at offset 19" in result.stderr


@pytest.mark.parametrize(
    "text", ["shrinkage: .inf\n", "shrinkage: .nan\n", "shrinkage: -.inf\n", "shrinkage: 1.0e300\n", "shrinkage: 1e300\n"]
)
def test_a_config_shrinkage_lsq_cannot_use_is_refused(tmp_path, invoke, corpus, text):
    root, _ = corpus
    config = tmp_path / "task.yaml"
    config.write_text(text)
    result = invoke("--config", config, "ingest", root, tmp_path / "s.zarr", "--no-progress")
    _refused(result, "--config", "'shrinkage' must be 'auto' or a non-negative number up to 1e+15")


def test_a_config_shrinkage_written_without_a_dot_is_a_number(store, tmp_path, invoke):
    """YAML 1.1 reads 1e4 as a string; it is the number the user meant."""
    config = tmp_path / "task.yaml"
    config.write_text("solver: lsq\nshrinkage: 1e4\n")
    result = invoke("--config", config, "fit", store, tmp_path / "l.zarr", "--no-progress")
    assert result.exit_code == 0, result.output
    assert ensir_flow.open_store(tmp_path / "l.zarr").attrs["shrinkage"] == 1e4


@pytest.mark.parametrize("option, value", [("--bin-widths", "16,32"), ("--solvers", "em")])
def test_cross_validation_options_without_cv_are_refused(store, tmp_path, invoke, option, value):
    _refused(invoke("evaluate", store, option, value, "--no-progress"), option, "applies to --cv only")
    config = tmp_path / "task.yaml"  # a config's bin width and solver are only its --cv candidates
    config.write_text("bin_width: 16\nsolver: em\n")
    assert invoke("--config", config, "evaluate", store, "--no-progress").exit_code == 0
    assert invoke("evaluate", store, "--cv", 2, option, value, "--no-progress").exit_code == 0


def test_a_lut_for_the_report_without_report_is_refused(store, tmp_path, invoke):
    assert invoke("fit", store, tmp_path / "l.zarr", "--no-progress").exit_code == 0
    _refused(invoke("evaluate", store, "--lut", tmp_path / "l.zarr", "--no-progress"), "--lut", "applies to --report only")
    with pytest.raises(ensir_flow.api.UsageError, match="applies to --report only"):
        ensir_flow.evaluate(store, lut=tmp_path / "l.zarr", progress=False)
