"""The user's job end to end on PNG folders: ingest, fit, apply with export, evaluate, each against
its own bound measured in the same run on the same frames.

    python benchmarks/end_to_end.py [SOURCE_DIR] [--config configs/deblurring-gopro.yaml] [--runs 2] [--out results.json]
                                    [--compare-with DIR]

SOURCE_DIR (default: the GoPro reference set in ../shared/data/ensir-reference/deblurring) holds
gt/ and one folder per model, as `ingest` expects. Each command runs as a user runs it: a fresh
`ensir-flow ... --scheduler threads --json` process, timed from outside (wall), its stages timed
inside (the `seconds` of its JSON); `start-up` is the difference: the interpreter, imports, option
parsing, opening stores. numba's kernels load from their cache inside the first stage that runs
them (with numba's CPU target, ~0.7 s on the first), so that is counted as work.

Bounds, on the same frames, in this process, with as many threads as the scheduler has:
- ingest: decoding every PNG ingest reads (K predictions, ground truth, inputs), each file once;
- fit: reading the store's K+1 planes once (one task per chunk);
- apply: reading the predictions once; export: encoding the output PNGs at the level asked, one
  thread (ensir-flow's encoder) and Pillow at level 1 on one thread (the export's target);
- evaluate: reading the series it scores once (predictions, ground truth, ensemble).
Two start-up references: the CLI alone (`ensir-flow --version`: interpreter and imports) and
importing torch in a fresh interpreter. `evaluate kernels` compares, on the first frames, `metrics.scores` with the SSIM
evaluate used
before (scikit-image per candidate and channel, plus PSNR per candidate).

`--compare-with DIR` runs the same job with another ensir_flow package (e.g. an older commit's
`ensir_flow/` with `pipelines/` inside it and `cli.py` as `ensir_flow/cli.py`), in turns with
this checkout, and prints the wall and CPU seconds of each command for both.

Every figure is the best of `--runs` runs (the host is shared: the fastest run is the one other
jobs disturbed least). Tables to stdout, the same figures as JSON to --out.
"""

import argparse
import functools
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dask
import numpy as np

from ensir_flow import metrics, schema
from ensir_flow.blend import average, zzpm
from ensir_flow.images import encode_png
from ensir_flow.pipelines.stores import open_store

sys.path.insert(0, str(Path(__file__).parent))
from run import best_time  # noqa: E402  (benchmarks/ is not a package)

REPOSITORY = Path(__file__).resolve().parent.parent
REFERENCE = REPOSITORY.parent / "shared" / "data" / "ensir-reference" / "deblurring"
CONFIG = REPOSITORY / "configs" / "deblurring-gopro.yaml"
ENSIR_FLOW = Path(sys.executable).with_name("ensir-flow")


def run_command(args: list, config: Path, pythonpath: Path | None = None) -> tuple[float, float, dict]:
    """Run `ensir-flow --config CONFIG ARGS --scheduler threads --no-progress --json` (with the
    ensir_flow package of `pythonpath` if given); (wall s, CPU s of the process, its JSON)."""
    command = [str(ENSIR_FLOW), "--config", str(config), *map(str, args), "--scheduler", "threads", "--no-progress", "--json"]
    env = dict(os.environ, PYTHONPATH=str(pythonpath)) if pythonpath else None
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr.strip()}")
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return wall, cpu, json.loads(done.stdout)


def best_command(runs: int, args: list, config: Path, before=lambda: None) -> tuple[float, dict]:
    """(wall s, seconds per stage) of the fastest of `runs` runs, `before` called before each (to clear outputs)."""
    results = []
    for _ in range(runs):
        before()
        results.append(run_command(args, config))
    wall, _, report = min(results, key=lambda result: result[0])
    return wall, report["seconds"]


