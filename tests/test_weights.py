"""Weights from object storage: `source: s3://...` synced to a local cache before the engine loads.

The S3 here is a FAKE: moto's server mode (`moto_server`), an S3-compatible HTTP server started
by this module on a free loopback port, since no cloud bucket can be reached from this machine.
s3fs talks to it over real HTTP through the standard AWS_ENDPOINT_URL variable, as it would to
MinIO or Ceph; the fake's own request log tells which objects were downloaded (GET) and when.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from serve_app.config import ModelEntry
from serve_app.weights import WeightsError, local_entry, sync
from tests.processes import REPO, free_port, kill_group, registry_entry, start_quill_serve, write_registry

BUCKET = "quill-weights"
KEY_ID = "quill-test-key-id"
SECRET = "quill-test-secret-7f3a9c"  # must never show up in an error or a log line


@dataclass
class FakeS3:
    env: dict[str, str]
    log: Path

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True)

    def upload(self, folder: Path, prefix: str, extra: dict[str, bytes] | None = None) -> str:
        fs = self.fs()
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                fs.put_file(str(path), f"{BUCKET}/{prefix}/{path.relative_to(folder).as_posix()}")
        for name, data in (extra or {}).items():
            fs.pipe_file(f"{BUCKET}/{prefix}/{name}", data)
        return f"s3://{BUCKET}/{prefix}"

    def object_gets(self, prefix: str) -> int:
        """Objects under `prefix` the fake S3 has served (listings are `GET /bucket?list-type...`)."""
        return len(re.findall(rf"GET /{BUCKET}/{re.escape(prefix)}/[^ ?]+ HTTP", self.log.read_text()))


@contextlib.contextmanager
def moto_server(workdir: Path, **server_env: str):
    """A fake S3 (moto's server mode) on a free loopback port; yields the client environment."""
    port = free_port()
    log = workdir / f"moto-{port}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1", **server_env))
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": KEY_ID,
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        with pytest.MonkeyPatch.context() as mp:
            for name, value in env.items():
                mp.setenv(name, value)
            deadline = time.monotonic() + 30
            while "Running on" not in log.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            yield FakeS3(env, log)
    finally:
        kill_group(proc, grace=5)


@pytest.fixture(scope="module")
def fake_s3(tmp_path_factory):
    with moto_server(tmp_path_factory.mktemp("moto")) as s3:
        s3.fs().mkdir(BUCKET)
        yield s3


@pytest.fixture
def weights_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("QUILL_WEIGHTS_DIR", str(tmp_path / "weights"))
    return tmp_path / "weights"


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints) -> Path:
    return tiny_checkpoints["tiny-a"]


def files(folder: Path | str) -> dict[str, bytes]:
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def entries(weights_dir: Path) -> list[Path]:
    """Cache folders a replica could load (not the locks, not downloads in progress)."""
    return [p for p in weights_dir.iterdir() if p.is_dir() and not p.name.startswith(".tmp-")]


def test_first_sync_downloads_then_an_unchanged_checkpoint_is_not_fetched_again(fake_s3, tiny, weights_dir):
    uri = fake_s3.upload(tiny, "reuse")
    n = len(files(tiny))
    first = sync(uri, "tiny")
    assert files(first) == files(tiny)
    assert fake_s3.object_gets("reuse") == n
    assert sync(uri, "tiny") == first
    assert fake_s3.object_gets("reuse") == n  # a listing only, no object downloaded twice


def test_bucket_sources_and_adapters_are_loaded_from_the_cache_and_others_left_alone(fake_s3, tiny, weights_dir):
    uri = fake_s3.upload(tiny, "entry")
    local = local_entry(ModelEntry(name="m", source=uri, adapter=uri))
    assert local.source == local.adapter and files(local.adapter) == files(tiny)
    untouched = ModelEntry(name="m", source="hf://gpt2", adapter=str(tiny))
    assert local_entry(untouched) == untouched


def test_a_changed_object_is_fetched_again_and_replaces_the_old_copy(fake_s3, tiny, weights_dir):
    uri = fake_s3.upload(tiny, "changed")
    old = sync(uri, "tiny")
    fake_s3.fs().pipe_file(f"{BUCKET}/changed/config.json", b'{"changed": true}')
    new = sync(uri, "tiny")
    assert new != old and not Path(old).exists()
    assert Path(new, "config.json").read_bytes() == b'{"changed": true}'
    assert Path(new, "model.safetensors").read_bytes() == (tiny / "model.safetensors").read_bytes()


