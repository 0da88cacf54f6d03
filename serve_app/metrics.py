"""Quill's Prometheus metrics, recorded in whichever process does the work.

The series come from many processes (the ingress and every model-server replica, on any node),
so they must add up across processes. Inside a Ray Serve replica they are recorded with
`ray.serve.metrics`, which tags each series with its deployment and replica and exports it
through the metrics agent of the node (scraped on each node's metrics port; Ray prefixes the
names with `ray_`). Outside Ray (unit tests, the engine bench) they go to a process-local
prometheus_client registry instead.

`GET /metrics` on the app (see `render_cluster_metrics`) collects the `ray_quill_*` series from
every node's agent and shows them under their documented names, with Ray Serve's own
`ray_serve_*` series beside them, so a local run needs no Prometheus to see them and a local
Prometheus sees the same names as one that scrapes a cluster through monitoring/prometheus/.
"""
from __future__ import annotations

import asyncio
from typing import Iterable

from prometheus_client import CollectorRegistry, disable_created_metrics, generate_latest
from prometheus_client import Counter as _PCounter
from prometheus_client import Gauge as _PGauge
from prometheus_client import Histogram as _PHistogram
from prometheus_client.parser import text_string_to_metric_families

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# name: (kind, help, labels, buckets)
SPECS: dict[str, tuple[str, str, tuple[str, ...], tuple[float, ...] | None]] = {
    "quill_requests_total": ("counter", "Generations run by a model server, by final status.", ("model", "status"), None),
    "quill_requests_running": ("gauge", "Requests in the running batch of a model-server replica.", ("model",), None),
    "quill_requests_waiting": ("gauge", "Requests queued in a model-server replica.", ("model",), None),
    "quill_time_to_first_token_seconds": ("histogram", "Time from arrival at the model server to the first token.", ("model",), TTFT_BUCKETS),
    "quill_time_per_output_token_seconds": ("histogram", "Mean time between output tokens of a request.", ("model",), TPOT_BUCKETS),
    "quill_prompt_tokens_total": ("counter", "Prompt tokens prefilled.", ("model",), None),
    "quill_generated_tokens_total": ("counter", "Tokens generated, all choices.", ("model",), None),
    # The engine's prefix cache (docs/engine.md): prompt tokens copied instead of computed.
    "quill_prefix_cache_hit_tokens_total": ("counter", "Prompt tokens whose keys and values came from the prefix cache.", ("model",), None),
    "quill_prefix_cache_tokens": ("gauge", "Prompt tokens held in a replica's prefix cache.", ("model",), None),
    # Not one of the core series: how the ingress answered seeded requests (docs/api.md).
    "quill_cache_requests_total": ("counter", "Seeded requests by cache outcome: hit, joined (single-flight) or miss.", ("model", "outcome"), None),
    # A replica's own view of its memory (the GPU exporter sees the whole GPU, not the model).
    "quill_model_weights_bytes": ("gauge", "Bytes of the model's weights held by a replica.", ("model", "device"), None),
    "quill_model_kv_cache_bytes": ("gauge", "Bytes of a replica's KV cache (allocated and zeroed at start).", ("model", "device"), None),
    "quill_model_cuda_allocated_bytes": ("gauge", "torch.cuda.memory_allocated of a replica's GPU.", ("model", "device"), None),
    "quill_model_cuda_reserved_bytes": ("gauge", "torch.cuda.memory_reserved (caching allocator) of a replica's GPU.", ("model", "device"), None),
}
# Exported only by replicas on a GPU: a CPU-only machine never shows them.
GPU_ONLY = frozenset({"quill_model_cuda_allocated_bytes", "quill_model_cuda_reserved_bytes"})

LOCAL_REGISTRY = CollectorRegistry()  # used outside Ray
disable_created_metrics()  # `*_created` series only double the page; nothing here uses them


def _in_serve_replica() -> bool:
    try:
        from ray.serve import context

        return context._get_internal_replica_context() is not None
    except Exception:  # ray absent or not initialised: record locally
        return False


