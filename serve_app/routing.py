"""Prefix-aware routing: a writer's next request goes to the replica that holds their document.

Each model replica keeps a prefix cache (engine/prefix_cache.py), so a resent document is cheap
only on the replica that saw it before. Ray Serve's default router picks the less loaded of two
random replicas, which with two replicas sends half of a writer's resends to a cold cache.

`PrefixAffinityRouter` (a Ray Serve custom request router, set per model deployment in
app.py) ranks replicas by rendezvous hashing of the prompt's opening: every router, in every
ingress process, sends the same opening to the same replica, and when a replica comes or goes
only the openings that hashed to it move. When that replica is busier than the least loaded
one by more than `imbalance` requests, the request goes to the least loaded instead: a cold
prefill elsewhere beats waiting behind a queue.

The opening is the first OPENING_CHARS characters of a text prompt (the first OPENING_TOKENS ids
of a token prompt): a writer's document grows at its end, so its opening is what stays the same
from one resend to the next.
"""
from __future__ import annotations

import hashlib
from typing import Any, Hashable, Iterable, Optional

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

OPENING_CHARS = 64  # about 16 GPT-2 tokens of English: one prefix-cache block
OPENING_TOKENS = 16
DEFAULT_IMBALANCE = 8


def opening(prompt: Any) -> bytes | None:
    """The part of a prompt that routing keys on, or None when there is nothing to key on."""
    if isinstance(prompt, str) and prompt:
        return prompt[:OPENING_CHARS].encode("utf-8", "surrogatepass")
    if isinstance(prompt, (list, tuple)) and prompt:
        return ",".join(str(t) for t in prompt[:OPENING_TOKENS]).encode()
    return None


def _weight(key: bytes, replica: str) -> int:
    # blake2b, not hash(): Python salts str hashes per process, and every ingress must agree.
    return int.from_bytes(hashlib.blake2b(key + b"\0" + replica.encode(), digest_size=8).digest(), "big")


def rank(key: bytes | None, replicas: Iterable[Hashable], queue_len: dict[Hashable, Optional[int]],
         imbalance: int = DEFAULT_IMBALANCE) -> list[list[Hashable]]:
    """Replicas in ranks of preference for a request whose opening is `key`.

    `queue_len` holds each replica's last known number of ongoing requests (None: unknown).
    """
    replicas = list(replicas)
    if key is None or len(replicas) < 2:
        return [replicas]  # nothing to prefer: the least loaded of all
    ordered = sorted(replicas, key=lambda r: _weight(key, str(r)), reverse=True)
    home, others = ordered[0], ordered[1:]
    known = [q for q in (queue_len.get(r) for r in replicas) if q is not None]
    home_len = queue_len.get(home)
    if home_len is not None and known and home_len - min(known) > imbalance:
        return [others, [home]]
    return [[home], others]


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    """Ray Serve request router over `rank` (request_router_kwargs: imbalance)."""

    def initialize_state(self, imbalance: int = DEFAULT_IMBALANCE, **_: Any) -> None:
        # Serve calls this once, right after constructing the router, with request_router_kwargs.
        self.imbalance = imbalance

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> list[list[RunningReplica]]:
        request = pending_request.args[0] if pending_request is not None and pending_request.args else None
        key = opening(getattr(request, "prompt", None))
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        lens = {rid: self.replica_queue_len_cache.get(r.replica_id) for rid, r in by_id.items()}
        tiers = rank(key, by_id, lens, self.imbalance)
        return [[by_id[rid] for rid in tier] for tier in tiers if tier]
