"""ensir-flow: EnsIR ensembles of image-restoration models, at dataset scale.

The Python API (`ensir_flow.api`, the functions the command line calls) is importable from here:
`ingest`, `predict`, `fit`, `apply`, `evaluate`, `export`, `import_lut`, `export_lut`, `demo`,
`info`, and `open_store` / `image` to read stores. They are loaded on first use, so that importing the
package (as every Dask worker does) stays cheap.

`ensir_flow` holds the pure pieces (kernels, the LUT object, metrics, the store schema and image
I/O); `pipelines` wires them into Dask graphs; `cli` is the command line.
"""

from . import kernel_cache  # noqa: F401  (numba's cache directory: set before any kernel module imports numba)

__version__ = "0.1.0"

#: The names of `ensir_flow.api` this package exports.
API = (
    "ingest",
    "predict",
    "fit",
    "apply",
    "evaluate",
    "export",
    "import_lut",
    "export_lut",
    "demo",
    "info",
    "open_store",
    "image",
    "RunOptions",
    "UsageError",
)

__all__ = ["__version__", *API]


def __getattr__(name: str):
    if name in API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'ensir_flow' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *API})
