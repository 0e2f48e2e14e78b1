"""predict's overhead over running the same model in a plain loop on the same images.

    python benchmarks/predict.py [--images 8] [--size 512] [--width 32] [--runs 3] [--device cpu]

Writes a synthetic corpus (lq/ and gt/ PNGs of `--size` pixels a side) and a model saved as a
`torch.export` program (three 3x3 convolutions of `--width` channels, any image size), then times, alternately,
`--runs` times each:
- plain loop: for each image, decode its lq PNG, run the model, round to uint8 (what a user's own
  script does before saving PNGs, without saving them);
- predict: `plan_predict` on dask's threaded scheduler: the same decoding and model calls plus the
  ground truth, the store's chunked Zarr writes, completion marks and the move into place.
Prints the best time of each and the overhead (predict / plain - 1); the target is under 20% on
the CPU. Figures on a shared host vary; the ratio is taken from runs made in turns.
"""

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch

from ensir_flow.models import Inference, loaded_model, model_file, predict_image, sample_seed
from ensir_flow.pipelines.predict import plan_predict


class Restorer(torch.nn.Module):
    """A small convolutional restorer: the input plus a correction from three 3x3 convolutions."""

    def __init__(self, width: int):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, width, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(width, width, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(width, 3, 3, padding=1),
        )

    def forward(self, x):
        return x + 0.1 * self.body(x)


def write_corpus(root: Path, images: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for folder in ("lq", "gt"):
        (root / folder).mkdir(parents=True)
    for i in range(images):
        truth = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        iio.imwrite(root / "gt" / f"img{i:03d}.png", truth)
        iio.imwrite(root / "lq" / f"img{i:03d}.png", truth // 2 + 64)


def plain_loop(module, lq: Path, device: str) -> float:
    start = time.perf_counter()
    for path in sorted(lq.iterdir()):
        with torch.inference_mode():
            x = torch.from_numpy(iio.imread(path)).to(device).permute(2, 0, 1)[None].float() / 255.0
            y = module(x)
            np.asarray(torch.floor(y * 255.0 + 0.5).clamp(0, 255).to(torch.uint8).cpu())
    return time.perf_counter() - start


def predict_run(corpus: Path, store: Path, model, device: str) -> float:
    shutil.rmtree(store, ignore_errors=True)
    start = time.perf_counter()
    plan_predict(corpus, str(store), [model], Inference(device=device)).run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=512, help="image side, pixels")
    parser.add_argument("--width", type=int, default=32, help="channels of the model's hidden convolutions")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        write_corpus(work / "corpus", args.images, args.size)
        path = work / "restorer.pt2"
        sides = {2: torch.export.Dim("height", min=4), 3: torch.export.Dim("width", min=4)}
        torch.export.save(
            torch.export.export(Restorer(args.width).eval(), (torch.rand(1, 3, 64, 64),), dynamic_shapes=(sides,)), path
        )
        model = model_file("restorer", path)
        module = loaded_model(model, args.device)  # loaded once, as predict's workers do
        image = iio.imread(next((work / "corpus" / "lq").iterdir()))
        predict_image(module, image, Inference(device=args.device), sample_seed("warm", 0), "warm-up")
        plain, predicted = [], []
        for _ in range(args.runs):  # in turns, so that a slow spell on the host falls on both
            plain.append(plain_loop(module, work / "corpus" / "lq", args.device))
            predicted.append(predict_run(work / "corpus", work / "s.zarr", model, args.device))
        megapixels = args.images * args.size**2 / 1e6
        print(
            f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} intra-op threads; "
            f"{args.images} images of {args.size}x{args.size} ({megapixels:.1f} Mpx), model: 3 convolutions of width "
            f"{args.width}; best of {args.runs}"
        )
        print(f"plain loop (decode, model, round)    {min(plain):7.2f} s  runs: {', '.join(f'{t:.2f}' for t in plain)}")
        print(f"predict (threads, Zarr store)        {min(predicted):7.2f} s  runs: {', '.join(f'{t:.2f}' for t in predicted)}")
        print(f"overhead: {min(predicted) / min(plain) - 1:+.1%} (target: under +20% on the CPU)")
        print(f"GPU: torch sees {'a GPU: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'} here")


if __name__ == "__main__":
    main()
