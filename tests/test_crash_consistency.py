"""Every writer killed at its n-th write leaves each target as before or as after, and a re-run ends
as an uninterrupted run does.

Each command runs in a process of its own under tests/kill_after_writes.py, which ends it with
os._exit at its n-th file-system write (no cleanup runs, as with SIGKILL): a fork of one process per
module that has imported the CLI and what its commands use, so that each of the ~200 runs here
starts at its command rather than after ~2 s of imports. A target's state is what readers get from
it: a store as `open_store` reads and checks it, a LUT as `read_lut` does, a folder as its files'
bytes. After the kill that state must equal the one before the command or the one an uninterrupted
run leaves; re-running the same command must then succeed and leave the latter. Also killed with
SIGKILL at a random time within its run, and at every fifth write for the append (the issue that
made this test: a killed append once left a hole that fit read as data) and for ingest (each
chunk's record of its sources' SHA-256s, and the commit that turns them into `source_sha256`).
"""

import functools
import hashlib
import os
import random
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from kill_after_writes import KILLED, Writer

from ensir_flow.errors import InputError
from ensir_flow.images import png_text
from ensir_flow.pipelines.chunks import pixel_array, read_pixels
from ensir_flow.pipelines.integrity import CHUNK_CHECKSUMS, checksums_for
from ensir_flow.pipelines.lut_io import read_lut
from ensir_flow.pipelines.stores import open_group_as_committed, open_store
from ensir_flow.schema import check_store
from helpers import IDENTITY_ATTRIBUTES, make_corpus, save_export

THREADS = {**os.environ, "ENSIR_FLOW_SCHEDULER": "threads"}


def _digest_tree(path: Path, local) -> dict:
    return {str(p.relative_to(path)): _file_digest(p, local) for p in sorted(path.rglob("*")) if p.is_file()}


def _file_digest(path: Path, local) -> str:
    data = path.read_bytes()
    if path.suffix == ".png":  # its text chunks name the store: the path changes their lengths and CRCs too
        data = repr(sorted(png_text(data).items())).encode() + iio.imread(path).tobytes()
    return hashlib.sha256(local(data)).hexdigest()


def state(path: Path):
    """What a reader gets from `path`: 'absent', a digest of the store or LUT as read and checked,
    of a folder's files, or the error a reader meets (which never equals a valid state). Commands
    record the paths they were given as absolute ones: the folder they ran in (`path`'s) is left
    out, so that a run in another folder has the same state."""
    work = str(path.parent).encode()

    def local(data: bytes) -> bytes:
        return data.replace(work, b"<work>")

    if not path.exists():
        return "absent"
    if path.is_file():
        return _file_digest(path, local)
    if path.suffix != ".zarr":
        return _digest_tree(path, local)
    try:
        if path.name.startswith("lut"):
            lut = read_lut(str(path))  # its stored bins, which make the table (a dense one of K = 3 at w = 2 would be 75 MB)
            return hashlib.sha256(
                lut.digest().encode()
                + lut.bin_digits.tobytes()
                + lut.bin_count.tobytes()
                + lut.bin_status.tobytes()
                + local(repr(lut.attrs).encode())
            ).hexdigest()
        ds = open_store(str(path))
        check_store(ds, str(path), require=())
        attrs = sorted((key, value) for key, value in ds.attrs.items() if key not in IDENTITY_ATTRIBUTES)
        digest = hashlib.sha256(local(repr(attrs).encode()))
        checked = ds[CHUNK_CHECKSUMS].attrs["variables"] if CHUNK_CHECKSUMS in ds else []
        for name in sorted(ds.variables):
            if name in checked:  # every chunk checked, as readers do
                values = read_pixels(pixel_array(str(path), name), 0, ds.sizes["pixel"])
            elif name == CHUNK_CHECKSUMS:  # as readers take them: the last chunk's from the root metadata (an
                group = open_group_as_committed(str(path))  # append rewrites its row before its commit)
                values = np.stack([checksums_for(group, variable, str(path)).rows(0, ds.sizes["chunk"]) for variable in checked])
            else:
                values = ds[name].values
            digest.update(
                name.encode() + np.ascontiguousarray(values.astype(str) if values.dtype == object else values).tobytes()
            )
        return digest.hexdigest()
    except InputError as error:
        return f"unreadable: {error}"


def _paper_style_lut(path: Path) -> None:
    """A LUT in the form the paper's code saves (bin width 128, K = 3: 8 bins), for `lut import`."""
    table = {(a, b, c): [torch.tensor([0.2, 0.3, 0.5])] * 3 for a in (0, 128) for b in (0, 128) for c in (0, 128)}
    torch.save(table, path)


