"""A local Ray that listens on loopback only.

Ray runs with its authentication off here (RAY_AUTH_MODE=disabled), so any port of it that a
network can reach lets whoever reaches it join the cluster, submit tasks and run code. A local
`quill serve` needs none of them from outside: only the HTTP server in front serves clients (on --host).
Measured with Ray's defaults (tests/test_faults.py lists every listening socket): the GCS,
raylet, object manager, every worker, the dashboard agent and the Serve replicas' gRPC servers
listened on 0.0.0.0/::, and the agents on the machine's address.

Ray binds to loopback when its node IP is loopback (the dashboard agent picks 127.0.0.1 over
0.0.0.0 then, and the C++ servers follow the node IP). But `ray.init(_node_ip_address=
"127.0.0.1")` alone is not enough on Linux: Ray turns a loopback node IP into the machine's
address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER is 0, which makes it keep loopback (what it does
on macOS and Windows, where it never runs multi-node by default). That variable must be set
before `ray` is imported, in this process and (inherited) in every Ray process it starts.

Five servers ignore the node IP. A Serve replica's inter-deployment gRPC server, which Ray 2.60
binds to "[::]:0" in ray/serve/_private/replica.py (`_on_initialized`); it carries handle calls
(pickled requests) to the replica. And, in Serve's HAProxy mode (what `quill serve` runs,
docs/performance.md), HAProxy's stats page and Prometheus exporter, which Ray 2.60's config
template binds to every interface (`bind *:<stats port>`, `bind :<metrics port>` in
ray/serve/_private/haproxy_templates.py). `setup_worker`, the `worker_process_setup_hook` a local
Ray runs in each of its workers before its actor starts, rewrites the replica's address and
those two template lines (the template is rendered by Serve's HAProxyManager actor). The
other two take `--host`, meant for HAProxy's frontend alone: the ingress replica's own HTTP
server, which HAProxy forwards to, and Serve's fallback proxy behind it. HAProxy reaches both at
the node IP, so with `--host ::1` they listened where HAProxy never looked, and HAProxy forwarded
to whichever other local server held 127.0.0.1:30000 (another `quill serve`'s models answered);
with `--host 0.0.0.0` they were open to the network beside HAProxy. `setup_worker` binds them to
loopback too. If a Ray upgrade moves a bind, the listening-socket test (tests/test_faults.py)
fails and names the process.
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
from pathlib import Path

LOOPBACK = "127.0.0.1"
# Set by `quill serve` for a Ray of its own; inherited by every Ray process it starts.
ENV = "QUILL_RAY_LOOPBACK"


def prepare_environment() -> None:
    """Before `import ray`: a local Ray whose node IP stays loopback."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ[ENV] = "1"


def init_options() -> dict:
    return {"_node_ip_address": LOOPBACK, "runtime_env": {"worker_process_setup_hook": f"{__name__}.setup_worker"}}


# HAProxy refuses a request of more than `tune.http.maxhdr` header lines (101 by default, the
# request line included) with its own HTML 400, before the front door's JSON 431 at
# QUILL_MAX_HEADERS (100 by default) could answer: measured with 101 headers. At 1024 the front
# door answers every count up to there (far above what clients send); beyond, as beyond the
# 64 KiB of header bytes (cli.py), HAProxy's own 400 stays.
HAPROXY_MAX_HEADERS = 1024


def setup_worker() -> None:
    """Run by Ray in each worker process of a local Ray, before its actor or task (a cluster's
    workers, without ENV, are left alone)."""
    if os.environ.get(ENV) == "1":
        bind_serve_replicas_to_loopback()
        bind_http_behind_haproxy_to_loopback()
        bind_haproxy_to_loopback()
        let_haproxy_read_more_headers()


def let_haproxy_read_more_headers() -> None:
    from ray.serve._private import haproxy

    line = "    nbthread {{ config.nbthread }}\n"
    if line in haproxy.HAPROXY_CONFIG_TEMPLATE:  # the global section
        haproxy.HAPROXY_CONFIG_TEMPLATE = haproxy.HAPROXY_CONFIG_TEMPLATE.replace(
            line, f"{line}    tune.http.maxhdr {HAPROXY_MAX_HEADERS}\n", 1)


def bind_haproxy_to_loopback() -> None:
    from ray.serve._private import haproxy

    template = haproxy.HAPROXY_CONFIG_TEMPLATE
    for line, port in (("bind :{{ config.metrics_port }}", "metrics_port"), ("bind *:{{ config.stats_port }}", "stats_port")):
        template = template.replace(line, f"bind {LOOPBACK}:{{{{ config.{port} }}}}")
    haproxy.HAPROXY_CONFIG_TEMPLATE = template


