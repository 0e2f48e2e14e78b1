"""Many-model ensembles (issue 13): fit and apply as K grows, on the same synthetic pixels.

    python benchmarks/many_models.py [--megapixels 4] [--memory-megapixels 1,2] [--out results.json]
    python benchmarks/many_models.py --only kernels [--megapixels 2.0736] [--repeats 5]
    python benchmarks/many_models.py --write-corpus DIR [--kind samples|models] [--members 8] [--images 6] [--size 256]

Three groups of figures, on `benchmarks/run.py`'s synthetic corpus (full-HD frames of smooth
waves and edges; each model = truth + its own bias, gain error and noise, plus noise shared by
all models):

- fit at K = 3 and K = 8 (bin width 32) on the same frames, dask's threaded scheduler, best of
  --runs: seconds and their ratio (issue 13's target: K = 8 at most 3x K = 3); and the `fit`
  command's wall time at both on the issue's own corpus (6 images of 256 x 256), as it measured.
- the blend kernel alone, one call on one in-memory chunk (numba runs it on one core), with each
  lookup table that applies (`lut.Lut.lookup_table` chooses by size: dense, indexed, hashed): K = 3
  at w = 32 and K = 5 at w = 16 (all three), K = 8 at w = 32 (indexed, hashed), K = 16 at w = 16
  (hashed) (target: K = 8 >= 40 Mpx/s per core).
- peak resident memory (VmHWM) of `fit` and of `apply` at K = 16, w = 16, each in a fresh
  process on the threaded scheduler (one process = one worker), for each --memory-megapixels
  (target: under 1.5 GB at 10 Mpx), with the number of cells and stored bins.

On a shared machine every figure is inflated by the other processes: compare the ratios of one run.

`--only kernels` gives the kernel figures alone, in seconds: they take one chunk of each corpus,
generated in memory, so no store is written and nothing is fitted with dask.

`--write-corpus` writes a PNG corpus for `ingest` instead (gt/ and one folder per member): `models`
as above, or `samples`, N samples of one stochastic restorer: truth plus independent noise of one
level (--sigma) per sample, no bias, nothing shared (the README's worked example).
"""

import argparse
import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ensir_flow import schema, stats
from ensir_flow.binning import flat_bins_of_digits, words_of_digits
from ensir_flow.blend import INDEXED_BINS_LIMIT, HashedWeights, IndexedWeights, blend, weights_with_fallback
from ensir_flow.lut import fit_lut
from ensir_flow.pipelines.apply import plan_apply
from ensir_flow.pipelines.executor import threaded_compute
from ensir_flow.pipelines.fit import plan_fit
from ensir_flow.pipelines.lut_io import read_lut

sys.path.insert(0, str(Path(__file__).parent))
from run import SyntheticCorpus, best_time  # noqa: E402  (benchmarks/ is not a package)

CHUNK_PIXELS = schema.DEFAULT_CHUNK_PIXELS
#: The (K, bin width) of the kernel figures, and the K of the corpora they need.
KERNEL_CASES = ((3, 32), (5, 16), (8, 32), (16, 16))
KERNEL_MODELS = tuple(n_models for n_models, _ in KERNEL_CASES)


def _blend_into(outputs: dict, kind: str, predictions, table, bin_width: int) -> None:
    outputs[kind] = blend(predictions, table, bin_width)


def write_corpus(path: Path, megapixels: float, n_models: int, seed: int) -> SyntheticCorpus:
    """A reference store of `megapixels` with K models (the same ground truth for every K)."""
    corpus = SyntheticCorpus.of_size(megapixels, n_models, seed)
    corpus.write_store(path, CHUNK_PIXELS, schema.DEFAULT_COMPRESSION)
    return corpus


def write_png_corpus(root: Path, kind: str, n_members: int, n_images: int, size: int, sigma: float, seed: int) -> None:
    """`n_images` square frames of `size` px as PNG folders: distinct `models`, or `samples` of one
    stochastic model (independent noise of level `sigma` per sample, members named s01..)."""
    corpus = SyntheticCorpus.of_size(n_images * size * size / 1e6, n_members, seed)
    index = schema.ImageIndex([f"img{i:03d}" for i in range(n_images)], np.full(n_images, size), np.full(n_images, size))
    corpus = dataclasses.replace(corpus, index=index)
    if kind == "samples":
        corpus = dataclasses.replace(
            corpus,
            models=[f"s{k + 1:02d}" for k in range(n_members)],
            shared_sigma=0.0,
            bias=np.zeros(n_members, np.float32),
            slope=np.zeros(n_members, np.float32),
            sigma=np.full(n_members, sigma, np.float32),
        )
    corpus.write_png_folders(root)


def fit_seconds(store: Path, lut: Path, bin_width: int, runs: int) -> float:
    """Best wall time of `fit` (statistics pass, solver, LUT write) on the threaded scheduler."""
    times = []
    for _ in range(runs):
        plan = plan_fit(str(store), str(lut), bin_width, device="cpu", overwrite=True)
        start = time.perf_counter()
        plan.run(threaded_compute)
        times.append(time.perf_counter() - start)
    return min(times)


