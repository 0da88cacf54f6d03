"""Queue-length autoscaling for real: a local `quill serve` whose model may run 1 or 2 replicas
(half a CPU each, so both fit this 2-core box). Streams above the target make Serve add the
second replica; a trickle below it makes Serve remove it again. The replica count is read the
way an operator would, through Serve's status API on the server's Ray (`quill serve` prints
its address), and every request of the load must complete while replicas come and go.
"""
from __future__ import annotations

import re
import sys
import threading
import time

import httpx
import pytest

from tests.processes import kill_group, registry_entry, start_quill_serve, wait_until, write_registry

pytestmark = pytest.mark.integration

# Short delays and look-back window (the registry's knobs) so a scale-up and a scale-down fit
# in a test; Serve's defaults (30 s up, 600 s down) are what production runs with.
AUTOSCALING = ("{min_replicas: 1, max_replicas: 2, target_ongoing_requests: 2, "
               "upscale_delay_s: 1, downscale_delay_s: 5, look_back_period_s: 11}")
MAX_TOKENS = 150


@pytest.fixture(scope="module")
def server(tiny_checkpoints, tmp_path_factory):
    import ray

    root = tmp_path_factory.mktemp("autoscaling")
    registry = write_registry(root / "registry.yaml", [registry_entry(
        "tiny", tiny_checkpoints["tiny-a"], autoscaling=AUTOSCALING,
        limits=f"{{max_prompt_tokens: 32, max_tokens: {MAX_TOKENS}, max_n: 1}}")])
    from ray._private import ray_constants

    quill = start_quill_serve(registry, root)
    # quill serve's Ray keeps its node IP on loopback (serve_app/local_ray.py); a driver joining
    # it must too, or Ray swaps 127.0.0.1 for the machine's address and waits forever for a GCS
    # that is not there. What RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 does, for a process that has
    # imported Ray already.
    clusters = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        address = re.search(r"Ray at (\S+);", quill.log_text()).group(1)
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        yield quill
    finally:
        # Leave the server's Ray before it stops: a driver whose cluster vanishes ends its process.
        ray.shutdown()
        ray_constants.ENABLE_RAY_CLUSTER = clusters
        kill_group(quill.proc, grace=0)


def _running_replicas() -> int:
    from ray import serve

    deployment = serve.status().applications["quill"].deployments["model-tiny"]
    return deployment.replica_states.get("RUNNING", 0)


class _Load:
    """`writers` threads, each streaming one completion after another until stopped; a stream
    counts as completed only when it ends with its finish reason and [DONE], with no error."""

    def __init__(self, url: str, writers: int):
        self.url, self.stop, self.completed, self.failures = url, threading.Event(), 0, []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._write, args=(i,), daemon=True) for i in range(writers)]
        for t in self.threads:
            t.start()

    def _write(self, i: int) -> None:
        with httpx.Client(timeout=120) as client:
            while not self.stop.is_set():
                body = {"model": "tiny", "prompt": f"Writer {i} says", "max_tokens": MAX_TOKENS, "stream": True}
                try:
                    with client.stream("POST", self.url + "/v1/completions", json=body) as r:
                        lines = [line for line in r.iter_lines() if line]
                    # "stop" too: the random model samples its end-of-text token now and then.
                    ok = (r.status_code == 200 and lines[-1] == "data: [DONE]"
                          and any(f'"finish_reason":"{why}"' in lines[-2] for why in ("length", "stop"))
                          and not any(line.startswith("event: error") for line in lines))
                    problem = None if ok else f"HTTP {r.status_code}: {lines[-3:]}"
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    problem = repr(exc)
                with self.lock:
                    if problem:
                        self.failures.append(problem)
                    else:
                        self.completed += 1

    def finish(self) -> int:
        self.stop.set()
        for t in self.threads:
            t.join(120)
        assert not self.failures, f"{len(self.failures)} requests failed, e.g. {self.failures[:3]}"
        return self.completed


def test_load_above_the_target_adds_a_replica_and_a_trickle_removes_it_without_losing_a_request(server):
    assert _running_replicas() == 1

    t0 = time.monotonic()
    burst = _Load(server.url, writers=8)  # 8 in flight against a target of 2 per replica
    wait_until("Serve to add the second replica under load", lambda: _running_replicas() == 2, 150)
    up = time.monotonic() - t0
    time.sleep(5)  # keep the load on both replicas a while
    burst_done = burst.finish()

    t1 = time.monotonic()
    trickle = _Load(server.url, writers=1)  # 1 in flight: below the target, so one replica suffices
    wait_until("Serve to remove the second replica once the load fell", lambda: _running_replicas() == 1, 150)
    down = time.monotonic() - t1
    time.sleep(3)  # requests keep flowing to the remaining replica after the removal
    trickle_done = trickle.finish()

    assert burst_done > 8 and trickle_done > 1
    print(f"\nautoscaling: 2nd replica running {up:.1f} s after the load began; removed {down:.1f} s "
          f"after it fell; {burst_done} + {trickle_done} streams, none lost", file=sys.stderr)