def bind_http_behind_haproxy_to_loopback() -> None:
    """The ingress replica's HTTP server, and Serve's proxy where HAProxy is in front of it (the
    proxy is then only HAProxy's fallback), on 127.0.0.1 whatever `--host` says."""
    from ray.serve._private import constants, proxy, replica

    def on_loopback(start):
        async def start_on_loopback(app, http_options, **kwargs):
            return await start(app, http_options.model_copy(update={"host": LOOPBACK}), **kwargs)
        return start_on_loopback

    replica.start_asgi_http_server = on_loopback(replica.start_asgi_http_server)
    if constants.RAY_SERVE_ENABLE_HA_PROXY:
        proxy.start_asgi_http_server = on_loopback(proxy.start_asgi_http_server)


def bind_serve_replicas_to_loopback() -> None:
    """A replica's inter-deployment gRPC server on 127.0.0.1."""
    from ray.serve._private import replica

    bind = replica.add_port_to_grpc_server

    def bind_loopback(server, address: str):
        if address.startswith("[::]:") or address.startswith("0.0.0.0:"):
            address = f"{LOOPBACK}:{address.rsplit(':', 1)[1]}"
        return bind(server, address)

    replica.add_port_to_grpc_server = bind_loopback


def stop_haproxy(node_id: str) -> int:
    """Kill the HAProxy processes of this node (Serve keeps their files under a folder named by
    the node id) and remove that folder; returns how many were killed. Serve's HAProxyManager
    stops HAProxy when Serve shuts down cleanly, but HAProxy is not its child in Ray's eyes: when
    Serve's shutdown timed out (a SIGTERM while the models loaded: "Controller failed to shut
    down within 30.0s") or a second Ctrl-C ended `quill serve` at once, HAProxy outlived Ray,
    held --port and answered every request with a 500 until killed by hand. The folder (its
    config, sockets and state) was left behind by every run."""
    marker, killed = f"/{node_id}/", 0
    folders = {Path(os.environ.get("RAY_SERVE_HAPROXY_SERVER_STATE_BASE", "/tmp/haproxy-serve")) / node_id}
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    cmd = [arg.decode(errors="replace") for arg in f.read().split(b"\0")]
                if cmd[0].endswith("/haproxy") and any(marker in arg for arg in cmd):
                    os.kill(int(entry.name), signal.SIGKILL)
                    killed += 1
                    folders |= {Path(arg[: arg.index(marker) + len(marker)]) for arg in cmd if marker in arg}
            except OSError:  # gone meanwhile, or not ours to read
                continue
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    return killed


# Ray's workers take ports 10002-19999 by default, Serve's replicas 30000-31000 on a cluster, and
# the kernel hands out the ephemeral range (32768-60999 on Linux) to every bind(0) and outgoing
# connection: between them, nothing takes a port unasked.
_OWN_PORTS = (20000, 30000)


def free_port(span: int = 1) -> int:
    """A free port on loopback, the first of `span` free ones in a row, for a Ray process to bind
    seconds from now: in _OWN_PORTS where the kernel's ephemeral range leaves room. From that
    range, the port could meanwhile become some connection's own (a test's HAProxy then failed to
    start: "cannot bind socket (Address already in use)")."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 0
    low, high = _OWN_PORTS[0], min(_OWN_PORTS[1], ephemeral) - span
    for _ in range(100 if high > low else 0):
        first = random.randrange(low, high)
        if all(_bindable(port) for port in range(first, first + span)):
            return first
    with socket.socket() as s:  # no room in that range (or none free): the kernel's choice
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def processes_in_a_group_of_their_own():
    """While Ray starts its processes (GCS, raylet, agents), this process sits in a new process
    group, so they are created there; then it goes back to its own. A SIGTERM to `quill serve`'s
    process group (`kill -TERM -PGID`, supervisord's stopasgroup, `tini -g`) then reaches the
    server alone, which drains and takes its Ray down, instead of killing the GCS and raylet
    under it: the drain then failed (new requests were served for a minute), and the server died
    of a lost GCS before it could stop its HAProxy, which went on answering on --port. Ray blocks
    SIGINT in its processes for the same reason (a terminal's Ctrl-C goes to the whole group).

    A session leader (a process started with setsid, as the tests start the server) cannot change
    its group, and needs none of this: nothing else is in its group unless it put it there."""
    home = os.getpgrp()
    if os.getsid(0) == os.getpid():
        yield
        return
    read, write = os.pipe()
    holder = os.fork()
    if holder == 0:  # a placeholder that makes the group and waits until we are in it
        os.close(write)
        with contextlib.suppress(OSError):
            os.setpgid(0, 0)
            os.read(read, 1)
        os._exit(0)
    os.close(read)
    try:
        with contextlib.suppress(OSError):  # the holder may have done it already
            os.setpgid(holder, holder)
        os.setpgid(0, holder)
    finally:
        os.close(write)
        os.waitpid(holder, 0)
    try:
        yield
    finally:
        # Back home: to the group we came from, or, where we led it (it emptied when we left),
        # to a new one under our own pid, which is the same group id a shell's job control knows.
        os.setpgid(0, 0 if home == os.getpid() else home)
