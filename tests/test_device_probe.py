"""`--device auto` answers 'cpu' without importing torch only where no GPU driver shows."""

from ensir_flow import devices
from helpers import modules_imported_by


def test_auto_without_a_gpu_driver_does_not_import_torch():
    code = (
        "from ensir_flow import devices\n"
        "devices.GPU_DEVICE_FILES = ('/nonexistent/nvidiactl',)\n"
        "assert devices.resolve_device('auto') == 'cpu'\n"
    )
    assert "torch" not in modules_imported_by(code)


def test_auto_asks_torch_when_any_gpu_driver_shows(monkeypatch, tmp_path):
    """NVIDIA, WSL2 and ROCm drivers each make torch worth asking (ROCm's torch drives AMD GPUs as 'cuda')."""
    assert set(devices.GPU_DEVICE_FILES) == {"/dev/nvidiactl", "/dev/dxg", "/dev/kfd"}
    for name in ("nvidiactl", "dxg", "kfd"):
        present = tmp_path / name
        present.touch()
        monkeypatch.setattr(devices, "GPU_DEVICE_FILES", ("/nonexistent/a", str(present)))
        assert devices.gpu_may_be_present()
        present.unlink()
        assert not devices.gpu_may_be_present()
