"""Shared fixtures. Several people add fixtures here: append, keep each one self-contained."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
GPT2_TOKENIZER_DIR = REPO_ROOT / "models" / "gpt2-tokenizer"


def save_tiny_gpt2(path: Path, seed: int = 0, **config) -> Path:
    """Save a tiny random GPT-2 (2 layers, 64 wide, 256 positions; `config` overrides GPT2Config
    fields) with GPT-2's real tokenizer (safetensors).

    The tokenizer is loaded with `from_pretrained` on the folder: constructing GPT2TokenizerFast
    from vocab/merges files in transformers 5 silently encodes everything to [].
    """
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    # A wide initialiser gives peaked, varied logits: greedy text is not one token repeated.
    config = GPT2Config(**{"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 256, "vocab_size": 50257,
                           "initializer_range": 0.3, **config})
    GPT2LMHeadModel(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(GPT2_TOKENIZER_DIR).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Two different tiny random checkpoints, {"tiny-a": path, "tiny-b": path}, made once per session."""
    root = tmp_path_factory.mktemp("tiny-checkpoints")
    return {name: save_tiny_gpt2(root / name, seed=i) for i, name in enumerate(("tiny-a", "tiny-b"))}


def _redis_answers(url: str) -> bool:
    try:
        import redis

        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except Exception:
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real redis-server: $REDIS_URL, else 127.0.0.1:6379 (.ci/run starts one there), else a
    private one started here on a free port. Skips only when no redis-server binary exists."""
    import os
    import shutil
    import socket
    import subprocess
    import time

    for url in filter(None, (os.environ.get("REDIS_URL"), "redis://127.0.0.1:6379/0")):
        if _redis_answers(url):
            yield url
            return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no redis-server (apt-get install redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while not _redis_answers(url):
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail("redis-server did not start")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def browser():
    """Headless chromium (Debian's, driven by playwright) for the writing page's tests; skips
    where either is missing. Module-scoped: playwright's sync API must not outlive the module
    into other modules' asyncio tests."""
    import shutil

    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield launched
        launched.close()
