"""The `quill` command.

    quill serve [--registry models/registry.yaml] [--host 127.0.0.1] [--port 8000]
    quill render-k8s --registry PATH [--values FILE] [--namespace NS]
    quill train ... | quill evaluate ... | quill data ... | quill bench engine|serve|load|idle ...

`serve` validates the registry before anything starts, brings up a local Ray listening on
loopback only (serve_app/local_ray.py; or joins the cluster at --address / RAY_ADDRESS),
deploys the app, prints the URL once every model has loaded, and serves until SIGINT or
SIGTERM, then shuts its local Ray Serve and Ray down (on a cluster joined with --address it
deletes only its own application: the cluster and any other applications on it keep running).
The other commands are front doors: they import their module only when called.
"""
from __future__ import annotations

import argparse
import asyncio
import errno
import importlib
import math
import os
import re
import signal
import socket
import sys
import threading
import time

from serve_app import local_ray
from serve_app.config import (DEFAULT_REGISTRY, MIN_SHARED_CPUS, RegistryError, load_registry, required_cpus, required_gpus,
                              set_torch_env, share_cpus)


def _cannot_listen(host: str, port: int) -> str | None:
    """Why `quill serve` could not listen on host:port, or None."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except OSError as exc:
        return f"--host {host} is not an address of this machine ({exc.strerror or exc})"
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"{host}:{port} is already in use (pass --port)"
            return f"cannot listen on {host}:{port} ({exc.strerror or exc})"
    return None


def _port(text: str) -> int:
    """An argparse type: a TCP port number."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1-65535)")
    return int(text)


