"""Who calls the report endpoint: the pod a projected ServiceAccount token was issued to.

The apiserver's TokenReview checks the token's signature, expiry and audience, and that the pod
it is bound to still exists with the same uid; its answer names that pod
(``user.extra["authentication.kubernetes.io/pod-name"]`` and ``.../pod-uid``). A token without a
pod binding (one minted for a ServiceAccount alone) is refused: only a pod can be mapped to a job.
Answers are cached per token (by hash) for a short while, so a runner that reports every few
seconds costs one review a minute, and a stream of bad tokens costs one review per token.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"


class TokenRefusedError(Exception):
    """The token does not identify a live pod for this audience."""


@dataclass(frozen=True)
class PodIdentity:
    namespace: str
    pod_name: str
    pod_uid: str
    service_account: str


def identity_from_review(status: dict[str, Any], audience: str) -> PodIdentity:
    """The pod a TokenReview's status vouches for (raises TokenRefusedError otherwise)."""
    if not status.get("authenticated"):
        raise TokenRefusedError(status.get("error") or "the token is not valid")
    if audience not in (status.get("audiences") or []):
        raise TokenRefusedError(f"the token is not for audience {audience!r}")
    user = status.get("user") or {}
    username = user.get("username") or ""
    if not username.startswith(SERVICE_ACCOUNT_PREFIX):
        raise TokenRefusedError(f"{username!r} is not a ServiceAccount")
    namespace, _, service_account = username.removeprefix(SERVICE_ACCOUNT_PREFIX).partition(":")
    extra = user.get("extra") or {}
    pod_name, pod_uid = (extra.get(POD_NAME_EXTRA) or [""])[0], (extra.get(POD_UID_EXTRA) or [""])[0]
    if not (pod_name and pod_uid):
        raise TokenRefusedError("the token is not bound to a pod (runner pods send their projected report token)")
    return PodIdentity(namespace, pod_name, pod_uid, service_account)


class TokenReviewer:
    def __init__(
        self,
        review: Callable[[str, list[str]], Awaitable[dict[str, Any]]],
        audience: str,
        ttl_seconds: float = 60.0,
        refused_ttl_seconds: float = 10.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._review, self.audience = review, audience
        self.ttl, self.refused_ttl, self.max_entries, self.clock = ttl_seconds, refused_ttl_seconds, max_entries, clock
        self._cache: OrderedDict[str, tuple[float, PodIdentity | TokenRefusedError]] = OrderedDict()

    async def identify(self, token: str) -> PodIdentity:
        key = hashlib.sha256(token.encode()).hexdigest()
        now = self.clock()
        hit = self._cache.get(key)
        if hit is None or hit[0] <= now:
            status = await self._review(token, [self.audience])
            try:
                result: PodIdentity | TokenRefusedError = identity_from_review(status, self.audience)
                expires = now + self.ttl
            except TokenRefusedError as exc:
                result, expires = exc, now + self.refused_ttl
            hit = (expires, result)
            self._cache[key] = hit
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        if isinstance(hit[1], TokenRefusedError):
            raise hit[1]
        return hit[1]
