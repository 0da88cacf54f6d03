"""Checkpoints in object storage: copy an fsspec URI (s3://, gs://, ...) into a local cache.

The engine reads folders. A registry `source:` or `adapter:` that names a bucket is synced by the
model replica, before its engine loads, to a folder under $QUILL_WEIGHTS_DIR (default
~/.cache/quill/weights; on Kubernetes a volume the chart mounts there):

    <uri-key>-<content-key>/   a complete copy, published by one atomic rename
    <uri-key>.lock             held while one process checks or downloads that URI
    .tmp-<uri-key>-<random>/   a download in progress, or one a killed process left (removed)

`content-key` hashes every object's name, size and ETag, so a changed checkpoint is a new folder
and fetched again, while an unchanged one costs one listing and no download. The lock makes a
second replica on the node wait for the first one's download instead of repeating it.

Credentials come only from the environment, through s3fs's / gcsfs's default chains (IRSA,
workload identity, AWS_* variables; AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL for an
S3-compatible server). Messages carry the URI without userinfo or query, and never an
environment value that looks like a secret.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from serve_app.config import ModelEntry, is_remote

log = logging.getLogger("quill.weights")

DEFAULT_DIR = "~/.cache/quill/weights"


class WeightsError(RuntimeError):
    """A remote checkpoint cannot be fetched; the message names the model and the URI."""


def needs_sync(value: str | None) -> bool:
    # hf:// ids are handed to transformers, which has its own hub cache.
    return bool(value) and is_remote(value) and not value.startswith("hf://")


def local_entry(entry: ModelEntry) -> ModelEntry:
    """The entry with its remote source/adapter replaced by local cached copies."""
    updates = {f: sync(getattr(entry, f), entry.name) for f in ("source", "adapter") if needs_sync(getattr(entry, f))}
    return entry.model_copy(update=updates) if updates else entry


def cache_dir() -> Path:
    return Path(os.path.expanduser(os.environ.get("QUILL_WEIGHTS_DIR") or DEFAULT_DIR))


def sync(uri: str, model: str) -> str:
    """A local folder holding the objects under `uri`, downloaded only when they changed."""
    shown = redact(uri)
    try:
        return _sync(uri, model, shown)
    except WeightsError:
        raise
    except FileNotFoundError:
        reason = "not found (no such bucket, or no objects under that prefix)"
    except PermissionError:
        reason = "access denied (credentials come from this process's environment)"
    except ImportError as exc:
        reason = f"no filesystem for this URI scheme is installed ({exc})"
    except Exception as exc:  # noqa: BLE001 - any client error becomes one clean line
        reason = f"{type(exc).__name__}: {exc}"
    # `from None`: the chained client exception would bring its request details into the logs.
    raise WeightsError(f"model {model!r}: cannot fetch {shown}: {scrub(reason, uri)}") from None


def _sync(uri: str, model: str, shown: str) -> str:
    import fsspec  # here, not at module level: registry loading must stay light

    # A fresh client: fsspec would reuse one (and its listings) made earlier with other settings.
    fs, root = fsspec.core.url_to_fs(uri, skip_instance_cache=True)
    root = root.rstrip("/")
    objects = _listing(fs, root)
    if not objects:
        raise FileNotFoundError(root)
    base = cache_dir()
    try:
        base.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as exc:  # not the bucket's doing: a PermissionError here read as "access denied"
        raise WeightsError(f"model {model!r}: the weights cache {base} cannot be written ({exc.strerror or exc}); "
                           "make it writable for this process's user, or set QUILL_WEIGHTS_DIR") from None
    uri_key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    final = base / f"{uri_key}-{_content_key(objects)}"
    with open(base / f"{uri_key}.lock", "w") as lock:
        t0 = time.monotonic()
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        waited = time.monotonic() - t0
        if final.is_dir():
            log.info("model %s: %s unchanged, using the cached copy %s%s", model, shown, final,
                     f" (waited {waited:.1f} s for another download)" if waited > 1 else "")
            return str(final)
        for stale in base.glob(f".tmp-{uri_key}-*"):  # left by a killed download: we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        size = sum(s for s, _ in objects.values())
        log.info("model %s: downloading %d objects (%.1f MB) from %s", model, len(objects), size / 1e6, shown)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{uri_key}-", dir=base))
        try:
            _download(fs, root, objects, tmp)
            if _listing(fs, root) != objects:
                raise WeightsError(f"model {model!r}: {shown} changed while it was downloading; start again")
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        # Older copies of this URI: the new one replaces them (replicas that loaded them keep
        # the weights in memory).
        for old in base.glob(f"{uri_key}-*"):
            if old != final and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
        log.info("model %s: %s cached at %s in %.1f s", model, shown, final, time.monotonic() - t0)
        return str(final)


def _listing(fs, root: str) -> dict[str, tuple[int, str]]:
    """{path relative to root: (size, version tag)} for every object under root."""
    out = {}
    fs.invalidate_cache()  # clients keep listings: this one must see the bucket as it is now
    for path, info in fs.find(root, detail=True).items():
        rel = path[len(root):].strip("/")
        if rel and info.get("type", "file") == "file":
            tag = next((str(info[k]) for k in ("ETag", "etag", "md5Hash", "generation", "mtime", "LastModified")
                        if info.get(k) is not None), "")
            out[rel] = (int(info.get("size") or 0), tag)
    return out


def _content_key(objects: dict[str, tuple[int, str]]) -> str:
    digest = hashlib.sha256()
    for rel, (size, tag) in sorted(objects.items()):
        digest.update(f"{rel}\0{size}\0{tag}\n".encode())
    return digest.hexdigest()[:16]


def _download(fs, root: str, objects: dict[str, tuple[int, str]], dest: Path) -> None:
    names = sorted(objects)
    local = [dest / rel for rel in names]
    for path in local:
        path.parent.mkdir(parents=True, exist_ok=True)
    fs.get([f"{root}/{rel}" for rel in names], [str(p) for p in local])
    for rel, path in zip(names, local):
        if not path.is_file() or path.stat().st_size != objects[rel][0]:
            raise OSError(f"{rel}: incomplete download")


_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]*@")
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|KEY", re.IGNORECASE)


def redact(uri: str) -> str:
    """The URI as it may be shown: no `user:password@`, no query (presigned signatures)."""
    uri = _USERINFO.sub(r"\1***@", uri)
    return uri.split("?", 1)[0] + ("?***" if "?" in uri else "")


def scrub(text: str, uri: str = "") -> str:
    """`text` without the userinfo of `uri` (a client may quote it bare, e.g. in a bucket name)
    or the value of any secret-looking environment variable."""
    secrets = [v for n, v in os.environ.items() if len(v) >= 8 and _SECRET_NAME.search(n)]
    if m := _USERINFO.match(uri):
        secrets.append(m.group(0)[len(m.group(1)):-1])
    if "?" in uri:
        secrets.append(uri.split("?", 1)[1])
    for secret in secrets:
        text = text.replace(secret, "***")
    return _USERINFO.sub(r"\1***@", text)
