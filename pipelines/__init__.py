"""Dask graphs that wire ensir-flow's kernels to Zarr stores: ingest, fit, apply, export, evaluate.

Each `plan_*` function validates its inputs, builds the lazy graph and returns a `Plan`, which
can be described (`--dry-run`) before it is executed with a compute function that the caller
supplies (the CLI's picks the scheduler and shows progress).
"""
