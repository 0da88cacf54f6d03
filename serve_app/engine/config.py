"""How an engine is built and what it admits. Filled from a registry entry by the serving side."""
from __future__ import annotations

from dataclasses import dataclass

@dataclass(frozen=True)
class EngineConfig:
    source: str  # local checkpoint folder, or hf://name on machines that reach the hub
    adapter: str | None = None  # LoRA adapter folder (peft format), merged into the base at load
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"  # float32 | float16 | bfloat16 | auto (the registry's default)
    max_batch_size: int = 16  # sequences decoded together (a request with n choices takes n)
    max_seq_len: int = 1024  # prompt + generated tokens, per sequence
    max_waiting: int = 256  # requests queued beyond the running batch; more are refused
    max_prompt_tokens: int = 768
    max_tokens: int = 512  # the most a request may ask for
    max_n: int = 8
    max_prefill_tokens: int = 256  # prompt tokens per step, so decoders keep moving
    threads: int | None = None  # torch intra-op threads; None leaves torch's choice
    prefix_cache_tokens: int = 0  # prompt-prefix keys/values kept for later requests; 0 = off
    # AsyncEngine: messages per second to all callers together (0: one per step per caller)
    stream_messages_per_s: float = 0.0