def _base_model(folder: Path) -> Path:
    """A small restorer for `predict` (a `torch.export` program), saved outside the working folders:
    a predicted store records its model's absolute path, which must be the same in every copy of them."""
    torch.manual_seed(0)
    return save_export(torch.nn.Conv2d(3, 3, 3, padding=1), folder / "conv.pt2")


def _prepare(writer: Writer, work: Path, before: list[list]) -> None:
    corpus = work / "corpus"
    models = make_corpus(corpus, sizes=((24, 32), (17, 29), (40, 21), (30, 30)))
    for part, stems in (("first", ("img0", "img1")), ("second", ("img2", "img3"))):
        for folder in ("gt", *models):
            (work / part / folder).mkdir(parents=True)
            for stem in stems:
                shutil.copy(corpus / folder / f"{stem}.png", work / part / folder)
    # predict's inputs: the ground truth as degraded inputs (lq/) too, all images and the first two
    for part, stems in (("degraded", ("img0", "img1", "img2", "img3")), ("degraded-first", ("img0", "img1"))):
        for folder in ("lq", "gt"):
            (work / part / folder).mkdir(parents=True)
            for stem in stems:
                shutil.copy(corpus / "gt" / f"{stem}.png", work / part / folder)
    _paper_style_lut(work / "paper.pth")
    for arguments in before:
        process, _ = writer.run(work, arguments)
        assert process.returncode == 0, process.stderr


WRITERS = {
    # name: (commands run before, the command, its targets)
    "ingest": ([], ["ingest", "corpus", "s.zarr", "--chunk-pixels", 500], ["s.zarr"]),
    "ingest --append": (
        [["ingest", "first", "s.zarr", "--chunk-pixels", 500]],
        ["ingest", "second", "s.zarr", "--append"],
        ["s.zarr"],
    ),
    "fit --overwrite": (
        [["ingest", "corpus", "s.zarr", "--chunk-pixels", 500], ["fit", "s.zarr", "lut.zarr"]],
        ["fit", "s.zarr", "lut.zarr", "--bin-width", 64, "--overwrite"],
        ["lut.zarr"],
    ),
    # at w = 2, lsq's statistics of these 3,001 pixels exceed a pass of 1 MiB: two passes, whose LUT bins
    # go to temporary files (its writes 1 and 2), before the LUT is written as by any fit
    "fit in passes": (
        [["ingest", "corpus", "s.zarr", "--chunk-pixels", 500]],
        ["fit", "s.zarr", "lut.zarr", "--bin-width", 2, "--solver", "lsq", "--shrinkage", 10, "--pass-memory", 1],
        ["lut.zarr"],
    ),
    "apply --export-dir": (
        [["ingest", "corpus", "s.zarr", "--chunk-pixels", 500], ["fit", "s.zarr", "lut.zarr"]],
        ["apply", "s.zarr", "lut.zarr", "out.zarr", "--export-dir", "png"],
        ["out.zarr", "png"],
    ),
    "apply --overwrite": (
        [
            ["ingest", "corpus", "s.zarr", "--chunk-pixels", 500],
            ["fit", "s.zarr", "lut.zarr"],
            ["apply", "s.zarr", "lut.zarr", "out.zarr"],
            ["fit", "s.zarr", "lut.zarr", "--overwrite", "--bin-width", 64],
        ],
        ["apply", "s.zarr", "lut.zarr", "out.zarr", "--overwrite"],
        ["out.zarr"],
    ),
    "evaluate --report": (
        [
            ["ingest", "corpus", "s.zarr", "--chunk-pixels", 500],
            ["fit", "s.zarr", "lut.zarr"],
            ["apply", "s.zarr", "lut.zarr", "out.zarr"],
        ],
        ["evaluate", "s.zarr", "--ensemble", "out.zarr", "--report", "report"],
        ["report"],
    ),
    "lut import": (
        [],
        ["lut", "import", "paper.pth", "lut.zarr", "--models", "model0,model1,model2", "--bin-width", 128],
        ["lut.zarr"],
    ),
    "lut export": (
        [["ingest", "corpus", "s.zarr", "--chunk-pixels", 500], ["fit", "s.zarr", "lut.zarr"]],
        ["lut", "export", "lut.zarr", "lut.json"],
        ["lut.json"],
    ),
    # BASE_MODEL stands for the model file `_base_model` saves (see there)
    "predict": ([], ["predict", "degraded", "p.zarr", "--model", "a=BASE_MODEL", "--chunk-pixels", 500], ["p.zarr"]),
    "predict --append": (
        [["predict", "degraded-first", "p.zarr", "--model", "a=BASE_MODEL", "--chunk-pixels", 500]],
        ["predict", "degraded", "p.zarr", "--model", "a=BASE_MODEL", "--append"],
        ["p.zarr"],
    ),
}


