"""The operator's only Kubernetes API client: a few REST calls over one aiohttp session.

Async all the way: kopf runs every handler on one event loop, and a blocking call there would
stall every other QuantizationJob. It is plain REST on aiohttp (which kopf already uses) with
kopf's own login (in-cluster ServiceAccount, else $KUBECONFIG): a generated client such as
kubernetes_asyncio imports ~45 MiB of models for the dozen calls the operator makes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import aiohttp
import kopf
from qjob_api.v1alpha1 import GROUP, PLURAL, VERSION

from .metrics import Metrics

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
# Parallel requests to the apiserver: under a burst each extra connection is a TLS handshake for
# the apiserver and ~0.3 MiB of buffers here; queued requests reuse the open ones.
CONNECTIONS = 16
# Job creates go first: a status write waits while Jobs were created in the last CREATE_QUIET
# seconds (a burst of new QuantizationJobs), but never longer than MAX_YIELD seconds.
CREATE_QUIET = 1.0
MAX_YIELD = 10.0
IN_CLUSTER_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"
WATCH_SECONDS = 300  # a watch the apiserver ends after this long is resumed from its last resourceVersion
LIST_PAGE = 500


def user_agent() -> str:
    """What the apiserver's audit log and metrics see: this operator and its version."""
    try:
        return f"qjob-operator/{version('qjob-operator')}"
    except PackageNotFoundError:
        return "qjob-operator/unknown"


class ApiError(Exception):
    def __init__(self, status: int, reason: str, body: str):
        super().__init__(f"{status} {reason}: {body[:300]}")
        self.status, self.reason, self.body = status, reason, body


class ApiSession:
    """Requests to one apiserver with one identity."""

    def __init__(self, info: kopf.ConnectionInfo, token_file: str | None = None):
        self.info, self.token_file = info, token_file
        self.server = info.server.rstrip("/")
        connector = aiohttp.TCPConnector(limit=CONNECTIONS, ssl=info.as_ssl_context())
        self.session = aiohttp.ClientSession(connector=connector, headers={"User-Agent": user_agent()})

    def _headers(self) -> dict[str, str]:
        if self.token_file:  # in a pod the kubelet rotates the token: read it each time
            with open(self.token_file) as f:
                return {"Authorization": f"Bearer {f.read().strip()}"}
        return self.info.as_http_headers()

    async def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json", **params: str
    ) -> dict[str, Any]:
        headers = {**self._headers(), "Accept": "application/json"}
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body)
        async with self.session.request(method, self.server + path, data=data, headers=headers, params=params) as resp:
            text = await resp.text()
            if resp.status >= 400:
                raise ApiError(resp.status, resp.reason or "", text)
            return json.loads(text) if text else {}

    async def stream_lines(self, path: str, **params: str) -> AsyncIterator[bytes]:
        """The lines of a streamed response (a watch): one JSON event each, however long."""
        headers = {**self._headers(), "Accept": "application/json"}
        timeout = aiohttp.ClientTimeout(total=None, sock_read=WATCH_SECONDS + 30)
        async with self.session.get(self.server + path, headers=headers, params=params, timeout=timeout) as resp:
            if resp.status >= 400:
                raise ApiError(resp.status, resp.reason or "", await resp.text())
            buffer = b""
            async for chunk in resp.content.iter_any():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield line

    async def close(self) -> None:
        await self.session.close()


async def connect() -> ApiSession:
    """In-cluster credentials when running in a pod, else the kubeconfig ($KUBECONFIG)."""
    settings = kopf.OperatorSettings()
    if info := kopf.login_with_service_account(settings=settings):
        return ApiSession(info, token_file=IN_CLUSTER_TOKEN)
    if info := kopf.login_with_kubeconfig(settings=settings):
        # kopf leaves file paths as written; kubeconfigs resolve them against their own folder
        folder = os.path.dirname(os.path.abspath(os.path.expanduser(os.environ.get("KUBECONFIG", "~/.kube/config"))))
        paths = {
            k: os.path.join(folder, v)
            for k in ("ca_path", "certificate_path", "private_key_path")
            if isinstance(v := getattr(info, k), str) and not os.path.isabs(v)
        }
        if paths:
            info = dataclasses.replace(info, **paths)
        return ApiSession(info)
    raise RuntimeError("no Kubernetes credentials: not in a pod, and no $KUBECONFIG or ~/.kube/config")


