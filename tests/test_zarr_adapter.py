"""What `zarr_adapter.commit_metadata` relies on in zarr's internals, pinned: one write of the root
`zarr.json` holds the attributes and the consolidated metadata of every array as its own metadata
says, and zarr and xarray open the store by it (its shapes, not the arrays' own, until the next
commit). A zarr release that changes any of this fails here first."""

import json
import math
import uuid

import numpy as np
import pytest
import xarray as xr
import zarr
import zarr.storage

from ensir_flow.pipelines.zarr_adapter import commit_metadata


def _store(path) -> zarr.Group:
    """A small store as ensir-flow writes them: a float array with NaN fill value and dimension
    names, a string array along the same dimension, attributes not yet committed."""
    group = zarr.open_group(str(path), mode="w-", zarr_format=3)
    pixels = group.create_array(
        "pixels",
        shape=(2, 6),
        chunks=(2, 4),
        dtype="float32",
        fill_value=np.nan,
        dimension_names=("channel", "pixel"),
        attributes={"units": "1"},
    )
    pixels[...] = np.arange(12, dtype=np.float32).reshape(2, 6)
    names = group.create_array("name", shape=(2,), dtype=str, dimension_names=("channel",))
    names[...] = np.array(["a", "b"])
    return group


@pytest.fixture
def root_writes(monkeypatch):
    """The values written to any `zarr.json` of a local store, by key, in order."""
    written = []
    real = zarr.storage.LocalStore.set

    async def recorded(self, key, value, *args, **kwargs):
        if key.endswith("zarr.json"):
            written.append((key, value.to_bytes()))
        return await real(self, key, value, *args, **kwargs)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", recorded)
    return written


def test_one_write_of_the_root_metadata_commits_attributes_and_shapes(tmp_path, root_writes):
    path = tmp_path / "s.zarr"
    _store(path)
    root_writes.clear()
    attrs = {"generation": 1, "models": ["a", "b"], "ratio": 0.5}
    commit_metadata(str(path), attrs)

    assert [key for key, _ in root_writes] == ["zarr.json"]  # the root document, once, and nothing else
    document = json.loads(root_writes[0][1])
    assert document == json.loads((path / "zarr.json").read_text())
    assert document["attributes"] == attrs
    members = document["consolidated_metadata"]["metadata"]
    assert members["pixels"]["shape"] == [2, 6] and members["pixels"]["dimension_names"] == ["channel", "pixel"]
    assert members["pixels"]["attributes"] == {"units": "1"} and members["pixels"]["fill_value"] == "NaN"
    assert members["name"]["shape"] == [2]

    group = zarr.open_group(str(path), mode="r", use_consolidated=True)
    assert dict(group.attrs) == attrs and group.metadata.consolidated_metadata is not None
    assert math.isnan(group["pixels"].fill_value)
    ds = xr.open_zarr(str(path), consolidated=True)
    assert ds.attrs == attrs and ds["pixels"].dims == ("channel", "pixel") and ds.sizes["pixel"] == 6
    np.testing.assert_array_equal(ds["pixels"].values, np.arange(12, dtype=np.float32).reshape(2, 6))
    assert ds["name"].values.tolist() == ["a", "b"]


def test_readers_see_the_committed_shapes_until_the_next_commit(tmp_path):
    path = tmp_path / "s.zarr"
    _store(path)
    commit_metadata(str(path), {"generation": 1})
    grown = zarr.open_group(str(path), mode="r+", use_consolidated=False)["pixels"]
    grown.resize((2, 9))
    grown[:, 6:] = 7

    assert zarr.open_group(str(path), mode="r", use_consolidated=True)["pixels"].shape == (2, 6)
    ds = xr.open_zarr(str(path), consolidated=True)
    assert ds.sizes["pixel"] == 6 and ds.attrs == {"generation": 1}

    commit_metadata(str(path), {"generation": 2})
    assert zarr.open_group(str(path), mode="r", use_consolidated=True)["pixels"].shape == (2, 9)
    ds = xr.open_zarr(str(path), consolidated=True)
    assert ds.sizes["pixel"] == 9 and ds.attrs == {"generation": 2}
    assert (ds["pixels"].values[:, 6:] == 7).all()


def test_a_store_addressed_by_url_is_committed_the_same_way():
    path = "memory://adapter/s.zarr"
    _store(path)
    commit_metadata(path, {"generation": 1})
    group = zarr.open_group(path, mode="r", use_consolidated=True)
    assert dict(group.attrs) == {"generation": 1} and group["pixels"].shape == (2, 6)
    assert xr.open_zarr(path, consolidated=True).attrs == {"generation": 1}


@pytest.mark.parametrize("compressors", [None, "zstd"])
@pytest.mark.parametrize("where", ["folder", "memory"])
def test_rows_read_past_zarr_are_zarr_s_rows(tmp_path, compressors, where):
    from ensir_flow.pipelines.zarr_adapter import rows_of

    location = str(tmp_path / "s.zarr") if where == "folder" else f"memory://rows-{uuid.uuid4().hex}/s.zarr"
    group = zarr.open_group(location, mode="w-", zarr_format=3)
    array = group.create_array(
        "sums", shape=(5, 2), chunks=(1, 2), dtype="uint64", fill_value=0, compressors=None if compressors is None else "auto"
    )
    array[:4] = np.arange(8, dtype=np.uint64).reshape(4, 2) * np.uint64(2**61 - 1)  # row 4 never written
    names = [codec.to_dict()["name"] for codec in array.metadata.codecs]
    assert names == (["bytes"] if compressors is None else ["bytes", "zstd"])
    for first, end in ((0, 5), (3, 4), (4, 5), (1, 3)):
        np.testing.assert_array_equal(rows_of(location, array, first, end), array[first:end])
    other = group.create_array("blocks", shape=(4, 2), chunks=(2, 2), dtype="uint64", fill_value=0)  # not a row per chunk
    other[...] = 7
    np.testing.assert_array_equal(rows_of(location, other, 1, 3), other[1:3])
