"""Ingest: image folders -> one Zarr store in the ragged pixel layout.

Every image is probed first (headers only), so mismatched sizes, unsupported formats and missing
files are reported before anything is written. Pixels are then decoded by one task per image and
assembled into Zarr chunks; each chunk is written by exactly one task, so no two tasks ever write
the same chunk. The store is staged and moved into place only when complete.
"""

from concurrent.futures import ThreadPoolExecutor

import dask
import dask.array as da
import numpy as np
import xarray as xr

import ensir_flow
from ensir_flow import schema
from ensir_flow.errors import InputError
from ensir_flow.images import GROUND_TRUTH_DIR, Corpus, ImageInfo, discover_corpus, file_sha256, probe_image, read_image

from .plan import Plan
from .storage import refuse_existing, staged_output, write_dataset


def _roles(corpus: Corpus) -> list[tuple[str, list]]:
    """(folder name, files in stem order) of the ground truth (if any), then each model."""
    roles = [(m, corpus.predictions[m]) for m in corpus.models]
    if corpus.ground_truth is not None:
        roles.insert(0, (GROUND_TRUTH_DIR, corpus.ground_truth))
    return roles


def probe_corpus(corpus: Corpus) -> list[ImageInfo]:
    """One ImageInfo per stem, after checking every role of the stem agrees on it."""
    roles = _roles(corpus)
    paths = [path for _, files in roles for path in files]
    with ThreadPoolExecutor(max_workers=8) as pool:
        infos = dict(zip(paths, pool.map(probe_image, paths)))
    per_stem = []
    for i, stem in enumerate(corpus.stems):
        _, first_files = roles[0]
        expected = infos[first_files[i]]
        for role, files in roles[1:]:
            got = infos[files[i]]
            if got != expected:
                raise InputError(
                    f"{files[i]}: {got.height}x{got.width}x{got.channels} differs from "
                    f"{first_files[i]} ({expected.height}x{expected.width}x{expected.channels})"
                )
        per_stem.append(expected)
    channels = {info.channels for info in per_stem}
    if len(channels) > 1:
        gray = next(corpus.stems[i] for i, info in enumerate(per_stem) if info.channels == 1)
        raise InputError(f"{corpus.root}: corpus mixes grayscale (e.g. '{gray}') and colour images; convert them to one kind first")
    return per_stem


def source_provenance(corpus: Corpus) -> xr.Dataset:
    """Per image and source folder: the file name and the SHA-256 of its bytes."""
    roles = _roles(corpus)
    with ThreadPoolExecutor(max_workers=8) as pool:
        digests = [list(pool.map(file_sha256, files)) for _, files in roles]
    names = [[path.name for path in files] for _, files in roles]
    dims = ("source", "image")
    return xr.Dataset(
        {"source_file": (dims, np.array(names, dtype=object)), "source_sha256": (dims, np.array(digests, dtype=object))},
        coords={"source": np.array([name for name, _ in roles], dtype=object), "image": np.array(corpus.stems, dtype=object)},
    )


def _read_image_planes(paths: list, info: ImageInfo) -> np.ndarray:
    """Pixels (roles, H*W, C) of one image: each role's file decoded once."""
    return np.stack([read_image(path, info).reshape(-1, info.channels) for path in paths])


def _pixel_planes(corpus: Corpus, infos: list[ImageInfo], chunk_pixels: int) -> da.Array:
    """Lazy (roles, pixel, channel) array in Zarr chunks: models in order, then ground truth if any.

    One task decodes one image (all roles); dask's rechunk then assembles the pixel chunks from
    the image blocks, so each file is decoded once and each chunk written by exactly one task.
    """
    role_files = [corpus.predictions[m] for m in corpus.models]
    if corpus.ground_truth is not None:
        role_files.append(corpus.ground_truth)
    blocks = [
        da.from_delayed(dask.delayed(_read_image_planes, pure=True)([files[i] for files in role_files], info),
                        shape=(len(role_files), info.height * info.width, info.channels), dtype=np.uint8)
        for i, info in enumerate(infos)
    ]
    return da.concatenate(blocks, axis=1).rechunk({0: -1, 1: chunk_pixels, 2: -1})


def plan_ingest(source, store: str, models: list[str] | None = None,
                chunk_pixels: int = schema.DEFAULT_CHUNK_PIXELS, overwrite: bool = False) -> Plan:
    """Plan the ingest of the corpus folder `source` into the Zarr store `store`."""
    refuse_existing(store, overwrite)
    corpus = discover_corpus(source, models)
    infos = probe_corpus(corpus)
    index = schema.ImageIndex(corpus.stems, np.array([i.height for i in infos]), np.array([i.width for i in infos]))
    planes = _pixel_planes(corpus, infos, chunk_pixels)
    n_models, channels = len(corpus.models), infos[0].channels
    ds = index.to_dataset()
    ds[schema.PREDICTION] = (("model", "pixel", "channel"), planes[:n_models])
    encoding = {schema.PREDICTION: {"chunks": (n_models, chunk_pixels, channels)}}
    if corpus.ground_truth is not None:
        ds[schema.GROUND_TRUTH] = (("pixel", "channel"), planes[n_models])
        encoding[schema.GROUND_TRUTH] = {"chunks": (chunk_pixels, channels)}
    ds = ds.assign_coords(model=np.array(corpus.models, dtype=object))
    ds.attrs = schema.store_attributes(corpus.models, channels, created_by=f"ensir-flow {ensir_flow.__version__} ingest",
                                       source=str(source), chunk_pixels=int(chunk_pixels))
    ds = ds.merge(source_provenance(corpus))

    def execute(compute):
        with staged_output(store, overwrite) as staging:
            compute(write_dataset(ds, staging, encoding), label="ingest")
        return ds

    details = {
        "source": str(source), "store": str(store), "models": ", ".join(corpus.models),
        "ground truth": "yes" if corpus.ground_truth is not None else "no",
        "images": len(corpus.stems), "pixels": f"{index.n_pixels:,} x {channels} channels",
        "tasks": f"{len(corpus.stems)} image reads, {planes.numblocks[1]} chunks of {chunk_pixels:,} pixels (one write each)",
    }
    return Plan(f"ingest {len(corpus.stems)} images of {n_models} models", details, execute)

