"""Helpers the tests share: where the reference data lies, small synthetic corpora, a whole workflow run."""

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np

from ensir_flow.binning import flat_bins_of_edges

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "ensir-reference"


def make_corpus(
    root: Path,
    n_models: int = 3,
    sizes=((24, 32), (17, 29), (40, 21)),
    seed: int = 0,
    with_gt: bool = True,
    channels: int = 3,
    inputs_scale: int | None = None,
) -> list[str]:
    """Write a corpus: smooth ground truth, each model = truth + its own bias and noise level;
    with `inputs_scale`, also lq/ inputs (truth plus strong noise), downscaled by that factor."""
    rng = np.random.default_rng(seed)
    models = [f"model{k}" for k in range(n_models)]
    for folder in (["gt"] if with_gt else []) + models:
        (root / folder).mkdir(parents=True)
    for i, (h, w) in enumerate(sizes):
        yy, xx = np.mgrid[0:h, 0:w]
        base = 127 + 100 * np.sin(xx / 5.0 + i)[..., None] * np.cos(yy / 7.0)[..., None] + rng.normal(0, 10, (h, w, channels))
        truth = np.clip(base, 0, 255)
        if with_gt:
            iio.imwrite(root / "gt" / f"img{i}.png", _squeeze(truth.astype(np.uint8)))
        if inputs_scale is not None:
            (root / "lq").mkdir(exist_ok=True)
            degraded = np.clip(truth + rng.normal(0, 25, truth.shape), 0, 255)[::inputs_scale, ::inputs_scale]
            iio.imwrite(root / "lq" / f"img{i}.png", _squeeze(np.rint(degraded).astype(np.uint8)))
        for k, model in enumerate(models):
            pred = truth + 3 * (k - 1) + rng.normal(0, 4 + 3 * k, truth.shape)
            iio.imwrite(root / model / f"img{i}.png", _squeeze(np.clip(np.rint(pred), 0, 255).astype(np.uint8)))
    return models


def cell_ids(predictions: np.ndarray, bin_width: int) -> np.ndarray:
    """Cell b * C + c of every pixel-channel of predictions (K, P, C), pixel-major, in numpy: a
    reference for the kernels, which key cells on the fly."""
    n_models, n_pixels, n_channels = predictions.shape
    bins = flat_bins_of_edges(predictions.reshape(n_models, -1).T.astype(np.int64), bin_width)
    return bins * n_channels + np.tile(np.arange(n_channels), n_pixels)


def _squeeze(image):
    return image[:, :, 0] if image.shape[2] == 1 else image


def run_workflow(invoke, root, base, bin_width: int = 32) -> dict:
    """ingest, fit, apply (with PNG export) and evaluate under `base` (a folder or URL); returns the
    evaluation JSON. Every step must succeed."""
    base = str(base)
    for args in (
        ["ingest", root, f"{base}/s.zarr"],
        ["fit", f"{base}/s.zarr", f"{base}/lut.zarr", "--bin-width", bin_width],
        ["apply", f"{base}/s.zarr", f"{base}/lut.zarr", f"{base}/out.zarr", "--export-dir", f"{base}/png"],
        ["evaluate", f"{base}/s.zarr", "--ensemble", f"{base}/out.zarr", "--json"],
    ):
        result = invoke(*args, "--no-progress")
        assert result.exit_code == 0, result.output
    evaluation = json.loads(result.stdout)
    evaluation.pop("seconds")  # how long it took, not what it found
    return evaluation


def modules_imported_by(code: str) -> set[str]:
    """The modules loaded after running `code` in a fresh interpreter (which must exit 0): how tests
    check that a path stays light, e.g. never imports torch."""
    done = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


#: Store attributes that name one write of a store (made at each commit), not what it holds.
IDENTITY_ATTRIBUTES = ("store_id", "generation")


def contents(path):
    """A store's variables and attributes, loaded, without the identity of the write that made it:
    what two writes of the same data must agree on."""
    import xarray as xr

    ds = xr.open_zarr(path).load()
    ds.attrs = {key: value for key, value in ds.attrs.items() if key not in IDENTITY_ATTRIBUTES}
    return ds


def without_checksums(store: Path) -> None:
    """Make `store` as ensir-flow wrote stores before chunk checksums and store identities."""
    import shutil

    from ensir_flow.pipelines.integrity import CHECKSUM_TAIL, CHUNK_CHECKSUMS

    shutil.rmtree(store / CHUNK_CHECKSUMS, ignore_errors=True)
    document = json.loads((store / "zarr.json").read_text())
    for key in (CHECKSUM_TAIL, "store_id", "generation"):
        document["attributes"].pop(key, None)
    document["consolidated_metadata"]["metadata"].pop(CHUNK_CHECKSUMS, None)
    (store / "zarr.json").write_text(json.dumps(document))


def export(module, channels: int = 3, dynamic: bool = True):
    """`module` as a `torch.export` program for batches of any count and image size (`dynamic`),
    or for (1, channels, 24, 24) alone."""
    import torch

    sizes = {0: torch.export.Dim("n"), 2: torch.export.Dim("h", min=4), 3: torch.export.Dim("w", min=4)}
    example = torch.rand(2 if dynamic else 1, channels, 24, 24)
    return torch.export.export(module.eval(), (example,), dynamic_shapes=(sizes,) if dynamic else None)


def save_export(module, path, channels: int = 3, dynamic: bool = True) -> Path:
    """`module` saved as a `torch.export` program (`.pt2`) at `path` (see `export`)."""
    import torch

    torch.export.save(export(module, channels, dynamic), str(path))
    return Path(path)


def one_line_refusal(result, *fragments) -> str:
    """The message of a CLI run (click's Result) refused with exit 1 in one line, no traceback,
    holding every one of `fragments`."""
    assert result.exit_code == 1, result.output
    message = result.stderr.strip()
    assert "\n" not in message and "Traceback" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


@contextlib.contextmanager
def s3_server(monkeypatch, bucket: str = "ensir-test"):
    """An S3-compatible server (moto) on 127.0.0.1 with `bucket`, the environment pointing
    s3fs at it; yields the s3fs filesystem. moto keeps its buckets per process, so the bucket
    may already be there from an earlier test."""
    import pytest

    moto_server = pytest.importorskip("moto.server", reason="moto[server] is a test dependency (pip install -e '.[test]')")
    s3fs = pytest.importorskip("s3fs", reason="s3fs is a test dependency (pip install -e '.[test]')")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for name, value in {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    try:
        yield fs
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()