def _cpus(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of CPUs (more than 0)")
    return value


class _Import(threading.Thread):
    """Import a module in the background; get() waits for it (and re-raises its error)."""

    def __init__(self, name: str):
        super().__init__(name=f"import-{name}", daemon=True)
        self.module_name, self.module, self.error = name, None, None
        self.start()

    def run(self) -> None:
        try:
            self.module = importlib.import_module(self.module_name)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            self.error = exc

    def get(self):
        self.join()
        if self.error is not None:
            raise self.error
        return self.module


class _Stop(Exception):
    pass


def serve_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="quill serve", description="Serve every model of the registry.")
    p.add_argument("--registry", default=os.environ.get("QUILL_REGISTRY", DEFAULT_REGISTRY))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="join this Ray cluster instead of starting a local one")
    p.add_argument("--num-cpus", type=_cpus, default=None,
                   help="logical CPUs for the local Ray (default: this machine's cores)")
    p.add_argument("--metrics-export-port", type=_port, default=None,
                   help="port of the local Ray's metrics export, as a cluster's Prometheus scrapes it "
                        "(ray_quill_*, ray_serve_*; default: a free port)")
    args = p.parse_args(argv)
    t0 = time.monotonic()

    try:
        registry = load_registry(args.registry)
    except RegistryError as exc:
        print(f"quill serve: the registry cannot be served:\n{exc}", file=sys.stderr)
        return 2

    problem = None if args.address else _cannot_listen(args.host, args.port)
    if problem:  # Ray Serve's proxy would retry binding forever; say it now instead
        print(f"quill serve: {problem}", file=sys.stderr)
        return 2

    # Before Ray starts, so its workers inherit them: a local run needs no token auth, and
    # OpenMP workers that spin long steal the few cores from the other replicas.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    set_torch_env()
    # Serve's controller wakes every 0.1 s by default: 3.3% of a core with nothing to do, and
    # each wake-up preempts an engine thread on a small box (an idle 20 s of `quill serve`: every
    # Ray process together 13.0% of a core, 9.6% at 0.5 s). Its work (autoscaling over windows
    # of 10 s or more, health checks every 10 s) does not need the faster loop.
    os.environ.setdefault("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.5")

    local = not args.address
    num_cpus = args.num_cpus or float(os.cpu_count() or 1)
    shared = [m.name for m in registry.models if m.cpus_per_replica is None]
    if local:
        registry = share_cpus(registry, num_cpus)
    problem = _local_fit_problem(registry, num_cpus, shared) if local else None
    if problem:
        print(f"quill serve: {problem}", file=sys.stderr)
        return 2

    if local:
        # Before Ray is imported (just below): a Ray of our own listens on loopback only.
        local_ray.prepare_environment()
        # Ray Serve's throughput-optimized data plane: HAProxy (a C binary that ray[serve]
        # installs) takes HTTP in place of Serve's Python proxy and hands it to the ingress
        # replica, which serves it itself; replicas call each other over gRPC; user code runs
        # on the replica's own event loop. The issue-#11 burst on 2 cores: the request path
        # (every process but the model's replica) took 0.73-1.29 CPU-s a burst through the
        # Python proxy, 0.35-0.51 this way, and the engine gets what is left (docs/performance.md).
        os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
        os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
        # An ingress replica behind HAProxy otherwise stays up 30 s when it stops, for load
        # balancers to notice; `quill serve` has drained it already (_drain).
        os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "0")
        # HAProxy's stats page and exporter default to fixed ports (8404, 9101): a second
        # local server would fail to bind them. local_ray keeps both on loopback.
        os.environ.setdefault("RAY_SERVE_HAPROXY_STATS_PORT", str(local_ray.free_port()))
        os.environ.setdefault("RAY_SERVE_HAPROXY_METRICS_PORT", str(local_ray.free_port()))
        # So do the fallback proxy behind HAProxy (8500, 9500) and the ingress replicas' own
        # servers (the first free port from 30000, 40000). Shared, an HAProxy left behind by one
        # server (a SIGKILL) forwarded its --port to the next local server's proxy or replica:
        # other models, other API keys. Each server now starts from ports of its own.
        os.environ.setdefault("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", str(local_ray.free_port()))
        os.environ.setdefault("RAY_SERVE_FALLBACK_PROXY_GRPC_PORT", str(local_ray.free_port()))
        for protocol in ("HTTP", "GRPC"):  # Serve hands out ports from MIN to MAX, in order
            if f"RAY_SERVE_DIRECT_INGRESS_MIN_{protocol}_PORT" not in os.environ:
                low = local_ray.free_port(span=8)
                os.environ[f"RAY_SERVE_DIRECT_INGRESS_MIN_{protocol}_PORT"] = str(low)
                os.environ[f"RAY_SERVE_DIRECT_INGRESS_MAX_{protocol}_PORT"] = str(min(low + 1000, 65535))
        # HAProxy answers 400 itself (an HTML page: its errorfiles do not apply to requests it
        # cannot parse) to headers that overflow its buffer, 16 KiB by default: at 64 KiB the
        # front door's JSON 431 at QUILL_MAX_HEADER_BYTES (32 KiB by default) comes first.
        os.environ.setdefault("RAY_SERVE_HAPROXY_TUNE_BUFSIZE", str(64 * 1024))

    # serve_app.app pulls in Ray Serve, FastAPI and friends (seconds of CPU on a small box):
    # import it in a thread while Ray starts its own processes.
    app_module = _Import("serve_app.app")

    stop = threading.Event()
    deployed = False
    node_id = ""  # a local Ray's: its HAProxy is stopped by name at exit (local_ray.stop_haproxy)

    def on_signal(signum, _frame):
        if stop.is_set():  # second signal: give up on a clean shutdown
            if node_id:
                local_ray.stop_haproxy(node_id)
            os._exit(130)
        stop.set()
        raise _Stop()

    import ray
    from ray import serve

    try:
        if local:
            with local_ray.processes_in_a_group_of_their_own():
                _start_local_ray(args, num_cpus)
        else:
            ray.init(address=args.address, logging_level="WARNING")
        # After ray.init: Ray's core worker installs its own SIGTERM handler, which would end
        # the process without shutting Serve down.
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        if local:
            node_id = ray.get_runtime_context().get_node_id()
        # The proxy runs on the head node only: that is the address printed below, and several
        # Ray nodes on one machine would otherwise each try to bind the same port.
        from serve_app.security import proxy_http_options  # the idle keep-alive (docs/security.md)

        serve.start(proxy_location="HeadOnly", http_options={"host": args.host, "port": args.port, **proxy_http_options()})
        app = app_module.get()
        serve.run(app.build_app(registry), name=app.APP_NAME, route_prefix="/")
        deployed = True
        _print_loaded_models(registry, app.APP_NAME)
        url = f"http://{args.host}:{args.port}"
        # The Ray address lets `ray status --address` or `serve.status()` look inside a local run.
        print(f"Quill is serving {', '.join(registry.names)} at {url} "
              f"(ready in {time.monotonic() - t0:.1f} s; Ray at {ray.get_runtime_context().gcs_address}; "
              "Ctrl-C to stop)", flush=True)
        while not stop.wait(1.0):
            pass
    except (_Stop, KeyboardInterrupt):
        pass
    except Exception as exc:
        failures = _deployment_failures()
        # Ray's own message names the first deployment that failed ("Failed to update the
        # deployments ['model-a']") when several did: with the reasons at hand, count them instead.
        head = (f"{len(failures)} deployment(s) failed" if failures else f"{type(exc).__name__}: {exc}")
        print(f"quill serve: failed to start: {head}", file=sys.stderr, flush=True)
        for line in failures:
            print(f"  {line}", file=sys.stderr, flush=True)
        _shutdown(local, node_id)
        return 1
    print("quill serve: shutting down", flush=True)
    if deployed:
        _drain()
    _shutdown(local, node_id)
    return 0


