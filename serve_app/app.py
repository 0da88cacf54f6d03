"""The Ray Serve application graph: one ingress bound to one ModelServer deployment per model.

    serve run serve_app.app:build registry=models/registry.yaml

and a KubeRay serveConfigV2 (`import_path: serve_app.app:build`) start the same graph as
`quill serve`. The builder's args are either `registry: <path>` or the registry itself
(`models: [...]`, as a Helm chart would render it inline).

Resources come from the registry: each model replica reserves `cpus_per_replica` logical CPUs and
`gpus_per_replica` GPUs, and autoscales on ongoing requests between min and max replicas. The
ingress reserves only INGRESS_CPUS (a tenth of a CPU): Ray Serve's default of one CPU per
replica would, on a 2-core box, leave the second model unschedulable and `serve.run` waiting
forever.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any, AsyncIterator

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import ReplicaState

from serve_app.cache import DEFAULT_MAX_ENTRIES, DEFAULT_TTL, make_store
from serve_app.config import DEFAULT_REGISTRY, INGRESS_CPUS, ModelEntry, Registry, load_registry, parse_registry
from serve_app.engine.types import Delta, GenerationRequest
from serve_app.ingress import Service, create_app
from serve_app.metrics import render_cluster_metrics
from serve_app.errors import ApiError, overloaded
from serve_app.model_server import ModelServer

APP_NAME = "quill"
log = logging.getLogger("quill.app")

# What a call through a handle raises when the replica running it dies, both RayActorErrors
# (observed): ActorDiedError for every call a replica killed with -9 held, streamed or not,
# running or queued in its engine (tests/test_faults.py); ActorUnavailableError when its node's
# raylet died (tests/test_cluster.py). A call not yet sent to a replica is held by Serve until a
# new one runs, and completes.
REPLICA_LOST = (RayActorError,)


class ServeStatus:
    """Serve's view of the application, asked once for every model of a readiness probe.

    `/readyz` asks every model at once; each `serve.status()` is a round trip to Serve's
    controller, which a busy controller answers slowly. Concurrent askers share the call in
    flight; a later probe asks afresh, so a lost replica shows up on the next probe."""

    def __init__(self, fetch=serve.status):
        self.fetch = fetch
        self._pending: asyncio.Future | None = None

    async def get(self, timeout: float):
        if self._pending is None:
            self._pending = asyncio.ensure_future(asyncio.wait_for(asyncio.to_thread(self.fetch), timeout))
            self._pending.add_done_callback(self._done)
        # shield: one asker cancelled (its client left) must not cancel the call for the others
        return await asyncio.shield(self._pending)

    def _done(self, future: asyncio.Future) -> None:
        self._pending = None
        if not future.cancelled():
            future.exception()  # retrieved: an error is each asker's, not an unhandled one


class HandleBackend:
    """A model reached through its Ray Serve deployment handle."""

    def __init__(self, handle: DeploymentHandle, entry: ModelEntry, status: ServeStatus | None = None):
        self.handle, self.entry = handle, entry
        self.status = status or ServeStatus()
        self.not_ready_reason: str | None = None  # why the last ready() was False, for /readyz

    async def stream(self, request: GenerationRequest) -> AsyncIterator[list[Delta]]:
        responses = self.handle.options(stream=True).generate.remote(request)
        finished = False
        try:
            with self._replica_errors():
                async for item in responses:
                    if isinstance(item, ApiError):
                        raise item
                    yield item  # the deltas of one engine step (or of several, when this caller fell behind)
            finished = True
        finally:
            if not finished:
                # The caller stopped early (client gone, cancelled, error): cancel the call on
                # the replica, which closes the engine's stream and frees the batch slot.
                responses.cancel()

    async def call(self, method: str, *args: Any) -> Any:
        """One of the replica's unary calls (the tokenizer's); an ApiError it returns is raised."""
        with self._replica_errors():
            result = await getattr(self.handle, method).remote(*args)
        if isinstance(result, ApiError):
            raise result
        return result

    @contextlib.contextmanager
    def _replica_errors(self):
        try:
            yield
        except BackPressureError:  # Serve's queue limit for this deployment
            raise overloaded() from None
        except REPLICA_LOST as exc:
            # The replica's process or node died mid-call. Ray's message names actor ids, pids
            # and addresses, which no response may carry: they go to the log only.
            log.warning("model %r: replica lost during a request: %s: %s", self.entry.name, type(exc).__name__, exc)
            raise ApiError(503, "model_unavailable", f"model {self.entry.name!r} lost the replica serving "
                           "this request (its process or node died); retry") from None

    async def ready(self, timeout: float) -> bool:
        """At least one replica is running (so its model has loaded), as Serve's controller sees
        it: asking the controller, not a replica, never queues behind a busy replica's batch, and
        it turns false when the node holding the replicas dies. A model that may scale to zero is
        ready without replicas: the next request starts one."""
        self.not_ready_reason = await self._not_ready_reason(timeout)
        return self.not_ready_reason is None

    async def _not_ready_reason(self, timeout: float) -> str | None:
        if self.entry.autoscaling.min_replicas == 0:
            return None
        try:
            status = await self.status.get(timeout)
        except Exception:  # controller busy or restarting
            return "Serve's controller did not answer"
        app = status.applications.get(self.handle.app_name)
        deployment = app.deployments.get(self.handle.deployment_name) if app else None
        if deployment is None:
            return "not deployed yet"
        if deployment.replica_states.get(ReplicaState.RUNNING, 0) > 0:
            return None
        # Replica counts by state only: Serve's own message can carry tracebacks and addresses.
        # (serve.status() keys them by the state's name, a str, not by ReplicaState.)
        states = ", ".join(f"{n} {getattr(state, 'value', state).lower()}"
                           for state, n in deployment.replica_states.items() if n)
        return f"no replica running: {states}" if states else "no replica running"


def log_through_serve() -> None:
    """Quill's loggers write through Ray Serve's replica logger: into the replica's log file
    (`logs/serve/replica_*.log`), formatted as Serve's own lines, an error at once (Serve's
    buffer flushes on ERROR). Left alone they reached the file through Serve's redirect of
    stderr, as tuples of text, and a throughput-optimized Serve kept them in its 1,000-line
    buffer: an error id that a 500 named was in no log file until the server stopped."""
    quill, serve_logger = logging.getLogger("quill"), logging.getLogger("ray.serve")
    if serve_logger.handlers and not quill.handlers:
        for handler in serve_logger.handlers:
            quill.addHandler(handler)
        quill.setLevel(logging.INFO)
        quill.propagate = False


@serve.deployment
class ModelServerDeployment(ModelServer):
    """ModelServer as a Serve deployment; options (resources, autoscaling) are set per model."""

    def __init__(self, *args, **kwargs):
        log_through_serve()
        super().__init__(*args, **kwargs)


@serve.deployment(max_ongoing_requests=1000)
@serve.ingress()
class Ingress:
    def __init__(self, registry: dict, handles: dict[str, DeploymentHandle], cache: dict | None = None):
        log_through_serve()
        self.registry = Registry.model_validate(registry)
        cache = cache or {}
        store = make_store(cache.get("redis_url"), cache.get("ttl", DEFAULT_TTL), cache.get("max_entries", DEFAULT_MAX_ENTRIES))
        status = ServeStatus()  # one controller call per readiness probe, for every model
        backends = {m.name: HandleBackend(handles[m.name], m, status) for m in self.registry.models}
        self.service = Service(self.registry, backends, store, render_metrics=render_cluster_metrics)

    def __serve_build_asgi_app__(self):
        return create_app(self.service)

    async def drain(self, grace_s: float) -> dict:
        """`quill serve` calls this on SIGTERM, before Serve shuts down (serve_app/drain.py)."""
        return await self.service.drain.drain(grace_s)

    async def __del__(self):
        with contextlib.suppress(Exception):
            await self.service.flights.close()


# The ingress lives on the head node, beside Serve's controller (pinned the same way): losing a
# worker node then costs only the model replicas on it, and the API still answers for them.
# kuberay/chart renders the same options (a Serve config replaces ray_actor_options whole).
INGRESS_ACTOR_OPTIONS = {"num_cpus": INGRESS_CPUS, "resources": {"node:__internal_head__": 0.001}}


def deployment_options(entry: ModelEntry) -> dict[str, Any]:
    a = entry.autoscaling
    actor = {"num_cpus": entry.cpus, "num_gpus": entry.gpus_per_replica}
    if entry.resources:
        actor["resources"] = dict(entry.resources)
    # Passed only when set, so an unset one stays Serve's own default.
    delays = a.model_dump(include={"upscale_delay_s", "downscale_delay_s", "look_back_period_s"}, exclude_none=True)
    return {
        "name": f"model-{entry.name}",
        "ray_actor_options": actor,
        # The engine queues and batches itself; let Serve hand it a full batch plus its queue,
        # so overload surfaces as the engine's 503 rather than a silent wait in the router.
        "max_ongoing_requests": entry.engine.max_batch_size + entry.engine.max_waiting,
        "autoscaling_config": {
            "min_replicas": a.min_replicas,
            "initial_replicas": max(1, a.min_replicas),
            "max_replicas": a.max_replicas,
            "target_ongoing_requests": a.target_ongoing_requests,
            **delays,
        },
        # The engine steps in its own thread, so a busy replica still answers health checks;
        # the slack is for small, oversubscribed nodes where a check can wait for the GIL.
        "health_check_timeout_s": 60,
        # A writer's resends reach the replica whose prefix cache holds their document
        # (serve_app/routing.py); a replica busier than the others by half a batch is skipped.
        "request_router_config": {
            "request_router_class": "serve_app.routing.PrefixAffinityRouter",
            "request_router_kwargs": {"imbalance": max(1, entry.engine.max_batch_size // 2)},
        },
        "graceful_shutdown_timeout_s": 5,
    }


def cache_settings() -> dict:
    """Cache settings from the environment of the process that builds the app."""
    return {
        "redis_url": os.environ.get("REDIS_URL") or None,
        "ttl": float(os.environ.get("QUILL_CACHE_TTL", DEFAULT_TTL)),
        "max_entries": int(os.environ.get("QUILL_CACHE_MAX_ENTRIES", DEFAULT_MAX_ENTRIES)),
    }


def build_app(registry: Registry, cache: dict | None = None):
    handles = {m.name: ModelServerDeployment.options(**deployment_options(m)).bind(m.model_dump()) for m in registry.models}
    ingress = Ingress.options(ray_actor_options=INGRESS_ACTOR_OPTIONS)
    return ingress.bind(registry.model_dump(), handles, cache if cache is not None else cache_settings())


def build(args: dict[str, Any] | None = None):
    """Application builder for `serve run` and serveConfigV2 (`import_path: serve_app.app:build`)."""
    args = dict(args or {})
    if "models" in args:
        # Relative local sources resolve against `base_dir` (the chart passes where the image
        # keeps models/), as they resolve against the registry file's folder locally.
        base_dir = args.get("base_dir") or os.getcwd()
        registry = parse_registry({"models": args["models"]}, base_dir, "serveConfigV2 args")
    else:
        registry = load_registry(args.get("registry") or os.environ.get("QUILL_REGISTRY", DEFAULT_REGISTRY))
    return build_app(registry)
