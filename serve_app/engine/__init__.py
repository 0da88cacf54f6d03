"""The generation engine: knows nothing of HTTP, Ray or Redis.

    engine = Engine(EngineConfig(source="models/quill-base"))
    engine.add(GenerationRequest("Once upon a time", SamplingParams(max_tokens=20)))
    while engine.has_work:
        for delta in engine.step():
            print(delta.text, end="")

`Engine`, `AsyncEngine` and `CheckpointError` are imported on first use: they pull in torch and
transformers (seconds of CPU), which the ingress and the CLI, needing only the request types,
should not pay for.
"""
from importlib import import_module

from serve_app.engine.config import EngineConfig
from serve_app.engine.types import (
    Delta,
    EngineOverloaded,
    GenerationRequest,
    RequestRejected,
    SamplingParams,
)

_LAZY = {
    "Engine": "serve_app.engine.engine",
    "AsyncEngine": "serve_app.engine.async_engine",
    "CheckpointError": "serve_app.engine.loader",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AsyncEngine",
    "CheckpointError",
    "Delta",
    "Engine",
    "EngineConfig",
    "EngineOverloaded",
    "GenerationRequest",
    "RequestRejected",
    "SamplingParams",
]