_handles_loop: asyncio.AbstractEventLoop | None = None


def _start_local_ray(args: argparse.Namespace, num_cpus: float) -> None:
    import ray

    ray.init(
        # "local": a new Ray of our own. With no address, ray.init would join any cluster
        # a `ray start` left on this machine, and our shutdown would take its Serve down.
        address="local",
        **local_ray.init_options(),
        num_cpus=int(num_cpus) if float(num_cpus).is_integer() else num_cpus,
        include_dashboard=False,
        _metrics_export_port=args.metrics_export_port or local_ray.free_port(),
        _system_config={
            # Metrics reach the node's agent every 2 s instead of 10 s: /metrics is fresh.
            "metrics_report_interval_ms": 2000,
            # Ray runs its workers at nice 15, but here the workers are the server (proxy,
            # ingress, engines): on a shared machine they would starve behind any busy
            # process, with seconds added to every token.
            "worker_niceness": 0,
        },
        logging_level="WARNING",
    )


def _on_handles_loop(coro, timeout: float):
    """Run a coroutine that calls Serve handles, on one loop that runs until the process ends.
    In Serve's throughput-optimized mode a handle routes on the caller's event loop (`.result()`
    outside one raises), and Serve's update listeners stay bound to that loop: one that closed
    (asyncio.run) had Serve log an ERROR at every start ("LongPollClient ... has been disabled")
    and fail its own shutdown ("Event loop is closed")."""
    global _handles_loop
    if _handles_loop is None:
        _handles_loop = asyncio.new_event_loop()
        threading.Thread(target=_handles_loop.run_forever, name="quill-handles", daemon=True).start()
    return asyncio.run_coroutine_threadsafe(coro, _handles_loop).result(timeout)


def _drain() -> None:
    """Let the ingress finish its open requests, or end them readably, before Serve goes down:
    Serve's shutdown kills the HTTP proxy at once, cutting every connection (serve_app/drain.py)."""
    from ray.serve.handle import DeploymentHandle

    from serve_app.app import APP_NAME
    from serve_app.drain import grace_seconds

    grace = grace_seconds()
    print(f"quill serve: draining (new requests get 503; open ones have {grace:g} s)", flush=True)

    async def drain() -> dict:
        call = DeploymentHandle("Ingress", APP_NAME).drain
        try:
            return await asyncio.wait_for(call.remote(grace), grace + 15)
        finally:
            await call.shutdown_async()

    try:
        done = _on_handles_loop(drain(), grace + 20)
        print(f"quill serve: drained: {done['finished']} of {done['open']} open requests finished, "
              f"{done['ended']} ended with an error, {done['websockets_closed']} WebSockets closed "
              f"({done['seconds']:g} s)", flush=True)
    except Exception as exc:  # best effort: shutting down goes on
        why = (f"the ingress did not answer within {grace + 20:g} s (Ray busy or the ingress stuck)"
               if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}")
        print(f"quill serve: drain failed: {why}; stopping anyway, so open requests may be cut",
              file=sys.stderr, flush=True)


def _print_loaded_models(registry, app_name: str) -> None:
    """One line per model: how long it took to load and what it serves in (the dtype `auto`
    chose). The replica logs it too, but a throughput-optimized Serve keeps replica logs in its
    files, out of this output."""
    from ray import serve

    async def ask(name: str):  # a throughput-optimized Serve's handles work inside a loop only
        handle = serve.get_deployment_handle(f"model-{name}", app_name)
        try:
            return await asyncio.wait_for(handle.ready.remote(), 10)
        finally:  # else its router, left running, calls into Ray after ray.shutdown() at exit
            await handle.shutdown_async()

    async def ask_all():
        return await asyncio.gather(*(ask(m.name) for m in registry.models), return_exceptions=True)

    for m, info in zip(registry.models, _on_handles_loop(ask_all(), 60)):
        if isinstance(info, BaseException):  # a line that is only informative
            info = {"load_seconds": float("nan"), "weights": f"not asked: {type(info).__name__}"}
        print(f"quill serve: model {m.name} loaded in {info['load_seconds']:.1f} s ({info['weights']})", flush=True)
        for warning in info.get("warnings", ()):
            print(f"quill serve: model {m.name}: warning: {warning}", flush=True)


