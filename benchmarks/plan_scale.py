"""How the plans of fit and apply scale with the number of frames: planning time, client memory
and tasks per pass, on stores that hold metadata alone.

    python benchmarks/plan_scale.py [--frames 10000,100000,1000000] [--height 1080] [--width 1920]

For each N of --frames, a store of N frames of --height x --width (3 models and ground truth, RGB,
chunks of `schema.DEFAULT_CHUNK_PIXELS`) is made with its metadata only (`metadata_store`): every
array created with the shape, chunks, codecs and attributes `ingest` gives it, the per-image
variables written, and no pixel chunk (nor row of `chunk_xxh3`, which reads as zeros) written.
Planning never reads a pixel: a plan that did would fail. Then, each in a fresh process:

- s: the wall time of `plan_fit(store, lut)` or `plan_apply(store, lut, out)` and of the run up
  to the moment its first pass would go to the scheduler (fit's graph is built by its plan;
  apply writes its staging template and builds its graph in its run); the LUT is fitted once on
  a tiny real store with the same models and channels;
- MiB: the peak RSS of the process until then, less its RSS before (after the imports; Linux's
  VmHWM, reset by /proc/self/clear_refs);
- tasks: per stage of `plan.stages`, as `--dry-run` prints them, and (submitted) those of the
  graph of that first pass, optimised as dask does before running it;
- ok: whether each plan meets 60 s, 2 GiB and 10^5 tasks per pass.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from ensir_flow import schema
from ensir_flow.pipelines.integrity import CHECKSUMMED_VARIABLES, CHUNK_CHECKSUMS, new_identity
from ensir_flow.pipelines.zarr_adapter import commit_metadata

#: What each plan must stay within at any size.
MAX_SECONDS, MAX_MIB, MAX_TASKS = 60, 2048, 10**5


def metadata_store(
    path: str, n_frames: int, height: int, width: int, n_models: int = 3, chunk_pixels: int = schema.DEFAULT_CHUNK_PIXELS
) -> str:
    """A committed store of `n_frames` frames of `height` x `width` (RGB, `n_models` models and
    ground truth) in `ingest`'s layout, holding no pixel chunk: its arrays' metadata, the image
    index, source names and SHA-256s, and attributes with a store identity."""
    models, channels, n_pixels = [f"model{k}" for k in range(n_models)], 3, n_frames * height * width
    n_chunks = -(-n_pixels // chunk_pixels)
    group = zarr.open_group(str(path), mode="w-", zarr_format=3)
    compressors = schema.pixel_encoding((chunk_pixels, channels))["compressors"]

    def array(name, dims, shape, chunks, dtype, values=None, attrs=None):
        created = group.create_array(
            name,
            shape=shape,
            chunks=chunks,
            dtype=dtype,
            dimension_names=dims,
            attributes={**schema.VARIABLE_ATTRIBUTES.get(name, {}), **(attrs or {})},
            compressors=compressors if dtype == np.uint8 else "auto",
            fill_value="" if dtype is str else 0,
        )
        if values is not None:
            created[...] = values

    array(
        schema.PREDICTION,
        schema.PIXEL_DIMS[schema.PREDICTION],
        (n_models, n_pixels, channels),
        (n_models, chunk_pixels, channels),
        np.uint8,
    )
    array(schema.GROUND_TRUTH, schema.PIXEL_DIMS[schema.GROUND_TRUTH], (n_pixels, channels), (chunk_pixels, channels), np.uint8)
    array(
        CHUNK_CHECKSUMS,
        ("chunk", "pixel_variable"),
        (n_chunks, 2),
        (1, 2),
        np.uint64,
        attrs={CHECKSUMMED_VARIABLES: [schema.PREDICTION, schema.GROUND_TRUTH], "long_name": "XXH3-64 checksum"},
    )
    index = schema.ImageIndex([f"frame{i:07d}" for i in range(n_frames)], np.full(n_frames, height), np.full(n_frames, width))
    for name, values in (
        ("height", index.heights),
        ("width", index.widths),
        ("pixel_offset", index.offsets),
        ("pixel_count", index.counts),
    ):
        array(name, ("image",), (n_frames,), (n_frames,), np.int64, values.astype(np.int64))
    sources = ["gt", *models]
    for name, dims, values in (
        ("image", ("image",), np.array(index.stems)),
        ("model", ("model",), np.array(models)),
        ("channel", ("channel",), np.array(schema.channel_names(channels))),
        ("source", ("source",), np.array(sources)),
        ("source_file", ("source", "image"), np.array([[f"{stem}.png" for stem in index.stems]] * len(sources))),
        (
            "source_sha256",
            ("source", "image"),
            np.array([[f"{s:02x}{i:062x}" for i in range(n_frames)] for s in range(len(sources))]),
        ),
    ):
        array(name, dims, values.shape, values.shape, str, values)
    attrs = schema.store_attributes(
        models, channels, created_by="benchmarks/plan_scale.py", chunk_pixels=chunk_pixels, compression=schema.DEFAULT_COMPRESSION
    )
    commit_metadata(str(path), {**attrs, **new_identity()})
    return str(path)


def tiny_lut(folder: Path) -> str:
    """A LUT fitted on a tiny real store of 3 models and ground truth (RGB)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from ensir_flow.pipelines.fit import plan_fit
    from ensir_flow.pipelines.ingest import plan_ingest
    from helpers import make_corpus

    make_corpus(folder / "corpus")
    plan_ingest(str(folder / "corpus"), str(folder / "tiny.zarr"), chunk_pixels=700).run()
    plan_fit(str(folder / "tiny.zarr"), str(folder / "lut.zarr")).run()
    return str(folder / "lut.zarr")


