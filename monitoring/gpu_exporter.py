"""`quill gpu-exporter [--port 9400] [--interval 5] [--host 0.0.0.0]`: GPU memory, utilisation,
temperature and power of this node's NVIDIA GPUs, read through NVML (`pynvml`, from the
`nvidia-ml-py` package), for Prometheus.

NVML is read every `--interval` seconds in the main thread; a scrape is answered from the last
reading, so a slow or hung driver never blocks Prometheus. When NVML is missing (no driver, a
CPU-only node) or fails mid-run (a GPU fell off the bus, the driver was reloaded), the exporter
keeps running and answers `quill_gpu_exporter_nvml_up 0` without any GPU series; it logs the
reason once and tries NVML again at every interval, so it recovers on its own.

Only `prometheus_client` and `pynvml` are imported: no torch, no Ray, so it starts in well under
a second on a node whose GPUs are busy serving models.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger("quill.gpu_exporter")

GPU_LABELS = ("gpu", "uuid", "name")

# Per-GPU gauges, in base units.
GPU_SERIES = {
    "quill_gpu_memory_used_bytes": "GPU memory in use (NVML), bytes.",
    "quill_gpu_memory_free_bytes": "GPU memory free (NVML), bytes.",
    "quill_gpu_memory_total_bytes": "GPU memory installed (NVML), bytes.",
    "quill_gpu_utilization_ratio": "Fraction of the last sample period a kernel ran on the GPU (0-1).",
    "quill_gpu_memory_utilization_ratio": "Fraction of the last sample period GPU memory was read or written (0-1).",
    "quill_gpu_temperature_celsius": "GPU core temperature, degrees Celsius.",
    "quill_gpu_power_watts": "GPU power draw, watts.",
}
PROCESS_SERIES = ("quill_gpu_process_memory_used_bytes", "GPU memory used by one process (NVML), bytes.")


@dataclass
class Reading:
    """One pass over NVML: `gpus[series] = [(labels, value)]`; `up` False when NVML failed."""

    up: bool = False
    duration: float = 0.0
    gpus: dict[str, list[tuple[tuple[str, ...], float]]] = field(default_factory=dict)
    processes: list[tuple[tuple[str, ...], float]] = field(default_factory=list)


class GpuExporter:
    """A prometheus_client collector over the latest NVML reading; `poll()` takes a new one.

    `nvml` is the `pynvml` module, or anything with the same functions and error types (the
    tests pass a fake NVML, since there is no GPU where they run)."""

    def __init__(self, nvml=None):
        if nvml is None:
            import pynvml as nvml
        self.nvml = nvml
        self._initialised = False
        self._down_reason: str | None = None
        self._reading = Reading()
        # Field errors that mean "this GPU cannot tell", not "NVML is broken": skip the field.
        self._unsupported = {nvml.NVML_ERROR_NOT_SUPPORTED, nvml.NVML_ERROR_NO_PERMISSION}

    def poll(self) -> Reading:
        t0 = time.perf_counter()
        try:
            if not self._initialised:
                self.nvml.nvmlInit()
                self._initialised = True
            gpus, processes = self._read()
            reading = Reading(True, 0.0, gpus, processes)
            if self._down_reason is not None:
                log.warning("NVML answers again: exporting GPU metrics")
                self._down_reason = None
        except Exception as exc:  # any failure: report nvml_up 0 and retry at the next interval
            self._mark_down(exc)
            reading = Reading(False)
        reading.duration = time.perf_counter() - t0
        self._reading = reading  # one reference swap: a scrape sees a whole reading
        return reading

    def _mark_down(self, exc: Exception) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        if reason != self._down_reason:
            log.warning("NVML unavailable (%s); exporting quill_gpu_exporter_nvml_up 0 and retrying", reason)
            self._down_reason = reason
        if self._initialised:
            self._initialised = False
            try:  # a lost GPU or a reloaded driver needs a fresh nvmlInit
                self.nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001 - already down
                pass

    def _field(self, read, *args):
        try:
            return read(*args)
        except self.nvml.NVMLError as exc:
            if exc.value in self._unsupported:
                return None
            raise

    def _read(self):
        nv = self.nvml
        gpus: dict[str, list] = {name: [] for name in GPU_SERIES}
        processes = []
        for index in range(nv.nvmlDeviceGetCount()):
            h = nv.nvmlDeviceGetHandleByIndex(index)
            labels = (str(index), _text(nv.nvmlDeviceGetUUID(h)), _text(nv.nvmlDeviceGetName(h)))
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            values = {
                "quill_gpu_memory_used_bytes": mem.used,
                "quill_gpu_memory_free_bytes": mem.free,
                "quill_gpu_memory_total_bytes": mem.total,
            }
            util = self._field(nv.nvmlDeviceGetUtilizationRates, h)
            if util is not None:
                values["quill_gpu_utilization_ratio"] = util.gpu / 100
                values["quill_gpu_memory_utilization_ratio"] = util.memory / 100
            values["quill_gpu_temperature_celsius"] = self._field(nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU)
            milliwatts = self._field(nv.nvmlDeviceGetPowerUsage, h)
            values["quill_gpu_power_watts"] = None if milliwatts is None else milliwatts / 1000
            for name, value in values.items():
                if value is not None:
                    gpus[name].append((labels, float(value)))
            for proc in self._field(nv.nvmlDeviceGetComputeRunningProcesses, h) or []:
                if proc.usedGpuMemory is not None:  # None: NVML cannot see it (e.g. another container)
                    processes.append((labels + (str(proc.pid),), float(proc.usedGpuMemory)))
        return gpus, processes

    def collect(self):
        r = self._reading
        yield GaugeMetricFamily("quill_gpu_exporter_nvml_up", "1 when the last NVML reading succeeded, else 0.",
                                value=1.0 if r.up else 0.0)
        yield GaugeMetricFamily("quill_gpu_exporter_scrape_duration_seconds",
                                "Seconds the last NVML reading took.", value=r.duration)
        if not r.up:
            return
        for name, help_ in GPU_SERIES.items():
            family = GaugeMetricFamily(name, help_, labels=GPU_LABELS)
            for labels, value in r.gpus.get(name, []):
                family.add_metric(labels, value)
            yield family
        family = GaugeMetricFamily(PROCESS_SERIES[0], PROCESS_SERIES[1], labels=GPU_LABELS + ("pid",))
        for labels, value in r.processes:
            family.add_metric(labels, value)
        yield family


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def serve(exporter: GpuExporter, host: str, port: int):
    """Answer scrapes on http://host:port/metrics from a daemon thread; returns the server."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(exporter)
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="quill gpu-exporter", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=9400)
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between NVML readings")
    args = p.parse_args(argv)
    if args.interval <= 0:
        p.error("--interval must be positive")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    exporter = GpuExporter()
    first = exporter.poll()  # before listening: the first scrape already has a reading
    try:
        server = serve(exporter, args.host, args.port)
    except (OSError, OverflowError) as exc:  # OverflowError: a port past 65535
        print(f"quill gpu-exporter: cannot listen on {args.host}:{args.port}: {getattr(exc, 'strerror', None) or exc}",
              file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    log.info("serving http://%s:%d/metrics (NVML %s, every %g s)", args.host, args.port,
             "up" if first.up else "down", args.interval)
    while not stop.wait(args.interval):
        exporter.poll()
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