class _Metric:
    """One series family with a single call shape, whichever backend records it."""

    def __init__(self, name: str):
        kind, help_, labels, buckets = SPECS[name]
        self.kind = kind
        if _in_serve_replica():
            from ray.serve import metrics as rm

            # Ray appends no suffix of its own; its exporter keeps `_total` as given.
            if kind == "counter":
                self._m = rm.Counter(name, description=help_, tag_keys=labels)
            elif kind == "gauge":
                self._m = rm.Gauge(name, description=help_, tag_keys=labels)
            else:
                self._m = rm.Histogram(name, description=help_, boundaries=list(buckets), tag_keys=labels)
            self._ray = True
        else:
            base = name.removesuffix("_total") if kind == "counter" else name
            existing = LOCAL_REGISTRY._names_to_collectors.get(base)  # one family per process
            if existing is not None:
                self._m = existing
            elif kind == "counter":
                self._m = _PCounter(base, help_, labels, registry=LOCAL_REGISTRY)
            elif kind == "gauge":
                self._m = _PGauge(name, help_, labels, registry=LOCAL_REGISTRY)
            else:
                self._m = _PHistogram(name, help_, labels, buckets=buckets, registry=LOCAL_REGISTRY)
            self._ray = False

    def inc(self, value: float = 1.0, **labels: str) -> None:
        if value <= 0:
            return
        if self._ray:
            self._m.inc(value, tags=labels)
        else:
            self._m.labels(**labels).inc(value)

    def set(self, value: float, **labels: str) -> None:
        if self._ray:
            self._m.set(value, tags=labels)
        else:
            self._m.labels(**labels).set(value)

    def observe(self, value: float, **labels: str) -> None:
        if self._ray:
            self._m.observe(value, tags=labels)
        else:
            self._m.labels(**labels).observe(value)


class Metrics:
    """The metric objects of one process (create once per replica)."""

    def __init__(self) -> None:
        self.requests = _Metric("quill_requests_total")
        self.running = _Metric("quill_requests_running")
        self.waiting = _Metric("quill_requests_waiting")
        self.ttft = _Metric("quill_time_to_first_token_seconds")
        self.tpot = _Metric("quill_time_per_output_token_seconds")
        self.prompt_tokens = _Metric("quill_prompt_tokens_total")
        self.generated_tokens = _Metric("quill_generated_tokens_total")
        self.cache = _Metric("quill_cache_requests_total")
        self.prefix_hits = _Metric("quill_prefix_cache_hit_tokens_total")
        self.prefix_cached = _Metric("quill_prefix_cache_tokens")


class MemoryMetrics:
    """A model-server replica's memory gauges (created only there: the ingress has no model)."""

    def __init__(self) -> None:
        self.weights = _Metric("quill_model_weights_bytes")
        self.kv_cache = _Metric("quill_model_kv_cache_bytes")
        self.cuda_allocated = _Metric("quill_model_cuda_allocated_bytes")
        self.cuda_reserved = _Metric("quill_model_cuda_reserved_bytes")
        self._weights_bytes: int | None = None  # weights never change: measured once

    def record(self, engine, model: str) -> None:
        """Set the gauges from an Engine (or an AsyncEngine around one)."""
        runner = getattr(getattr(engine, "engine", engine), "runner", None)
        if runner is None:  # a test's stand-in engine holds no model
            return
        import torch

        device = str(runner.device)
        if self._weights_bytes is None:
            tensors = (t for name, v in vars(runner).items() if name not in ("k_cache", "v_cache")
                       for t in _reachable_tensors(v))
            self._weights_bytes = _tensor_bytes(tensors)
        self.weights.set(self._weights_bytes, model=model, device=device)
        self.kv_cache.set(runner.kv_cache_bytes(), model=model, device=device)
        if runner.device.type == "cuda":
            self.cuda_allocated.set(torch.cuda.memory_allocated(runner.device), model=model, device=device)
            self.cuda_reserved.set(torch.cuda.memory_reserved(runner.device), model=model, device=device)