def compare_checkouts(other: Path, source: Path, config: Path, runs: int, work: Path) -> list[dict]:
    """The user's job (ingest, fit, apply, apply --export-dir, evaluate) with this checkout and with
    the ensir_flow package in `other` (e.g. an older commit's files), taking turns run by run so that
    the host's load falls on both alike; best wall and best CPU seconds of each command."""
    variants = {"this checkout": None, f"{other}": other}
    best_of: dict = {}
    for _ in range(runs):
        for name, pythonpath in variants.items():
            folder = work / ("this" if pythonpath is None else "other")
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            store, lut, output = folder / "ref.zarr", folder / "lut.zarr", folder / "out.zarr"
            commands = {
                "ingest": ["ingest", source, store],
                "fit": ["fit", store, lut],
                "apply": ["apply", store, lut, output],
                "apply --export-dir": ["apply", store, lut, folder / "out2.zarr", "--export-dir", folder / "png"],
                "evaluate --ensemble": ["evaluate", store, "--ensemble", output],
            }
            for command, args in commands.items():
                wall, cpu, _ = run_command(args, config, pythonpath)
                previous = best_of.get((command, name), (float("inf"), float("inf")))
                best_of[command, name] = (min(previous[0], wall), min(previous[1], cpu))
    rows = []
    for command in dict.fromkeys(command for command, _ in best_of):
        (wall, cpu), (other_wall, other_cpu) = best_of[command, "this checkout"], best_of[command, str(other)]
        rows.append({"command": command, "wall_s": wall, "cpu_s": cpu, "other_wall_s": other_wall, "other_cpu_s": other_cpu})
    return rows


def decode_bound(files: list[Path], threads: int) -> None:
    """Decode every file once (as ingest does: imageio, Pillow) on `threads` threads."""
    import imageio.v3 as iio

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(iio.imread, files))


def read_bound(arrays: list) -> None:
    """Read dask arrays of a store once, one task per chunk, on the threaded scheduler."""
    dask.compute(*[array.sum(dtype=np.uint64) for array in arrays], scheduler="threads")


def images_of(ds, variable: str) -> list[np.ndarray]:
    index = schema.ImageIndex.from_dataset(ds)
    values = ds[variable].values
    return [
        values[..., o : o + n, :].reshape(*values.shape[:-2], h, w, -1)
        for h, w, o, n in zip(index.heights, index.widths, index.offsets, index.counts)
    ]


def skimage_scores(images, reference) -> None:
    """What evaluate computed per image before `metrics.scores`: scikit-image's SSIM per candidate
    and channel (BasicSR's settings) and a float64 PSNR per candidate."""
    from skimage.metrics import structural_similarity

    truth = reference.astype(np.float64)
    for image in images:
        candidate = image.astype(np.float64)
        np.mean((candidate - truth) ** 2)
        for c in range(truth.shape[2]):
            structural_similarity(
                candidate[:, :, c],
                truth[:, :, c],
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
                data_range=255.0,
            )