def _local_fit_problem(registry, num_cpus: float, shared: list[str] = ()) -> str | None:
    """Why a local Ray could never schedule the registry's first replicas, or None (`shared`:
    the models whose cpus_per_replica `share_cpus` chose).

    Ray would not fail: it would wait forever for resources that are not there."""
    need_cpus, need_gpus = required_cpus(registry), required_gpus(registry)
    if need_cpus > num_cpus + 1e-9:
        why = (f"; a model that leaves cpus_per_replica unset, as {len(shared)} here do, gets an equal share "
               f"of what is left, but at least {MIN_SHARED_CPUS:g}" if shared else "")
        return (f"the registry needs {need_cpus:g} logical CPUs to start (ingress plus cpus_per_replica "
                f"x min_replicas per model{why}) but Ray has {num_cpus:g}; set a lower cpus_per_replica "
                "in the registry or pass --num-cpus.")
    placed = [m for m in registry.models if m.resources]
    if placed:
        return (f"model {placed[0].name!r} asks for the Ray resources {placed[0].resources}, which only "
                "nodes started with them have (`ray start --resources`); serve it on such a cluster "
                "with --address, or remove `resources` from the registry.")
    have_gpus = _local_gpu_count() if need_gpus else 0
    if need_gpus > have_gpus + 1e-9:
        return (f"the registry needs {need_gpus:g} GPUs to start (gpus_per_replica x min_replicas per "
                f"model) but this machine has {have_gpus}; set gpus_per_replica: 0 to serve on the "
                "CPU, or run on a GPU node or cluster (--address).")
    return None


def _local_gpu_count() -> int:
    """NVIDIA GPUs a local Ray would see (CUDA_VISIBLE_DEVICES first), without importing torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no library: no GPU
        return 0


def _deployment_failures() -> list[str]:
    """Why each unhealthy deployment failed, one line each (the last line of the replica's
    traceback), so a broken checkpoint is named without reading Ray's logs."""
    try:
        from ray import serve

        from serve_app.app import APP_NAME

        app = serve.status().applications.get(APP_NAME)
        out = []
        for name, d in (app.deployments if app else {}).items():
            lines = [ln.strip() for ln in (d.message or "").splitlines() if ln.strip()]
            if str(d.status).endswith("HEALTHY") and not str(d.status).endswith("UNHEALTHY"):
                continue
            label = f"model {name.removeprefix('model-')!r}" if name.startswith("model-") else name
            # The exception line of the traceback (and its continuation lines), not the frames.
            starts = [i for i, ln in enumerate(lines) if re.match(r"^[\w.]*(Error|Exception|Exit)\b.*:", ln)]
            reason = " ".join(lines[starts[-1]:]) if starts else (lines[-1] if lines else str(d.status))
            # An error that already names its model (e.g. a bucket that cannot be read) is shown
            # as it is, without the exception's class path in front.
            message = reason.split(": ", 1)[-1]
            out.append(message[:400] if message.startswith(f"{label}: ") else f"{label}: {reason[:400]}")
        return out
    except Exception:  # best effort: the error above still stands
        return []


def _shutdown(local: bool, node_id: str = "") -> None:
    # Ignore further Ctrl-C while cleaning up, except that a second one still exits hard.
    import ray
    from ray import serve

    try:
        if ray.is_initialized():
            if local and _handles_loop is not None:  # on the loop Serve's routers run on
                _on_handles_loop(serve.shutdown_async(), 120)
            elif local:
                serve.shutdown()
            else:
                from serve_app.app import APP_NAME

                serve.delete(APP_NAME)
    except BaseException as exc:  # noqa: BLE001 - best effort, Ray goes next anyway
        print(f"quill serve: serve shutdown: {exc}", file=sys.stderr)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if node_id:
            local_ray.stop_haproxy(node_id)


def _front_door(module: str, argv: list[str]) -> int:
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        print(f"quill: {module} is not available: {exc}", file=sys.stderr)
        return 2
    rc = mod.main(argv)
    return int(rc or 0)


USAGE = """usage: quill <command> [args]

commands:
  serve       serve every model of the registry (quill serve --help)
  render-k8s  print the Kubernetes manifests (KubeRay RayService, ...) for a registry
  train       fine-tune a model (training.train)
  evaluate    evaluate checkpoints (training.evaluate)
  data        prepare the training data splits (training.data)
  bench       benchmarks: quill bench engine|serve|load|idle ... (docs/performance.md)
  gpu-exporter  Prometheus exporter of this node's GPUs via NVML (quill gpu-exporter --port 9400)
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "serve":
        return serve_main(rest)
    if cmd == "render-k8s":
        return _front_door("serve_app.k8s", rest)
    if cmd == "train":
        return _front_door("training.train", rest)
    if cmd == "evaluate":
        return _front_door("training.evaluate", rest)
    if cmd == "data":
        return _front_door("training.data", rest)
    if cmd == "gpu-exporter":
        return _front_door("monitoring.gpu_exporter", rest)
    if cmd == "bench":
        if not rest or rest[0] in ("-h", "--help"):
            print("usage: quill bench engine|serve|load|idle [args]  (quill bench <name> --help)")
            return 0 if rest else 2
        return _front_door(f"bench.{rest[0]}", rest[1:])
    print(f"quill: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