def _reachable_tensors(obj, depth: int = 0):
    """Tensors held by a runner attribute: directly, in tuples/lists/dataclasses, or captured by
    the closures that `engine/linear.py` returns (the oneDNN-packed weights live only there)."""
    import dataclasses
    import functools

    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
        return
    if depth > 4:
        return
    if isinstance(obj, (list, tuple)):
        children = obj
    elif isinstance(obj, functools.partial):
        children = (*obj.args, *obj.keywords.values())
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        children = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    elif callable(obj) and getattr(obj, "__closure__", None):
        children = [c.cell_contents for c in obj.__closure__]
    else:
        return
    for child in children:
        yield from _reachable_tensors(child, depth + 1)


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        try:  # views of one storage (tied or transposed weights) count once
            storage = t.untyped_storage()
            key, size = ("storage", storage.data_ptr()), storage.nbytes()
        except RuntimeError:  # oneDNN-packed weights expose no storage
            key, size = ("tensor", id(t)), t.numel() * t.element_size()
        if key not in seen:
            seen.add(key)
            total += size
    return total


def render_local() -> bytes:
    return generate_latest(LOCAL_REGISTRY)


# Labels Ray adds that only make the local page harder to read; the replica and node labels
# stay, so series from different processes remain distinct and can be summed. Ray Serve's own
# series keep WorkerId: some (the controller's) carry no replica label to tell a restarted
# process's series from the one it replaced.
_DROP_LABELS = {"Component", "SessionName", "Version", "WorkerId", "JobId"}
_SERVE_DROP_LABELS = _DROP_LABELS - {"WorkerId"}


def _rename(name: str) -> str:
    return name[len("ray_"):] if name.startswith("ray_quill_") else name


# Ray Serve's own series (replicas, deployment status, HTTP status codes) keep their `ray_serve_`
# names, as they have on a cluster's node exports: the shipped rules and dashboard use them.
_KEPT_PREFIXES = ("ray_quill_", "ray_serve_")


def filter_quill_families(texts: Iterable[str]) -> bytes:
    """Merge node-agent scrapes into one exposition: the quill_* families (`ray_` removed) and
    Ray Serve's ray_serve_* families."""

    class _Collector:
        def __init__(self) -> None:
            self.families: dict[str, object] = {}

        def collect(self):
            return list(self.families.values())

    collector = _Collector()
    for text in texts:
        for fam in text_string_to_metric_families(text):
            if not fam.name.startswith(_KEPT_PREFIXES):
                continue
            name = _rename(fam.name)
            drop = _DROP_LABELS if name.startswith("quill_") else _SERVE_DROP_LABELS
            target = collector.families.get(name)
            if target is None:
                fam.name = name
                fam.samples, samples = [], fam.samples
                collector.families[name] = target = fam
            else:
                samples = fam.samples
            for s in samples:
                labels = {k: v for k, v in s.labels.items() if k not in drop and not k.startswith("otel_")}
                target.samples.append(s._replace(name=_rename(s.name), labels=labels))
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry)


async def render_cluster_metrics(timeout: float = 5.0) -> bytes:
    """Scrape every alive node's Ray metrics agent and keep the quill_* and ray_serve_* families."""
    import httpx
    import ray

    # ray.nodes() is a blocking GCS call: keep it off the replica's event loop.
    nodes = [n for n in await asyncio.to_thread(ray.nodes) if n.get("Alive") and n.get("MetricsExportPort")]
    urls = [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics" for n in nodes]
    async with httpx.AsyncClient(timeout=timeout) as client:
        results = await asyncio.gather(*(client.get(u) for u in urls), return_exceptions=True)
    texts = [r.text for r in results if not isinstance(r, BaseException) and r.status_code == 200]
    return filter_quill_families(texts)
