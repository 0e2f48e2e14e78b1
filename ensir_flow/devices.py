"""Choosing where kernels run: numba on the CPU, or torch on a GPU.

`auto` is resolved where the work runs (on each Dask worker), so a cluster that mixes CPU and GPU
workers uses each one's GPU when it has one. Torch is only imported when a GPU may be present,
which keeps CPU workers small and their start-up short: a GPU that torch can use shows one of
`GPU_DEVICE_FILES` (NVIDIA's driver, WSL2's GPU bridge, AMD's ROCm driver, which torch also
drives through its `cuda` device); without any of them the answer is 'cpu' without importing torch.
"""

import os

from .errors import InputError

DEVICES = ("auto", "cpu", "cuda")
GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def gpu_may_be_present() -> bool:
    """Whether this machine shows a GPU driver's device file, i.e. whether asking torch is worth its import."""
    return any(os.path.exists(path) for path in GPU_DEVICE_FILES)


def resolve_device(device: str) -> str:
    """'cpu' or a torch CUDA device name for `device` in ('auto', 'cpu', 'cuda', 'cuda:N')."""
    if device == "cpu":
        return "cpu"
    if device == "auto":
        if not gpu_may_be_present():
            return "cpu"
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: requested, but torch sees no GPU on this machine")
        return device
    raise ValueError(f"unknown device {device!r} (choose from {', '.join(DEVICES)})")