def test_a_download_killed_midway_leaves_no_usable_copy(fake_s3, tiny, weights_dir):
    # 32 MB more to fetch, so the kill lands while objects are still being written.
    uri = fake_s3.upload(tiny, "killed", extra={"padding.bin": bytes(32 << 20)})
    child = subprocess.Popen([sys.executable, "-c", f"from serve_app.weights import sync; sync({uri!r}, 'tiny')"],
                             cwd=REPO, env=dict(os.environ), start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not any(weights_dir.glob(".tmp-*/*")):
            assert child.poll() is None and time.monotonic() < deadline, "the download never started"
            time.sleep(0.005)
    finally:
        kill_group(child, grace=0)
    assert entries(weights_dir) == []  # the interrupted copy is not published
    assert list(weights_dir.glob(".tmp-*"))  # ...it was killed mid-download
    path = sync(uri, "tiny")
    assert files(path)["padding.bin"] == bytes(32 << 20)
    assert files(path)["model.safetensors"] == (tiny / "model.safetensors").read_bytes()
    assert list(weights_dir.glob(".tmp-*")) == []  # the leftover was cleaned under the lock


def test_two_replicas_syncing_at_once_download_once(fake_s3, tiny, weights_dir):
    # Both start syncing on one signal, after their imports; a 32 MB object keeps the first
    # download going while the second looks at the cache.
    uri = fake_s3.upload(tiny, "concurrent", extra={"padding.bin": bytes(32 << 20)})
    code = (f"import s3fs, sys; from serve_app.weights import sync; print('ready', flush=True); "
            f"sys.stdin.readline(); print(sync({uri!r}, 'tiny'))")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ)) for _ in range(2)]
    assert [p.stdout.readline() for p in procs] == ["ready\n"] * 2
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.close()
    paths = {p.stdout.read().strip() for p in procs}
    for p in procs:
        p.wait(120)
    assert all(p.returncode == 0 for p in procs)
    assert len(paths) == 1 and files(paths.pop()).keys() == {*files(tiny), "padding.bin"}
    assert fake_s3.object_gets("concurrent") == len(files(tiny)) + 1


@pytest.mark.parametrize("uri,shown", [
    (f"s3://no-such-bucket-{os.getpid()}/tiny", f"s3://no-such-bucket-{os.getpid()}/tiny"),
    (f"s3://{BUCKET}/nothing-here", f"s3://{BUCKET}/nothing-here"),
    # Credentials pasted into a URI: s3fs reads them as part of the bucket name and quotes it.
    (f"s3://{KEY_ID}:{SECRET}@{BUCKET}/tiny", f"s3://***@{BUCKET}/tiny"),
], ids=["wrong-bucket", "empty-prefix", "userinfo"])
def test_a_checkpoint_that_cannot_be_fetched_is_a_clear_error_without_credentials(fake_s3, weights_dir, uri, shown):
    with pytest.raises(WeightsError) as info:
        sync(uri, "tiny")
    message = str(info.value)
    assert message.startswith(f"model 'tiny': cannot fetch {shown}: "), message
    assert SECRET not in message and KEY_ID not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no client traceback chained


def test_denied_access_is_a_clear_error_without_credentials(tmp_path, weights_dir):
    # This fake S3 checks signatures against its own IAM, where our key does not exist: 403.
    with moto_server(tmp_path, INITIAL_NO_AUTH_ACTION_COUNT="0"):
        with pytest.raises(WeightsError) as info:
            sync(f"s3://{BUCKET}/tiny", "tiny")
    message = str(info.value)
    assert message.startswith(f"model 'tiny': cannot fetch s3://{BUCKET}/tiny: access denied"), message
    assert SECRET not in message and KEY_ID not in message


def test_a_weights_cache_that_cannot_be_written_is_named_not_blamed_on_credentials(fake_s3, tiny, tmp_path, monkeypatch):
    """A PermissionError from the cache folder (a root-owned hostPath, the pod's uid 1000) read
    as "access denied (credentials ...)", sending operators to their cloud IAM."""
    uri = fake_s3.upload(tiny, "cache")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("QUILL_WEIGHTS_DIR", str(blocker / "weights"))  # a folder that cannot be made
    with pytest.raises(WeightsError) as info:
        sync(uri, "tiny")
    message = str(info.value)
    assert message.startswith(f"model 'tiny': the weights cache {blocker / 'weights'} cannot be written"), message
    assert "credentials" not in message and "QUILL_WEIGHTS_DIR" in message


@pytest.mark.integration
def test_quill_serve_loads_a_model_from_the_fake_s3_and_reuses_the_cache(fake_s3, tiny, tmp_path):
    uri = fake_s3.upload(tiny, "served")
    registry = write_registry(tmp_path / "registry.yaml", [registry_entry("tiny-s3", uri)])
    env = {**fake_s3.env, "QUILL_WEIGHTS_DIR": str(tmp_path / "weights")}
    for _ in range(2):
        server = start_quill_serve(registry, tmp_path, env=env)
        try:
            r = httpx.post(f"{server.url}/v1/completions", timeout=60,
                           json={"model": "tiny-s3", "prompt": "Once upon a time", "max_tokens": 4})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 4
        finally:
            kill_group(server.proc, grace=0)  # the copy was whole before the replica loaded it
        # The second start listed the bucket and loaded the cached copy: no object fetched again.
        assert fake_s3.object_gets("served") == len(files(tiny))


@pytest.mark.integration
def test_quill_serve_with_a_wrong_bucket_exits_naming_the_model(fake_s3, tmp_path):
    registry = write_registry(tmp_path / "registry.yaml", [registry_entry("tiny-lost", "s3://no-such-bucket/tiny")])
    # One try of the replica, not Serve's three: each fails the same way (about 20 s saved here).
    env = dict(os.environ, **fake_s3.env, QUILL_WEIGHTS_DIR=str(tmp_path / "weights"),
               RAY_AUTH_MODE="disabled", OMP_WAIT_POLICY="PASSIVE", RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT="1")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([str(Path(sys.executable).with_name("quill")), "serve", "--registry", str(registry),
                             "--port", str(free_port())], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=300)
    finally:
        kill_group(proc, grace=5)
    assert proc.returncode not in (0, None), output
    # quill serve's own summary line, not only somewhere in the replica's traceback from Ray.
    assert re.search(r"^  model 'tiny-lost': cannot fetch s3://no-such-bucket/tiny: not found", output, re.M), output
    assert "quill serve: failed to start: 1 deployment(s) failed" in output, output  # counted, not Ray's first name
    assert SECRET not in output
