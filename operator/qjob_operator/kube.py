"""The operator's only Kubernetes API client (kubernetes_asyncio).

Async all the way: kopf runs every handler on one event loop, and a blocking call there would
stall every other QuantizationJob. kubernetes_asyncio is generated from the same OpenAPI as the
official client, so objects and errors look the same, without threads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException
from qjob_api.v1alpha1 import GROUP, PLURAL, VERSION

from .metrics import Metrics

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"


async def connect() -> client.ApiClient:
    """In-cluster credentials when running in a pod, else the kubeconfig ($KUBECONFIG)."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        await config.load_kube_config()
    return client.ApiClient()


class TokenBucket:
    """Client-side rate limit (as client-go's QPS/burst): under a burst of new jobs, status
    writes queue here, and the reconciles waiting on them coalesce, so the apiserver's capacity
    goes to creating the Jobs that do the work."""

    def __init__(self, per_second: float, burst: int):
        self.per_second, self.burst = per_second, burst
        self._tokens, self._last = float(burst), time.monotonic()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                self._tokens = min(self.burst, self._tokens + (now - self._last) * self.per_second)
                self._last = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return
                await asyncio.sleep((1 - self._tokens) / self.per_second)


class Kube:
    def __init__(self, api: client.ApiClient, metrics: Metrics, status_writes_per_second: float = 20.0):
        self.api = api
        self._status_writes = TokenBucket(status_writes_per_second, burst=int(2 * status_writes_per_second))
        self.core = client.CoreV1Api(api)
        self.batch = client.BatchV1Api(api)
        self.rbac = client.RbacAuthorizationV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self._count = metrics.api_requests

    async def create(self, obj: dict[str, Any]) -> bool:
        """Creates a namespaced child; returns False when it already exists (idempotent) or its
        namespace is gone (the QuantizationJob went with it)."""
        kind, ns = obj["kind"], obj["metadata"]["namespace"]
        create = {
            "ServiceAccount": self.core.create_namespaced_service_account,
            "Role": self.rbac.create_namespaced_role,
            "RoleBinding": self.rbac.create_namespaced_role_binding,
            "Job": self.batch.create_namespaced_job,
            "Service": self.core.create_namespaced_service,
        }[kind]
        self._count.labels("create").inc()
        try:
            await create(ns, obj)
            return True
        except ApiException as exc:
            if exc.status in (404, 409):
                return False
            raise

    async def delete_batch_job(self, namespace: str, name: str) -> None:
        """Deletes a stage's batch/v1 Job (its pods go with it)."""
        self._count.labels("delete").inc()
        try:
            await self.batch.delete_namespaced_job(name, namespace, propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:
                raise

    async def set_batch_job_suspend(self, namespace: str, name: str, suspend: bool) -> None:
        self._count.labels("patch").inc()
        try:
            await self.batch.patch_namespaced_job(name, namespace, {"spec": {"suspend": suspend}})
        except ApiException as exc:
            if exc.status != 404:
                raise

    async def patch_status(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any] | None:
        """Merge-patches .status; returns the updated object (None if it is gone)."""
        await self._status_writes.acquire()
        self._count.labels("patch").inc()
        try:
            return await self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, name, {"status": patch}, _content_type=MERGE_PATCH
            )
        except ApiException as exc:
            if exc.status != 404:  # deleted meanwhile: nothing to report on
                raise
            return None

    async def delete_quantization_job(self, namespace: str, name: str) -> None:
        """Deletes the QuantizationJob itself (TTL after finishing); children follow by GC."""
        self._count.labels("delete").inc()
        try:
            await self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Background"
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
