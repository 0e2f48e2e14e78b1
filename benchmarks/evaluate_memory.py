"""Peak memory of `ensir-flow evaluate` on one large image.

    python benchmarks/evaluate_memory.py                       # one 12000 x 12000 RGB image, K = 3
    python benchmarks/evaluate_memory.py --height 4000 --width 3000 --models 8 --y-channel --limit-gib 2

A synthetic reference store holding a single image (run.py's generator: ground truth and K
predictions, written chunk by chunk, so this process never holds the image) is scored by
`ensir-flow evaluate STORE --scheduler threads --json` in a child process. Printed: the child's
wall time and peak resident set size (the kernel's maximum RSS of the child, from getrusage, so no
sampling can miss the peak), and the mean PSNR/SSIM per method. evaluate scores each image in
strips of rows (`pipelines.evaluate.STRIP_PIXELS`), so its peak should not grow with the image:
about 0.4 GiB of imported libraries plus a few hundred MiB of strip buffers. Exits 1 when the
peak exceeds --limit-gib. The store is written under --workdir and removed at the end.
"""

import argparse
import dataclasses
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ensir_flow import schema

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import SyntheticCorpus  # noqa: E402  (the benchmarks' shared generator)

GIB = 1 << 30


def write_single_image_store(path: Path, height: int, width: int, n_models: int, seed: int) -> None:
    """A reference store of one `height` x `width` image named 'big', in the default chunks."""
    corpus = dataclasses.replace(
        SyntheticCorpus.of_size(1, n_models, seed), index=schema.ImageIndex(["big"], np.array([height]), np.array([width]))
    )
    corpus.write_store(path, schema.DEFAULT_CHUNK_PIXELS, schema.DEFAULT_COMPRESSION)


def evaluate_peak(store: Path, options: list[str]) -> tuple[float, int, dict]:
    """(seconds, peak RSS in bytes, the JSON printed) of one `ensir-flow evaluate` child process."""
    command = [
        sys.executable,
        "-m",
        "ensir_flow",
        "evaluate",
        str(store),
        "--scheduler",
        "threads",
        "--json",
        "--no-progress",
        *options,
    ]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"evaluate failed ({done.returncode}): {done.stderr.strip()}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    return seconds, peak, json.loads(done.stdout)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--height", type=int, default=12000)
    parser.add_argument("--width", type=int, default=12000)
    parser.add_argument("--models", type=int, default=3, help="K, the number of model predictions")
    parser.add_argument("--y-channel", action="store_true", help="score the luma, as evaluate --y-channel")
    parser.add_argument("--crop-border", type=int, default=0)
    parser.add_argument("--limit-gib", type=float, default=2.0, help="exit 1 when the peak RSS exceeds this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the store (default: a temporary folder)")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="ensir-evaluate-memory-", dir=args.workdir))
    try:
        store = workdir / "big.zarr"
        start = time.perf_counter()
        write_single_image_store(store, args.height, args.width, args.models, args.seed)
        megapixels = args.height * args.width / 1e6
        print(
            f"wrote one {args.height} x {args.width} image ({megapixels:.0f} Mpx, K = {args.models}) in "
            f"{time.perf_counter() - start:.0f} s",
            file=sys.stderr,
        )
        options = ["--crop-border", str(args.crop_border), *(["--y-channel"] if args.y_channel else [])]
        seconds, peak, scores = evaluate_peak(store, options)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"evaluate {args.height} x {args.width} ({megapixels:.0f} Mpx), K = {args.models}, "
        f"{'Y' if args.y_channel else 'RGB'}, crop border {args.crop_border}: {seconds:.1f} s, "
        f"peak RSS {peak / GIB:.2f} GiB (limit {args.limit_gib} GiB)"
    )
    for method, value in scores["psnr"].items():
        print(f"  {method:10s} PSNR {value:8.3f} dB  SSIM {scores['ssim'][method]:.4f}")
    if peak > args.limit_gib * GIB:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
