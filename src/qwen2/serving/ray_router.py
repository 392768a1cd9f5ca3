"""Prefix-affinity routing for the Ray Serve replicas (qwen2.serving.ray): a module of its own because Ray
loads a request router by import path, and this one imports Ray at the top."""

from __future__ import annotations

import hashlib
from typing import Any

from ray.serve.request_router import FIFOMixin, RequestRouter


def _rank(prefix: str, replica_id: str) -> bytes:
    return hashlib.blake2b(f"{prefix}\0{replica_id}".encode(), digest_size=8).digest()


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    """Rendezvous hashing of the request's prompt prefix (`ServeRequest.prompt`) over the replicas: the same
    prefix ranks the same replica first while the set of replicas stays, and only the replicas whose ids
    change move; when that replica is full or gone, Ray's router tries the others."""

    async def choose_replicas(self, candidate_replicas: list, pending_request: Any = None) -> list[list]:
        args = pending_request.args if pending_request is not None else []
        prefix = getattr(args[0], "prompt", None) if args else None
        if prefix is None or len(candidate_replicas) < 2:
            return [candidate_replicas]
        ranked = sorted(candidate_replicas, key=lambda r: _rank(prefix, r.replica_id.unique_id), reverse=True)
        return [ranked[:1], ranked[1:]]
