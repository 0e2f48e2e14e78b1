"""The first run on a machine: fit and apply with an empty numba kernel cache, against the same
commands with the cache that run left.

    python benchmarks/cold_start.py [SOURCE_DIR] [--config NAME|PATH] [--bin-width 32] [--runs 3]

SOURCE_DIR (default: the GoPro reference set, ../shared/data/ensir-reference/deblurring, with its
task config) is ingested once; then, --runs times, each in a fresh `ensir-flow ... --scheduler
threads --progress-interval 1` process as a user runs it: `fit` with an empty NUMBA_CACHE_DIR
(cold), `fit` again with the cache it filled (warm), `apply` with another empty cache, `apply`
warm. Cold and warm runs alternate, so a slow spell on a shared host falls on both. It prints,
for each command: the median wall time cold and warm and their ratio; the median CPU seconds of
the process (less disturbed by other jobs on a shared host); when its first line came on stderr
(start-up: interpreter, imports, opening the stores) and the longest silence after it (between
two lines, or after the last); how many cold and warm runs said they were compiling kernels; and
the seconds each kernel took to compile in the cold runs, wall and CPU of the compiling thread
(numba's compile events; the first kernel's include numba's start-up).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT.parent / "shared" / "data" / "ensir-reference"

#: Runs the command line in the child, timing each top-level compile of an ensir-flow kernel
#: (nested compiles count in their caller's), written as JSON to $COLD_START_COMPILES at exit.
CHILD = """
import atexit, json, os, sys, time
from numba.core import event

compiles, started = [], []

class Timer(event.Listener):
    def on_start(self, e):
        started.append((time.perf_counter(), time.thread_time()))

    def on_end(self, e):
        wall, cpu = started.pop()
        function = e.data["dispatcher"].py_func
        if not started and function.__module__.startswith("ensir_flow."):
            name = f"{function.__module__.split('.')[-1]}.{function.__name__}"
            compiles.append((name, time.perf_counter() - wall, time.thread_time() - cpu))

event.register("numba:compile", Timer())
atexit.register(lambda: open(os.environ["COLD_START_COMPILES"], "w").write(json.dumps(compiles)))
from ensir_flow.cli import main
sys.argv[0] = "ensir-flow"
main()
"""


def run(args: list[str], cache: Path, work: Path) -> dict:
    """One command in a fresh process with numba's cache in `cache`: wall seconds, the longest
    silence on stderr, whether it said it compiled, and its kernels' compile seconds."""
    compiles = work / "compiles.json"
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache), "COLD_START_COMPILES": str(compiles)}
    started = time.perf_counter()
    first = last = None
    silence, said = 0.0, False
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, *args], cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    for line in child.stderr:
        now = time.perf_counter()
        first = now if first is None else first
        silence, last = max(silence, now - (last or now)), now
        said |= "compiling kernels" in line
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"{' '.join(args)} failed (exit {os.waitstatus_to_exitcode(status)})")
    now = time.perf_counter()
    return {
        "seconds": now - started,
        "cpu": usage.ru_utime + usage.ru_stime,
        "first line": (first or now) - started,
        "silence": max(silence, now - (last or now)),
        "said": said,
        "compiles": json.loads(compiles.read_text()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", type=Path, default=REFERENCE / "deblurring")
    parser.add_argument("--config", default=str(ROOT / "configs" / "deblurring-gopro.yaml"))
    parser.add_argument("--bin-width", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    options = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ensir-cold-start-"))
    try:
        config = ["--config", options.config]
        threads = ["--scheduler", "threads", "--progress-interval", "1"]
        subprocess.run(
            [
                sys.executable,
                "-m",
                "ensir_flow.cli",
                *config,
                "ingest",
                str(options.source),
                "s.zarr",
                *threads[:2],
                "--no-progress",
            ],
            cwd=work,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        commands = {
            "fit": lambda out: [*config, "fit", "s.zarr", out, "--bin-width", str(options.bin_width), *threads],
            "apply": lambda out: [*config, "apply", "s.zarr", "lut-0.zarr", out, *threads],
        }
        results = {name: {"cold": [], "warm": []} for name in commands}
        for attempt in range(options.runs):
            for name, command in commands.items():
                cache = work / f"cache-{name}-{attempt}"
                for state in ("cold", "warm"):
                    out = "lut-0.zarr" if name == "fit" and attempt == 0 and state == "cold" else f"{name}-{attempt}-{state}.zarr"
                    results[name][state].append(run(command(out), cache, work))
                shutil.rmtree(cache)
        print(f"{options.source}, median of {options.runs} runs (longest silence: the longest of them)")
        for name, by_state in results.items():
            cold, warm = (
                {key: statistics.median(r[key] for r in by_state[s]) for key in ("seconds", "cpu", "first line")}
                for s in ("cold", "warm")
            )
            silence = [max(r["silence"] for r in by_state[s]) for s in ("cold", "warm")]
            said = [sum(r["said"] for r in by_state[s]) for s in ("cold", "warm")]
            print(
                f"{name}: cold {cold['seconds']:.2f} s, warm {warm['seconds']:.2f} s: {cold['seconds'] / warm['seconds']:.2f}x"
                f" (CPU {cold['cpu']:.2f} s / {warm['cpu']:.2f} s: {cold['cpu'] / warm['cpu']:.2f}x)\n"
                f"  first line on stderr after cold {cold['first line']:.1f} s, warm {warm['first line']:.1f} s; longest"
                f" silence after it cold {silence[0]:.1f} s, warm {silence[1]:.1f} s\n"
                f"  said 'compiling kernels': cold {said[0]} of {options.runs}, warm {said[1]} of {options.runs}"
            )
        for name, by_state in results.items():
            seconds: dict[str, list[tuple[float, float]]] = {}
            for r in by_state["cold"]:
                for kernel, wall, cpu in r["compiles"]:
                    seconds.setdefault(kernel, []).append((wall, cpu))
            listed = ", ".join(
                f"{kernel} {statistics.median(w for w, _ in times):.2f} ({statistics.median(c for _, c in times):.2f})"
                for kernel, times in sorted(seconds.items(), key=lambda item: -max(w for w, _ in item[1]))
            )
            wall, cpu = (statistics.median(sum(c[i] for c in r["compiles"]) for r in by_state["cold"]) for i in (1, 2))
            print(f"{name} compiles, wall s (CPU s), median: {wall:.2f} ({cpu:.2f}) in all: {listed or 'none'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