class Case(NamedTuple):
    """A writer's command, ready to be killed: its working folder before the command (`pristine`,
    copied for each run), the states of its targets before and after an uninterrupted run, and
    how many writes and seconds that run took."""

    pristine: Path
    command: list[str]
    targets: list[str]
    before: list
    after: list
    writes: int
    seconds: float


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    return _base_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def writer(base_model):
    """The process every run here is a fork of (with the model loaded once, for predict)."""
    process = Writer(THREADS, programs=(base_model,))
    yield process
    process.close()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, writer, base_model):
    """Per writer, its `Case`, prepared when first asked."""
    return functools.partial(_prepared_case, {}, tmp_path_factory, writer, base_model)


def _prepared_case(cases: dict, tmp_path_factory, writer: Writer, base_model: Path, name: str) -> Case:
    if name not in cases:
        with_model = lambda arguments: [str(a).replace("BASE_MODEL", str(base_model)) for a in arguments]  # noqa: E731
        before, command, targets = WRITERS[name]
        before, command = [with_model(arguments) for arguments in before], with_model(command)
        pristine = tmp_path_factory.mktemp("pristine")
        _prepare(writer, pristine, before)
        work = tmp_path_factory.mktemp("work")
        shutil.rmtree(work)
        shutil.copytree(pristine, work)
        states_before = [state(work / t) for t in targets]
        start = time.monotonic()
        process, writes = writer.run(work, command)
        seconds = time.monotonic() - start
        assert process.returncode == 0, (name, process.stderr)
        after = [state(work / t) for t in targets]
        assert after != states_before and not any(str(s).startswith("unreadable") for s in after), name
        cases[name] = Case(pristine, command, targets, states_before, after, writes, seconds)
    return cases[name]


def _kill_and_rerun(writer: Writer, case: Case, work: Path, kill: int | float) -> None:
    """Kill the command at write `kill` (int) or after `kill` seconds (float, SIGKILL); check the
    targets, re-run it, check again."""
    command, targets, before, after = case.command, case.targets, case.before, case.after
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(case.pristine, work)
    if isinstance(kill, int):
        process, writes = writer.run(work, command, kill_at=kill)
        # killed there, or (the count of writes can vary by a few between runs) done before reaching it
        assert process.returncode == KILLED or (process.returncode == 0 and writes < kill), (
            kill,
            process.returncode,
            process.stderr,
        )
    else:
        writer.run(work, command, kill_after=kill)
    states = [state(work / t) for t in targets]
    for target, got, was, will in zip(targets, states, before, after):
        assert got in (was, will), (command, kill, target, got)
    rerun, _ = writer.run(work, command)
    if states == after and rerun.returncode == 1:  # killed after its commit: a refusal that says how is fine
        assert rerun.stderr.count("\n") == 1 and "already exists" in rerun.stderr, rerun.stderr
    else:
        assert rerun.returncode == 0, (command, kill, rerun.stderr)
    assert [state(work / t) for t in targets] == after, (command, kill)


def _kill_points(writes: int, how_many: int) -> list[int]:
    return sorted({1, writes, *np.linspace(1, writes, how_many).round().astype(int).tolist()})


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ingest --append"])
def test_killed_at_first_middle_and_last_write(prepared, writer, name, tmp_path):
    case = prepared(name)
    for kill in _kill_points(case.writes, 3):
        _kill_and_rerun(writer, case, tmp_path / "work", kill)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(WRITERS))
def test_killed_at_many_writes_and_random_times(prepared, writer, name, tmp_path):
    case = prepared(name)
    # the append: its crash once left a hole that fit read as data; ingest: each chunk's record of its
    # sources' digests, and the commit that turns them into source_sha256, are writes a kill can follow
    dense = name in ("ingest --append", "ingest")
    points = range(1, case.writes + 1, 5) if dense else _kill_points(case.writes, 4)
    if name == "fit in passes":  # before, between and after the passes' writes of their temporary files
        points = sorted({1, 2, 3, *points})
    for kill in points:
        _kill_and_rerun(writer, case, tmp_path / "work", kill)
    _kill_and_rerun(writer, case, tmp_path / "work", random.Random(name).uniform(0, case.seconds))