def _status_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status (Linux reports kB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak_rss() -> float:
    """Start measuring the peak RSS from now (Linux: `clear_refs` 5 resets VmHWM); the RSS now."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mib("VmRSS")


def peak_rss_mib() -> float:
    """Peak RSS of this process since `reset_peak_rss`."""
    return _status_mib("VmHWM")


class _FirstPass(Exception):
    """Raised by `measure`'s compute when it is handed the run's first pass."""


def measure(which: str, store: str, lut: str, out: str) -> dict:
    """In a fresh process: plan `which` ('fit' or 'apply') and run it up to its first pass (what
    the client does before the scheduler gets a task: apply builds its graph and staging there);
    report the time and memory that took, the plan's stages and the tasks of that pass."""
    from ensir_flow.pipelines.apply import plan_apply
    from ensir_flow.pipelines.fit import plan_fit
    from ensir_flow.pipelines.plan import task_count

    result = {}

    def first_pass(*collections, label=""):
        result.update(seconds=time.perf_counter() - started, mib=peak_rss_mib() - before, label=label)
        result["submitted"] = task_count(*collections)
        raise _FirstPass

    before, started = reset_peak_rss(), time.perf_counter()
    plan = plan_fit(store, out) if which == "fit" else plan_apply(store, lut, out)
    result["stages"] = {stage.name: stage.tasks for stage in plan.stages}
    try:
        plan.run(first_pass)
    except _FirstPass:
        pass
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", default="10000,100000,1000000", help="comma-separated numbers of frames")
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--measure", nargs=4, metavar=("WHICH", "STORE", "LUT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    folder = Path(tempfile.mkdtemp(prefix="plan-scale-"))
    try:
        lut = tiny_lut(folder)
        print(f"{'frames':>9} {'chunks':>9} {'plan':>5} {'s':>7} {'MiB':>7}  tasks per stage  ok")
        for n_frames in map(int, args.frames.split(",")):
            store = folder / f"{n_frames}.zarr"
            metadata_store(str(store), n_frames, args.height, args.width)
            n_chunks = -(-n_frames * args.height * args.width // schema.DEFAULT_CHUNK_PIXELS)
            for which in ("fit", "apply"):
                out = folder / f"{which}-{n_frames}.zarr"
                run = subprocess.run(
                    [sys.executable, __file__, "--measure", which, str(store), lut, str(out)], capture_output=True, text=True
                )
                if run.returncode:
                    print(f"{n_frames:>9,} {n_chunks:>9,} {which:>5} failed: {run.stderr.strip().splitlines()[-1:]}")
                    continue
                result = json.loads(run.stdout.strip().splitlines()[-1])
                tasks = result["stages"]
                most = max([*tasks.values(), result.get("submitted", 0)])
                ok = result["seconds"] <= MAX_SECONDS and result["mib"] <= MAX_MIB and most <= MAX_TASKS
                print(
                    f"{n_frames:>9,} {n_chunks:>9,} {which:>5} {result['seconds']:>7.1f} {result['mib']:>7.0f}  "
                    f"{', '.join(f'{name}: {count:,}' for name, count in tasks.items())}; "
                    f"submitted ({result.get('label')}): {result.get('submitted', 0):,}  {'yes' if ok else 'NO'}",
                    flush=True,
                )
            shutil.rmtree(store)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
