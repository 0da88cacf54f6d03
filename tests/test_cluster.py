"""`quill serve --address` on a real two-node Ray cluster started on this machine with `ray start`:
a head node (Serve's controller, the proxy, the ingress) and a worker node that alone has the
custom resource `quill-gpu-node` (standing in for a GPU node pool), which the model asks for in
the registry. Losing the worker node must fail the in-flight stream with an error event, turn
/readyz red for that model, and a new node must bring it back. One cluster and one server for
each HTTP data plane; the tests run in order.

Two data planes, each set on every node as the chart's `env` would set it on every pod: Serve's
Python proxy (what the chart runs) and HAProxy in front of the ingress replica with gRPC between
replicas (what a local `quill serve` runs, and what the chart's `env` can turn on,
kuberay/README.md).
"""
from __future__ import annotations

import json
import signal
import sys
import time

import httpx
import psutil
import pytest

from tests.conftest import save_tiny_gpt2
from tests.processes import (Completion, free_ports, kill_group, ray_cluster, registry_entry, start_quill_serve,
                             wait_until, write_registry)

pytestmark = pytest.mark.integration

NODE_RESOURCE = {"quill-gpu-node": 4}
REPLICA = "ServeReplica:quill:model-tiny"


def _haproxy_env() -> dict[str, str]:
    stats, metrics = free_ports(2)  # HAProxy's defaults (8404, 9101) may be taken on this machine
    # Serve otherwise holds a stopping ingress replica 30 s for external load balancers to
    # deregister it (SIGTERM to `quill serve --address` took 32 s); none stands in front here, and
    # `quill serve` has drained the ingress before it deletes the app (docs/cluster.md, "Tests").
    return {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1",
            "RAY_SERVE_HAPROXY_STATS_PORT": str(stats), "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics),
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}


@pytest.fixture(scope="module", params=["serve-proxy", "haproxy"])
def deployed(request, tmp_path_factory):
    env = _haproxy_env() if request.param == "haproxy" else {}
    root = tmp_path_factory.mktemp("cluster")
    # n_positions 1024: a stream long enough (seconds, even on a fast box) to be cut mid-way.
    ckpt = save_tiny_gpt2(root / "tiny", n_positions=1024)
    registry = write_registry(root / "registry.yaml", [registry_entry(
        "tiny", ckpt, resources="{quill-gpu-node: 1}", engine="{max_batch_size: 8, max_seq_len: 1024}",
        limits="{max_prompt_tokens: 64, max_tokens: 900, max_n: 4}")])
    with ray_cluster(root, num_cpus=1, env=env) as cluster:
        cluster.add_worker(num_cpus=1, resources=NODE_RESOURCE)
        server = start_quill_serve(registry, root, "--address", cluster.address, env=env)
        try:
            yield cluster, server
        finally:
            kill_group(server.proc, grace=0)


def _placement(cluster) -> dict[str, set[str]]:
    """Actor class -> the kinds of node its live actors run on ("head", or the worker's resource)."""
    kinds = {n.node_id: "head" if n.is_head_node else ",".join(k for k in n.resources_total if k in NODE_RESOURCE)
             for n in cluster.alive_nodes()}
    out: dict[str, set[str]] = {}
    for a in cluster.alive_actors():
        out.setdefault(a.class_name, set()).add(kinds.get(a.node_id, "?"))
    return out


def test_model_replicas_run_on_the_node_with_their_resource_and_the_front_on_the_head(deployed):
    cluster, server = deployed
    where = _placement(cluster)
    assert where.get(REPLICA) == {"quill-gpu-node"}, where
    assert where.get("ServeReplica:quill:Ingress") == {"head"} and where.get("ProxyActor") == {"head"}, where
    # With HAProxy, its manager runs where the proxy would (and the proxy stays as Serve's fallback).
    assert ("HAProxyManager" in where) == (bool(cluster.env)), where
    if cluster.env:
        assert where["HAProxyManager"] == {"head"}, where
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 5}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    assert server.proc.poll() is None  # `quill serve --address` keeps running, as documented


def _readyz(server) -> tuple[int, dict]:
    r = httpx.get(server.url + "/readyz", timeout=10)
    body = r.json()
    return r.status_code, body.get("models") or body["error"]["models"]


def test_losing_the_node_fails_the_stream_with_an_error_event_and_readyz_until_a_new_node_joins(deployed):
    cluster, server = deployed
    worker = cluster.nodes[1]
    stream = Completion(server.url, {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 900, "stream": True})
    wait_until("the stream's first tokens", lambda: len(stream.events) >= 5, 60, every=0.01)

    raylet = next(p for p in psutil.Process(worker.pid).children(recursive=True) if p.name() == "raylet")
    raylet.send_signal(signal.SIGKILL)
    killed = time.monotonic()

    stream.join(90)
    assert not stream.is_alive(), "the stream neither finished nor failed 90 s after its node died"
    ended = time.monotonic() - killed
    assert stream.error is None, f"the connection was cut instead of ending with an error event: {stream.error!r}"
    assert stream.events[-1] == (None, "[DONE]")
    event, data = stream.events[-2]
    assert event == "error", f"the stream ended without an error event: {stream.events[-3:]}"
    error = json.loads(data)["error"]
    assert error["type"] == "model_unavailable" and "tiny" in error["message"], error
    assert "Actor" not in error["message"] and "127.0.0.1" not in error["message"]  # no Ray internals leak
    got = sum(1 for e, d in stream.events if e is None and d != "[DONE]")
    assert 5 <= got < 900, got

    wait_until("/readyz to report the model unready", lambda: _readyz(server) == (503, {"tiny": False}), 90)
    unready = time.monotonic() - killed
    # Sent while the model has no replica: Serve holds it until one runs again.
    waiting = Completion(server.url, {"model": "tiny", "prompt": "Hello", "max_tokens": 5, "stream": True})

    rejoined = time.monotonic()
    cluster.add_worker(num_cpus=1, resources=NODE_RESOURCE)
    wait_until("/readyz to report the model ready on the new node", lambda: _readyz(server) == (200, {"tiny": True}), 180)
    recovered = time.monotonic() - rejoined
    waiting.join(60)
    assert waiting.error is None and waiting.events[-1] == (None, "[DONE]"), (waiting.error, waiting.events[-3:])
    assert '"finish_reason":"length"' in waiting.events[-2][1], waiting.events[-3:]
    assert _placement(cluster).get(REPLICA) == {"quill-gpu-node"}
    print(f"\nnode lost: error event after {ended:.1f} s, /readyz unready after {unready:.1f} s; "
          f"new node: ready after {recovered:.1f} s", file=sys.stderr)


def test_sigterm_deletes_only_the_quill_app_and_leaves_the_cluster_running(deployed):
    cluster, server = deployed
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(60) == 0, server.log_text()[-2000:]
    assert len(cluster.alive_nodes()) == 2  # the head and the second worker: nothing was stopped

    def quill_gone():
        classes = {a.class_name for a in cluster.alive_actors()}
        return None if any(c.startswith("ServeReplica:quill:") for c in classes) else classes

    classes = wait_until("the quill app's replicas to stop", quill_gone, 60)
    assert "ServeController" in classes  # Serve itself stays, for other applications