class TokenBucket:
    """Client-side rate limit (as client-go's QPS/burst): under a burst of new jobs, status
    writes wait for their turn (the reconciler queues the jobs, not their reconciles), so the
    apiserver's capacity goes to creating the Jobs that do the work."""

    def __init__(self, per_second: float, burst: int):
        self.per_second, self.burst = per_second, burst
        self._tokens, self._last = float(burst), time.monotonic()
        self._lock = asyncio.Lock()

    def _take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.per_second)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    async def acquire(self) -> None:
        async with self._lock:
            while not self._take():
                await asyncio.sleep((1 - self._tokens) / self.per_second)

    def try_acquire(self) -> bool:
        """A token now, if one is free and nobody waits for one."""
        return not self._lock.locked() and self._take()

    def give_back(self) -> None:
        """Returns an acquired token that was not used."""
        self._tokens = min(self.burst, self._tokens + 1)


class Kube:
    def __init__(self, api: ApiSession, metrics: Metrics, status_writes_per_second: float = 20.0):
        self.api = api
        self.status_writes = TokenBucket(status_writes_per_second, burst=max(1, int(2 * status_writes_per_second)))
        self._count = metrics.api_requests
        self._last_create = -1e9

    async def status_write_turn(self) -> None:
        """Waits for a status write's turn: after the burst of Job creates, if one is under way
        (at most MAX_YIELD s), and within ``statusWritesPerSecond``. Give an unused turn back
        with ``status_writes.give_back()``."""
        deadline = time.monotonic() + MAX_YIELD
        while time.monotonic() < deadline and time.monotonic() - self._last_create < CREATE_QUIET:
            await asyncio.sleep(0.25)
        await self.status_writes.acquire()

    def status_write_turn_now(self) -> bool:
        """``status_write_turn`` without waiting: False while Jobs are being created or no turn is free."""
        return time.monotonic() - self._last_create >= CREATE_QUIET and self.status_writes.try_acquire()

    async def _call(self, verb: str, method: str, path: str, body: Any = None, *, missing_ok: bool = True,
                    content_type: str = "application/json", **params: str) -> dict[str, Any] | None:  # fmt: skip
        """One request; None when the object is gone (404) and that is fine for the caller."""
        self._count.labels(verb).inc()
        try:
            return await self.api.request(method, path, body, content_type, **params)
        except ApiError as exc:
            if exc.status == 404 and missing_ok:
                return None
            raise

    @staticmethod
    def _jobs(namespace: str, name: str = "") -> str:
        return f"/apis/batch/v1/namespaces/{namespace}/jobs" + (f"/{name}" if name else "")

    @staticmethod
    def _qjob(namespace: str, name: str, sub: str = "") -> str:
        return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}" + (f"/{sub}" if sub else "")

    async def create(self, obj: dict[str, Any]) -> bool:
        """Creates a stage's Job, a multi-pod stage's headless Service, an Event, or the shared model
        cache's fill Job, view PersistentVolume and claim; returns False
        when it already exists (idempotent) or its namespace is gone (the QuantizationJob went with it)."""
        namespace = obj["metadata"].get("namespace", "")
        path = {
            "Job": self._jobs(namespace),
            "Service": f"/api/v1/namespaces/{namespace}/services",
            "Event": f"/api/v1/namespaces/{namespace}/events",
            "PersistentVolumeClaim": f"/api/v1/namespaces/{namespace}/persistentvolumeclaims",
            "PersistentVolume": "/api/v1/persistentvolumes",
        }[obj["kind"]]
        if obj["kind"] == "Job":
            self._last_create = time.monotonic()
        try:
            return await self._call("create", "POST", path, obj) is not None
        except ApiError as exc:
            if exc.status == 409:
                return False
            raise

    async def list_and_watch(self, path: str, handle: Callable[[str, dict[str, Any]], None],
                             synced: asyncio.Event) -> None:  # fmt: skip
        """Keeps ``handle(event type, object)`` told of every object at ``path``: a paged list
        (then ``synced`` is set), then a watch from the list's resourceVersion, resumed where it
        ended; when the apiserver no longer has that version (410 Gone) it lists again, reporting
        objects gone meanwhile as DELETED. Each event's object is parsed and handed on alone, so
        memory holds what ``handle`` keeps, not the objects (a lightweight informer)."""
        known: set[str] = set()
        while True:
            try:
                listed: set[str] = set()
                page: dict[str, Any] = {"metadata": {}}
                while True:
                    more = {"continue": page["metadata"]["continue"]} if page["metadata"].get("continue") else {}
                    page = await self._call("list", "GET", path, missing_ok=False, limit=str(LIST_PAGE), **more)
                    for obj in page.get("items") or []:
                        listed.add(obj["metadata"]["name"])
                        handle("ADDED", obj)
                    if not page["metadata"].get("continue"):
                        break
                for name in known - listed:
                    handle("DELETED", {"metadata": {"name": name}})
                known = listed
                synced.set()
                version = page["metadata"]["resourceVersion"]
                while version:
                    version = await self._watch(path, version, handle, known)
            except (TimeoutError, aiohttp.ClientError, ApiError, ValueError) as exc:
                log.warning("watch of %s failed, listing again in 5 s: %s", path, exc)
                await asyncio.sleep(5)

    async def _watch(self, path: str, version: str, handle: Callable[[str, dict[str, Any]], None],
                     known: set[str]) -> str | None:  # fmt: skip
        """One watch request; the resourceVersion to resume from, None when it is too old."""
        self._count.labels("watch").inc()
        params = {"watch": "1", "resourceVersion": version, "allowWatchBookmarks": "true",
                  "timeoutSeconds": str(WATCH_SECONDS)}  # fmt: skip
        async for line in self.api.stream_lines(path, **params):
            event = json.loads(line)
            obj = event.get("object") or {}
            if event.get("type") == "ERROR":
                if obj.get("code") == 410:
                    return None
                raise ApiError(obj.get("code") or 500, obj.get("reason") or "", obj.get("message") or "")
            version = obj["metadata"].get("resourceVersion") or version
            if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                name = obj["metadata"]["name"]
                (known.discard if event["type"] == "DELETED" else known.add)(name)
                handle(event["type"], obj)
        return version

    async def priority_class_exists(self, name: str) -> bool | None:
        """None when the operator may not read PriorityClasses (namespaced RBAC without the grant)."""
        try:
            return await self._call("get", "GET", f"/apis/scheduling.k8s.io/v1/priorityclasses/{name}") is not None
        except ApiError as exc:
            if exc.status == 403:
                return None
            raise

    async def delete_batch_job(self, namespace: str, name: str) -> None:
        """Deletes a stage's batch/v1 Job (its pods go with it)."""
        await self._call("delete", "DELETE", self._jobs(namespace, name), propagationPolicy="Background")

    async def set_batch_job_suspend(self, namespace: str, name: str, suspend: bool) -> None:
        await self._call("patch", "PATCH", self._jobs(namespace, name), {"spec": {"suspend": suspend}},
                         content_type=MERGE_PATCH)  # fmt: skip

    async def patch_status(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any] | None:
        """Merge-patches .status (the caller holds a ``status_writes`` token); returns the updated
        object (None if it is gone: nothing to report on)."""
        return await self._call("patch", "PATCH", self._qjob(namespace, name, "status"), {"status": patch},
                                content_type=MERGE_PATCH)  # fmt: skip

    async def delete_quantization_job(self, namespace: str, name: str) -> None:
        """Deletes the QuantizationJob itself (TTL after finishing); children follow by GC."""
        await self._call("delete", "DELETE", self._qjob(namespace, name), propagationPolicy="Background")

    async def remove_finalizer(self, namespace: str, name: str, finalizers: list[str], finalizer: str) -> None:
        """Drops one finalizer (JSON patch with a test, so a concurrent change is not overwritten)."""
        patch = [
            {"op": "test", "path": "/metadata/finalizers", "value": finalizers},
            {"op": "replace", "path": "/metadata/finalizers", "value": [f for f in finalizers if f != finalizer]},
        ]
        try:
            await self._call("patch", "PATCH", self._qjob(namespace, name), patch, content_type=JSON_PATCH)
        except ApiError as exc:
            if exc.status not in (409, 422):  # changed meanwhile: the next event retries
                raise

    async def review_token(self, token: str, audiences: list[str]) -> dict[str, Any]:
        """TokenReview's status for a bearer token (authenticated, user, audiences)."""
        review = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                  "spec": {"token": token, "audiences": audiences}}  # fmt: skip
        answer = await self._call("create", "POST", "/apis/authentication.k8s.io/v1/tokenreviews", review)
        return (answer or {}).get("status") or {}

    async def read_claim(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._call("get", "GET", f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{name}")

    async def read_volume(self, name: str) -> dict[str, Any] | None:
        return await self._call("get", "GET", f"/api/v1/persistentvolumes/{name}")

    async def read_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._call("get", "GET", f"/api/v1/namespaces/{namespace}/secrets/{name}")

    async def replace_secret(self, namespace: str, name: str, secret: dict[str, Any]) -> bool:
        """Update with the read resourceVersion; False if someone else wrote it first."""
        try:
            await self._call("update", "PUT", f"/api/v1/namespaces/{namespace}/secrets/{name}", secret,
                             missing_ok=False)  # fmt: skip
            return True
        except ApiError as exc:
            if exc.status == 409:
                return False
            raise

    async def lease(self, method: str, namespace: str, name: str = "", body: Any = None,
                    content_type: str = "application/json") -> dict[str, Any]:  # fmt: skip
        """Lease requests for leader election (errors, 404 included, are the caller's)."""
        path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases" + (f"/{name}" if name else "")
        verb = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch"}[method]
        return await self._call(verb, method, path, body, missing_ok=False, content_type=content_type)