def print_table(rows: list[dict]) -> None:
    header = f"{'step':<34}  {'wall s':>6}  {'start-up':>8}  {'work s':>6}  {'Mpx/s':>6}  {'bound s':>7}  {'x bound':>7}"
    print(header)
    print("-" * len(header))
    for row in rows:
        work = row.get("work_s")
        bound = row.get("bound_s")
        print(
            f"{row['step']:<34}  {row['wall_s']:6.2f}  {row.get('startup_s', float('nan')):8.2f}  "
            f"{work if work is not None else float('nan'):6.2f}  {row['megapixels'] / (work or row['wall_s']):6.1f}  "
            f"{bound if bound is not None else float('nan'):7.2f}  "
            f"{(work or row['wall_s']) / bound if bound else float('nan'):7.2f}"
        )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, nargs="?", default=REFERENCE, help="corpus folder (gt/ and one folder per model)")
    parser.add_argument("--config", type=Path, default=CONFIG, help="task config passed to every command")
    parser.add_argument("--png-compression", type=int, default=1, help="zlib level of the exported PNGs")
    parser.add_argument("--runs", type=int, default=2, help="best of this many runs of each step")
    parser.add_argument("--kernel-frames", type=int, default=2, help="frames for the evaluate-kernel comparison")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON to this file")
    parser.add_argument(
        "--compare-with",
        type=Path,
        metavar="DIR",
        help="also run the job with the ensir_flow package in DIR (put first on PYTHONPATH), in turns",
    )
    args = parser.parse_args(argv)
    if not args.source.is_dir():
        raise SystemExit(f"{args.source}: corpus folder not found")
    threads = os.cpu_count()
    work = Path(tempfile.mkdtemp(prefix="ensir-e2e-"))
    try:
        store, lut, output, pngs = work / "ref.zarr", work / "lut.zarr", work / "out.zarr", work / "png"
        remove = lambda *paths: [shutil.rmtree(p, ignore_errors=True) for p in paths]  # noqa: E731
        rows = []

        ingest = best_command(args.runs, ["ingest", args.source, store], args.config, lambda: remove(store))
        ds = open_store(store)
        megapixels = ds.sizes["pixel"] / 1e6
        roles = [str(role) for role in ds["source"].values]
        files = [args.source / role / name for role, names in zip(roles, ds["source_file"].values) for name in names]
        rows.append(
            {
                "step": f"ingest ({len(roles)} PNGs per frame)",
                "wall_s": ingest[0],
                "work_s": sum(ingest[1].values()),
                "megapixels": megapixels * len(roles),
                "bound_s": best_time(lambda: decode_bound(files, threads), args.runs, warm_up=False),
            }
        )

        fit = best_command(args.runs, ["fit", store, lut], args.config, lambda: remove(lut))
        planes = [ds[schema.PREDICTION].data, ds[schema.GROUND_TRUTH].data]
        rows.append(
            {
                "step": "fit",
                "wall_s": fit[0],
                "work_s": sum(fit[1].values()),
                "megapixels": megapixels * (len(roles) - 1),
                "bound_s": best_time(lambda: read_bound(planes), args.runs, warm_up=False),
            }
        )

        apply = best_command(args.runs, ["apply", store, lut, output], args.config, lambda: remove(output))
        rows.append(
            {
                "step": "apply",
                "wall_s": apply[0],
                "work_s": sum(apply[1].values()),
                "megapixels": megapixels,
                "bound_s": best_time(lambda: read_bound([ds[schema.PREDICTION].data]), args.runs, warm_up=False),
            }
        )
        with_export = best_command(
            args.runs,
            ["apply", store, lut, output, "--export-dir", pngs, "--png-compression", args.png_compression],
            args.config,
            lambda: remove(output, pngs),
        )
        frames = images_of(open_store(output), schema.ENSEMBLE)
        ours = best_time(lambda: [encode_png(frame, None, args.png_compression) for frame in frames], args.runs, warm_up=False)

        def pillow_level_1():
            from PIL import Image

            for frame in frames:
                Image.fromarray(frame).save(io.BytesIO(), format="PNG", compress_level=1)

        pillow = best_time(pillow_level_1, args.runs, warm_up=False)

        def imageio_default():  # what export wrote with before --png-compression
            import imageio.v3 as iio

            for frame in frames:
                iio.imwrite("<bytes>", frame, extension=".png")

        before_export = best_time(imageio_default, 1, warm_up=False)
        rows.append(
            {
                "step": f"apply --export-dir (level {args.png_compression})",
                "wall_s": with_export[0],
                "work_s": sum(with_export[1].values()),
                "megapixels": megapixels,
                "bound_s": None,
            }
        )
        rows.append(
            {
                "step": "  of which export",
                "wall_s": with_export[1]["export"],
                "megapixels": megapixels,
                "bound_s": pillow,
                "note": "bound: Pillow level 1, one thread",
            }
        )
        rows.append(
            {"step": f"  bound: encode_png level {args.png_compression}, 1 thread", "wall_s": ours, "megapixels": megapixels}
        )
        rows.append({"step": "  bound: Pillow level 1, 1 thread", "wall_s": pillow, "megapixels": megapixels})
        rows.append({"step": "  before: imageio's default, 1 thread", "wall_s": before_export, "megapixels": megapixels})

        evaluate = best_command(args.runs, ["evaluate", store, "--ensemble", output], args.config)
        ensemble = open_store(output)[schema.ENSEMBLE].data
        rows.append(
            {
                "step": "evaluate --ensemble",
                "wall_s": evaluate[0],
                "work_s": sum(evaluate[1].values()),
                "megapixels": megapixels,
                "bound_s": best_time(lambda: read_bound([*planes, ensemble]), args.runs, warm_up=False),
            }
        )

        truths = images_of(ds, schema.GROUND_TRUTH)[: args.kernel_frames]
        predictions = images_of(ds, schema.PREDICTION)
        candidates = [[*predictions[i], average(predictions[i]), zzpm(predictions[i]), frames[i]] for i in range(len(truths))]
        kernel_mpx = sum(t.shape[0] * t.shape[1] for t in truths) / 1e6
        metrics.scores(candidates[0][:1], truths[0])  # load the numba kernels before timing
        fused = best_time(lambda: [metrics.scores(c, t) for c, t in zip(candidates, truths)], args.runs, warm_up=False)
        before = best_time(lambda: [skimage_scores(c, t) for c, t in zip(candidates, truths)], 1, warm_up=False)
        rows.append(
            {"step": f"evaluate kernels, {len(truths)} frames x {len(candidates[0])}", "wall_s": fused, "megapixels": kernel_mpx}
        )
        rows.append({"step": "  before: scikit-image SSIM", "wall_s": before, "megapixels": kernel_mpx})

        for name, command in (
            ("start-up: ensir-flow --version", [str(ENSIR_FLOW), "--version"]),
            ("start-up: python -c 'import torch'", [sys.executable, "-c", "import torch"]),
        ):
            rows.append(
                {
                    "step": name,
                    "wall_s": best_time(
                        functools.partial(subprocess.run, command, capture_output=True, check=True), args.runs, warm_up=False
                    ),
                    "megapixels": float("nan"),
                }
            )

        for row in rows:
            if "work_s" in row:
                row["startup_s"] = row["wall_s"] - row["work_s"]
        print(
            f"ensir-flow end to end on {args.source} ({ds.sizes['image']} frames, {megapixels:.1f} Mpx; K = "
            f"{ds.sizes['model']}), --scheduler threads, {threads} threads; best of {args.runs}; "
            f"Mpx = million pixels of the images processed (all files for ingest); x bound = work / bound"
        )
        print_table(rows)
        print(
            f"evaluate kernels: metrics.scores {before / fused:.1f}x faster than scikit-image's SSIM; export "
            f"{rows[4]['wall_s'] / pillow:.2f}x Pillow level 1 on one thread"
        )
        comparison = compare_checkouts(args.compare_with, args.source, args.config, args.runs, work) if args.compare_with else []
        if comparison:
            print(
                f"\nthe same job, this checkout against {args.compare_with}, in turns; best of {args.runs}; CPU = user + system "
                f"seconds of the command's process (steadier than wall time on a shared host)"
            )
            print(
                f"{'command':<20}  {'wall s':>6}  {'CPU s':>6}  {'other wall':>10}  {'other CPU':>9}  "
                f"{'wall ratio':>10}  {'CPU ratio':>9}"
            )
            for row in comparison:
                print(
                    f"{row['command']:<20}  {row['wall_s']:6.2f}  {row['cpu_s']:6.2f}  {row['other_wall_s']:10.2f}  "
                    f"{row['other_cpu_s']:9.2f}  {row['other_wall_s'] / row['wall_s']:10.2f}  "
                    f"{row['other_cpu_s'] / row['cpu_s']:9.2f}"
                )
        if args.out:
            args.out.write_text(
                json.dumps(
                    {
                        "source": str(args.source),
                        "frames": ds.sizes["image"],
                        "megapixels": megapixels,
                        "threads": threads,
                        "runs": args.runs,
                        "rows": rows,
                        "comparison": comparison,
                    },
                    indent=2,
                )
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