def kernel_rows(corpus_by_k: dict, repeats: int) -> list[dict]:
    """Blend-kernel throughput (Mpx/s, one core) of one chunk, with each lookup table that applies
    (dense, indexed, hashed): per second of wall time and per second of the thread's CPU time (numba
    runs the kernel on the calling thread, so the latter is its cost per core, whatever else loads
    the machine)."""
    rows = []
    for n_models, bin_width in KERNEL_CASES:
        pixels = corpus_by_k[n_models].pixels(0, min(CHUNK_PIXELS, corpus_by_k[n_models].index.n_pixels))
        predictions, truth = np.ascontiguousarray(pixels[:-1]), pixels[-1]
        lut = fit_lut(stats.chunk_statistics(predictions, truth, bin_width), corpus_by_k[n_models].models, solver="average")
        stored = weights_with_fallback(lut.bin_weights, lut.fallback)
        tables = {"hashed": HashedWeights.of(words_of_digits(lut.bin_digits, bin_width), stored, n_models, bin_width)}
        if lut.n_bins <= INDEXED_BINS_LIMIT:
            tables["indexed"] = IndexedWeights(flat_bins_of_digits(lut.bin_digits, bin_width), stored, n_models, bin_width)
        if lut.is_small:
            tables["dense"] = lut.weights
        chosen = lut.lookup_table()
        outputs = {}
        for kind, table in tables.items():
            blend(predictions[:, :100], table, bin_width)  # compile or load the kernel first, build an index
            run = functools.partial(_blend_into, outputs, kind, predictions, table, bin_width)
            seconds, cpu_seconds = best_time(run, repeats), best_time(run, repeats, warm_up=False, clock=time.thread_time)
            rows.append(
                {
                    "K": n_models,
                    "bin_width": bin_width,
                    "table": kind,
                    "stored_bins": len(lut.bin_digits),
                    "chosen": type(table) is type(chosen),
                    "mpx_per_s": predictions.shape[1] / seconds / 1e6,
                    "mpx_per_cpu_s": predictions.shape[1] / cpu_seconds / 1e6,
                }
            )
        if any((output != outputs["hashed"]).any() for output in outputs.values()):
            raise RuntimeError(f"K = {n_models}: the lookup tables give different bytes")
    return rows


def print_kernel_rows(corpus_by_k: dict, repeats: int) -> list[dict]:
    """`kernel_rows`, each printed as one line."""
    rows = kernel_rows(corpus_by_k, repeats)
    for row in rows:
        print(
            f"blend kernel K = {row['K']:2d}, w = {row['bin_width']:3d}, {row['table']:7s} "
            f"({row['stored_bins']:,} stored bins{', chosen' if row['chosen'] else ''}): {row['mpx_per_s']:.1f} Mpx/s, "
            f"{row['mpx_per_cpu_s']:.1f} Mpx per CPU second"
        )
    return rows


def child(argv: list[str]) -> None:
    """In a fresh process: run `fit` or `apply` once, print JSON with seconds and VmHWM."""
    what, store, lut, out, bin_width = argv[0], argv[1], argv[2], argv[3], int(argv[4])
    start = time.perf_counter()
    if what == "fit":
        table = plan_fit(store, lut, bin_width, device="cpu", overwrite=True).run(threaded_compute)
        extra = {"cells_with_data": table.filled_cells, "stored_bins": len(table.bin_digits)}
    else:
        plan_apply(store, lut, out, device="cpu", overwrite=True).run(threaded_compute)
        extra = {}
    seconds = time.perf_counter() - start
    status = Path("/proc/self/status").read_text()
    peak_kib = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
    print(json.dumps({"step": what, "seconds": seconds, "peak_mib": peak_kib / 1024, **extra}))


def command_fit_seconds(workdir: Path, runs: int, seed: int) -> dict[int, float]:
    """Wall time of the `ensir-flow fit` command (a fresh process: start-up, statistics, EM, the LUT
    written), best of `runs`, at K = 3 and K = 8 (w = 32) on the same pixels: issue 13's own corpus
    (6 images of 256 x 256, distinct models), K = 3 being its first three members."""
    corpus = workdir / "command-corpus"
    write_png_corpus(corpus, "models", 8, 6, 256, 10.0, seed)
    members = sorted(path.name for path in corpus.iterdir() if path.name != "gt")
    seconds = {}
    for n_models in (3, 8):
        folders = workdir / f"command-k{n_models}"
        folders.mkdir()
        for name in ("gt", *members[:n_models]):
            (folders / name).symlink_to(corpus / name)
        store, lut = workdir / f"command-k{n_models}.zarr", workdir / f"command-lut{n_models}.zarr"
        ensir_flow = [sys.executable, "-m", "ensir_flow"]
        subprocess.run([*ensir_flow, "ingest", str(folders), str(store), "--no-progress"], capture_output=True, check=True)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            subprocess.run(
                [*ensir_flow, "fit", str(store), str(lut), "--overwrite", "--no-progress"], capture_output=True, check=True
            )
            times.append(time.perf_counter() - start)
        seconds[n_models] = min(times)
    return seconds


