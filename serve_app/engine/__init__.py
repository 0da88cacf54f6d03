"""The generation engine: knows nothing of HTTP, Ray or Redis.

    engine = Engine(EngineConfig(source="models/quill-base"))
    engine.add(GenerationRequest("Once upon a time", SamplingParams(max_tokens=20)))
    while engine.has_work:
        for delta in engine.step():
            print(delta.text, end="")
"""
from serve_app.engine.async_engine import AsyncEngine
from serve_app.engine.config import EngineConfig
from serve_app.engine.engine import Engine
from serve_app.engine.loader import CheckpointError
from serve_app.engine.types import (
    Delta,
    EngineOverloaded,
    GenerationRequest,
    RequestRejected,
    SamplingParams,
)

__all__ = [
    "AsyncEngine",
    "CheckpointError",
    "Engine",
    "Delta",
    "EngineConfig",
    "EngineOverloaded",
    "GenerationRequest",
    "RequestRejected",
    "SamplingParams",
]
