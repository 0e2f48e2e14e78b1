"""The fingerprint of a pixel store: what `apply` records of the store it blended, and what
`evaluate` checks an `apply` output against. With zarr alone (no xarray), so that evaluate can
check it without xarray's start-up."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from ensir_flow import schema

if TYPE_CHECKING:
    import xarray as xr

    from .stores import StoreIndex


def store_fingerprint(ds: xr.Dataset | StoreIndex, n_images: int | None = None) -> str:
    """SHA-256 identifying the first `n_images` images of a pixel store (all by default): models,
    stems, sizes, chunk size and source hashes. A store grown by `ingest --append` keeps the
    fingerprint of its first images, which is how apply recognises an output it can update.
    `ds` is the store opened by xarray (`stores.open_store`) or by zarr (`stores.open_store_index`):
    the same store gives the same fingerprint either way."""
    n = ds.sizes["image"] if n_images is None else n_images
    digest = hashlib.sha256(
        repr(
            (
                ds.attrs.get("models"),
                [str(s) for s in ds["image"].values[:n]],
                ds["pixel_count"].values[:n].tolist(),
                _chunk_pixels(ds),
            )
        ).encode()
    )
    if "source_sha256" in ds:
        digest.update(" ".join(map(str, ds["source_sha256"].values[:, :n].ravel())).encode())
    return digest.hexdigest()


def _chunk_pixels(ds) -> int:
    """Pixels per chunk of the store's predictions (the last chunk may hold fewer)."""
    predictions = ds[schema.PREDICTION]
    encoding = getattr(predictions, "encoding", None)  # xarray's; zarr's array otherwise
    return int(encoding["chunks"][1] if encoding is not None else predictions.array.chunks[1])
