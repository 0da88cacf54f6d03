"""`quill gpu-exporter`: what a Prometheus scrape gets, against a FAKE NVML (tests/fake_nvml.py;
there is no GPU here) with two GPUs, a missing driver, and an NVML failure mid-run that heals;
then the real command as a process on this GPU-less machine, through the real pynvml."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pynvml
import pytest
from prometheus_client.parser import text_string_to_metric_families

from monitoring.gpu_exporter import GpuExporter, serve
from tests.fake_nvml import FakeNvml, two_gpus
from tests.processes import REPO, free_port, kill_group

GiB = 2**30


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one scrape, parsed by prometheus_client."""
    text = httpx.get(url, timeout=5).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text) for s in fam.samples
    }


def gpu_labels(index: int, uuid: str, **extra: str) -> tuple:
    return tuple(sorted({"gpu": str(index), "uuid": uuid, "name": "NVIDIA A100-SXM4-80GB", **extra}.items()))


@pytest.fixture
def exporter_at():
    """Serve a GpuExporter over HTTP on a free port, as `quill gpu-exporter` does."""
    servers = []

    def start(nvml) -> tuple[GpuExporter, str]:
        exporter = GpuExporter(nvml)
        port = free_port()
        servers.append(serve(exporter, "127.0.0.1", port))
        return exporter, f"http://127.0.0.1:{port}/metrics"

    yield start
    for server in servers:
        server.shutdown()


def test_two_gpus_are_exported_per_gpu_in_base_units(exporter_at):
    exporter, url = exporter_at(FakeNvml(two_gpus()))
    exporter.poll()
    got = scrape(url)
    a, b = gpu_labels(0, "GPU-11111111-aaaa"), gpu_labels(1, "GPU-22222222-bbbb")
    assert got[("quill_gpu_exporter_nvml_up", ())] == 1
    assert 0 <= got[("quill_gpu_exporter_scrape_duration_seconds", ())] < 1
    assert got[("quill_gpu_memory_total_bytes", a)] == 80 * GiB
    assert got[("quill_gpu_memory_used_bytes", a)] == 60 * GiB
    assert got[("quill_gpu_memory_free_bytes", a)] == 20 * GiB
    assert got[("quill_gpu_memory_used_bytes", b)] == 2 * GiB
    assert got[("quill_gpu_utilization_ratio", a)] == pytest.approx(0.87)
    assert got[("quill_gpu_memory_utilization_ratio", a)] == pytest.approx(0.45)
    assert got[("quill_gpu_utilization_ratio", b)] == 0
    assert got[("quill_gpu_temperature_celsius", a)] == 71
    assert got[("quill_gpu_power_watts", a)] == pytest.approx(312.5)
    # GPU 1 cannot report power: that one series is missing, the rest of the GPU is there.
    assert ("quill_gpu_power_watts", b) not in got
    assert got[("quill_gpu_temperature_celsius", b)] == 35
    # Per-process memory where NVML sees it; the process of another container is left out.
    procs = {dict(k[1])["pid"]: v for k, v in got.items() if k[0] == "quill_gpu_process_memory_used_bytes"}
    assert procs == {"4242": 50 * GiB, "4343": 10 * GiB}
    assert got[("quill_gpu_process_memory_used_bytes", gpu_labels(0, "GPU-11111111-aaaa", pid="4242"))] == 50 * GiB


def test_a_scrape_sees_the_last_reading_not_a_live_call(exporter_at):
    nvml = FakeNvml(two_gpus())
    exporter, url = exporter_at(nvml)
    exporter.poll()
    nvml.gpus[0].used = 79 * GiB
    assert scrape(url)[("quill_gpu_memory_used_bytes", gpu_labels(0, "GPU-11111111-aaaa"))] == 60 * GiB
    exporter.poll()
    assert scrape(url)[("quill_gpu_memory_used_bytes", gpu_labels(0, "GPU-11111111-aaaa"))] == 79 * GiB


def test_missing_driver_exports_nvml_up_0_and_logs_the_reason_once(exporter_at, caplog):
    exporter, url = exporter_at(FakeNvml(two_gpus(), driver=False))
    with caplog.at_level(logging.WARNING, logger="quill.gpu_exporter"):
        for _ in range(3):
            exporter.poll()
    got = scrape(url)
    assert got[("quill_gpu_exporter_nvml_up", ())] == 0
    assert ("quill_gpu_exporter_scrape_duration_seconds", ()) in got
    assert not [k for k in got if k[0].startswith("quill_gpu_") and not k[0].startswith("quill_gpu_exporter_")]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "NVML Shared Library Not Found" in warnings[0], warnings


def test_nvml_failure_mid_run_then_recovery(exporter_at, caplog):
    nvml = FakeNvml(two_gpus())
    exporter, url = exporter_at(nvml)
    exporter.poll()
    assert scrape(url)[("quill_gpu_exporter_nvml_up", ())] == 1

    nvml.failing = pynvml.NVML_ERROR_GPU_IS_LOST
    with caplog.at_level(logging.WARNING, logger="quill.gpu_exporter"):
        for _ in range(3):
            exporter.poll()
        got = scrape(url)
        assert got[("quill_gpu_exporter_nvml_up", ())] == 0
        assert ("quill_gpu_memory_used_bytes", gpu_labels(0, "GPU-11111111-aaaa")) not in got
        assert not nvml.initialised  # shut down, so the next try starts NVML afresh

        nvml.failing = None
        exporter.poll()
    got = scrape(url)
    assert got[("quill_gpu_exporter_nvml_up", ())] == 1
    assert got[("quill_gpu_memory_used_bytes", gpu_labels(0, "GPU-11111111-aaaa"))] == 60 * GiB
    assert nvml.init_calls >= 2
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages  # the reason once, then the recovery once
    assert "GPU is lost" in messages[0] and "answers again" in messages[1]


def _exporter_cmd() -> list[str]:
    quill = Path(sys.executable).with_name("quill")  # the installed entry point, as a user runs it
    return [str(quill)] if quill.exists() else [sys.executable, "-m", "serve_app.cli"]


def test_quill_gpu_exporter_runs_on_a_machine_without_gpu(tmp_path):
    port = free_port()
    log = tmp_path / "exporter.log"
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(_exporter_cmd() + ["gpu-exporter", "--port", str(port), "--host", "127.0.0.1",
                                                   "--interval", "0.2"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
    try:
        text = None
        while time.monotonic() - t0 < 15:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1).text
                break
            except httpx.HTTPError:
                assert proc.poll() is None, log.read_text()
                time.sleep(0.05)
        started = time.monotonic() - t0
        assert text is not None, log.read_text()
        assert "quill_gpu_exporter_nvml_up 0.0" in text
        # Well under 5 s even on this shared 2-core box: neither torch nor Ray is imported.
        assert started < 5, f"first scrape after {started:.1f} s"
        time.sleep(1)  # several more NVML attempts
        assert proc.poll() is None
        assert "quill_gpu_exporter_nvml_up 0.0" in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1).text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert log.read_text().count("NVML unavailable") == 1, log.read_text()
    finally:
        kill_group(proc, grace=5)


def test_the_exporter_path_imports_neither_torch_nor_ray():
    code = ("import sys, serve_app.cli, monitoring.gpu_exporter; "
            "print(sorted({'torch', 'ray', 'transformers'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env=dict(os.environ), timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_taken_port_is_a_clear_error(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = subprocess.run(_exporter_cmd() + ["gpu-exporter", "--port", str(port), "--host", "127.0.0.1"],
                             capture_output=True, text=True, cwd=REPO, timeout=30)
    assert out.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr and "Traceback" not in out.stderr
