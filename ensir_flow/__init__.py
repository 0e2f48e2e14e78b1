"""ensir-flow: EnsIR ensembles of image-restoration models, at dataset scale.

`ensir_flow` holds the pure pieces (kernels, the LUT object, metrics, the store schema and image
I/O); `pipelines` wires them into Dask graphs; `cli` is the command line.
"""

__version__ = "0.1.0"
