"""A FAKE NVML for the GPU exporter's tests: there is no GPU or NVIDIA driver where they run.

`FakeNvml` offers the pynvml calls the exporter makes, over GPUs described here, and fails the
way NVML does: with pynvml's own exception types (`pynvml.NVMLError(code)`), so the exporter's
error handling meets the real classes. Tests switch `driver` off (the library is missing) or set
`failing` to an NVML error code (a GPU lost mid-run) and back to None (recovered).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pynvml


@dataclass
class FakeGpu:
    uuid: str
    name: str
    total: int
    used: int
    util_gpu: int = 0  # percent, as NVML reports it
    util_memory: int = 0
    temperature: int = 40
    power_milliwatts: int | None = 100_000  # None: this GPU cannot report power
    processes: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, bytes or None)


class FakeNvml:
    NVMLError = pynvml.NVMLError
    NVML_ERROR_NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_NO_PERMISSION = pynvml.NVML_ERROR_NO_PERMISSION
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU

    def __init__(self, gpus: list[FakeGpu], driver: bool = True):
        self.gpus = gpus
        self.driver = driver
        self.failing: int | None = None
        self.initialised = False
        self.init_calls = 0

    def _check(self) -> None:
        if self.failing is not None:
            raise pynvml.NVMLError(self.failing)
        if not self.initialised:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if not self.driver:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
        if self.failing is not None:
            raise pynvml.NVMLError(self.failing)
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.initialised = False

    def nvmlDeviceGetCount(self) -> int:
        self._check()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        self._check()
        return self.gpus[index]

    def nvmlDeviceGetUUID(self, gpu: FakeGpu) -> str:
        self._check()
        return gpu.uuid

    def nvmlDeviceGetName(self, gpu: FakeGpu) -> str:
        self._check()
        return gpu.name

    def nvmlDeviceGetMemoryInfo(self, gpu: FakeGpu):
        self._check()
        return SimpleNamespace(total=gpu.total, used=gpu.used, free=gpu.total - gpu.used)

    def nvmlDeviceGetUtilizationRates(self, gpu: FakeGpu):
        self._check()
        return SimpleNamespace(gpu=gpu.util_gpu, memory=gpu.util_memory)

    def nvmlDeviceGetTemperature(self, gpu: FakeGpu, sensor: int) -> int:
        self._check()
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return gpu.temperature

    def nvmlDeviceGetPowerUsage(self, gpu: FakeGpu) -> int:
        self._check()
        if gpu.power_milliwatts is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return gpu.power_milliwatts

    def nvmlDeviceGetComputeRunningProcesses(self, gpu: FakeGpu):
        self._check()
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in gpu.processes]


def two_gpus() -> list[FakeGpu]:
    """Two GPUs as a serving node has them: one busy with two processes, one that cannot report
    power and runs a process whose memory NVML cannot see (another container's)."""
    return [
        FakeGpu("GPU-11111111-aaaa", "NVIDIA A100-SXM4-80GB", total=80 * 2**30, used=60 * 2**30,
                util_gpu=87, util_memory=45, temperature=71, power_milliwatts=312_500,
                processes=[(4242, 50 * 2**30), (4343, 10 * 2**30)]),
        FakeGpu("GPU-22222222-bbbb", "NVIDIA A100-SXM4-80GB", total=80 * 2**30, used=2 * 2**30,
                util_gpu=0, util_memory=0, temperature=35, power_milliwatts=None,
                processes=[(5151, None)]),
    ]