def memory_rows(workdir: Path, sizes: list[float], seed: int) -> list[dict]:
    """Peak RSS of fit and apply at K = 16, w = 16, each size in its own processes."""
    rows = []
    for megapixels in sizes:
        store, lut, out = workdir / f"k16-{megapixels}.zarr", workdir / "k16-lut.zarr", workdir / "k16-out.zarr"
        write_corpus(store, megapixels, 16, seed)
        for what in ("fit", "apply"):
            shutil.rmtree(out, ignore_errors=True)
            result = subprocess.run(
                [sys.executable, __file__, "--child", what, str(store), str(lut), str(out), "16"],
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append({"megapixels": megapixels, **json.loads(result.stdout.strip().splitlines()[-1])})
            print(f"  K = 16, w = 16, {megapixels} Mpx, {what}: {rows[-1]}", file=sys.stderr)
        shutil.rmtree(store)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megapixels", type=float, default=4.0, help="corpus size for the fit ratio and the kernels")
    parser.add_argument("--memory-megapixels", default="1,2", help="corpus sizes for the K = 16 memory figures")
    parser.add_argument("--runs", type=int, default=2, help="fit timings: best of this many runs")
    parser.add_argument("--repeats", type=int, default=3, help="kernel timings: best of this many calls")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the figures as JSON to this file")
    parser.add_argument("--write-corpus", type=Path, metavar="DIR", help="write a PNG corpus to DIR and stop")
    parser.add_argument("--kind", choices=("samples", "models"), default="samples", help="--write-corpus: what the members are")
    parser.add_argument("--members", type=int, default=8, help="--write-corpus: number of members K")
    parser.add_argument("--images", type=int, default=6, help="--write-corpus: number of images")
    parser.add_argument("--size", type=int, default=256, help="--write-corpus: image side in pixels")
    parser.add_argument("--sigma", type=float, default=10.0, help="--write-corpus: noise level of each sample")
    parser.add_argument("--only", choices=("kernels",), help="run only this group of figures")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child)
    if args.write_corpus:
        return write_png_corpus(args.write_corpus, args.kind, args.members, args.images, args.size, args.sigma, args.seed)
    if args.only == "kernels":
        kernels = print_kernel_rows(
            {k: SyntheticCorpus.of_size(args.megapixels, k, args.seed) for k in KERNEL_MODELS}, args.repeats
        )
        if args.out:
            args.out.write_text(
                json.dumps({"machine": {"cpus": os.cpu_count()}, "megapixels": args.megapixels, "kernels": kernels}, indent=2)
            )
        return
    workdir = Path(tempfile.mkdtemp(prefix="ensir-many-models-"))
    try:
        corpora, fits = {}, {}
        for n_models in KERNEL_MODELS:
            store = workdir / f"k{n_models}.zarr"
            corpora[n_models] = write_corpus(store, args.megapixels, n_models, args.seed)
            if n_models in (3, 8):
                fits[n_models] = fit_seconds(store, workdir / f"lut{n_models}.zarr", 32, args.runs)
                lut = read_lut(str(workdir / f"lut{n_models}.zarr"))
                print(
                    f"fit K = {n_models}, w = 32, {args.megapixels} Mpx: {fits[n_models]:.2f} s, "
                    f"{lut.filled_cells:,} cells with data in {len(lut.bin_digits):,} stored bins",
                    file=sys.stderr,
                )
        print(f"fit K = 8 / K = 3: {fits[8] / fits[3]:.2f}x (target <= 3)")
        commands = command_fit_seconds(workdir, args.runs, args.seed)
        print(
            f"the fit command on issue 13's corpus (6 images of 256 x 256): K = 3 {commands[3]:.2f} s, "
            f"K = 8 {commands[8]:.2f} s: {commands[8] / commands[3]:.2f}x"
        )
        kernels = print_kernel_rows(corpora, args.repeats)
        memory = memory_rows(workdir, [float(s) for s in args.memory_megapixels.split(",")], args.seed)
        for row in memory:
            print(
                f"K = 16, w = 16, {row['megapixels']} Mpx, {row['step']}: {row['seconds']:.1f} s, peak {row['peak_mib']:.0f} MiB"
                + (f", {row['cells_with_data']:,} cells in {row['stored_bins']:,} stored bins" if "stored_bins" in row else "")
            )
        figures = {
            "machine": {"cpus": os.cpu_count()},
            "megapixels": args.megapixels,
            "fit_seconds": {str(k): v for k, v in fits.items()},
            "fit_ratio_k8_k3": fits[8] / fits[3],
            "fit_command_seconds": {str(k): v for k, v in commands.items()},
            "kernels": kernels,
            "memory": memory,
        }
        if args.out:
            args.out.write_text(json.dumps(figures, indent=2))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
