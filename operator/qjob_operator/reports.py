"""The report endpoint: runner pods send their progress here over HTTPS, never to the Kubernetes API.

    POST /v1/namespaces/{namespace}/quantizationjobs/{name}/stages/{stage}/progress
    Authorization: Bearer <the pod's projected ServiceAccount token (reports audience)>
    body: a RunnerReport (step, percent, etaSeconds, message, stepSeconds, updatedAt)

A report is accepted only from a pod that runs that very stage: the token's pod (TokenReview)
must be in the operator's index of that stage's pods, with the same uid, controlled by the
stage's Job (uid), itself controlled by the QuantizationJob (uid) — the chain the operator
created. The body can only carry progress (unknown fields are refused), so a runner cannot set
its job's phase, conditions or artifacts, and cannot report for another job or stage. The same
scheme as Kubeflow Trainer's TrainJob progress endpoint (KEP-2779, kubeflow/trainer).

Only the active replica takes reports; a standby answers 503 and the runner retries (the
Service sends each new connection to either replica).
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web
from pydantic import ValidationError
from qjob_api.v1alpha1 import RunnerReport

from .tokenreview import PodIdentity, TokenRefusedError, TokenReviewer

log = logging.getLogger(__name__)

ROUTE = "/v1/namespaces/{namespace}/quantizationjobs/{name}/stages/{stage}/progress"
MAX_BODY_BYTES = 16 * 1024


def _controller_uid(body: Mapping[str, Any], kind: str) -> str | None:
    for ref in (body.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == kind:
            return ref.get("uid")
    return None


def authorize(
    who: PodIdentity,
    namespace: str,
    job_uid: str | None,
    stage_jobs: list[Mapping[str, Any]],
    pods: list[Mapping[str, Any]],
) -> str | None:
    """Why ``who`` may not report for this stage (None: it may). ``job_uid`` is the
    QuantizationJob's uid, ``stage_jobs`` the stage's batch/v1 Jobs (one per attempt), ``pods``
    the stage's pods."""
    if who.namespace != namespace:
        return f"pod {who.namespace}/{who.pod_name} is not in namespace {namespace}"
    if job_uid is None or not stage_jobs:
        return "no such job or stage is running"
    ours = {
        (j.get("metadata") or {}).get("uid") for j in stage_jobs if _controller_uid(j, "QuantizationJob") == job_uid
    }
    if not ours:
        return "the stage's Job does not belong to this QuantizationJob"
    pod = next((p for p in pods if p["metadata"].get("name") == who.pod_name), None)
    if pod is None or pod["metadata"].get("uid") != who.pod_uid or _controller_uid(pod, "Job") not in ours:
        return f"pod {who.pod_name} does not run this stage"
    return None


class ReportServer:
    """aiohttp app for the endpoint. ``lookup(namespace, name, stage)`` returns the job's uid, the
    stage's Jobs and its pods from the operator's indexes; ``accept`` takes a verified report;
    ``active()`` says whether this replica is the one reconciling."""

    def __init__(
        self,
        reviewer: TokenReviewer,
        lookup: Callable[[str, str, str], tuple[str | None, list[Mapping[str, Any]], list[Mapping[str, Any]]]],
        accept: Callable[[tuple[str, str], str, RunnerReport], None],
        active: Callable[[], bool],
        count: Callable[[str], None] = lambda outcome: None,
    ):
        self.reviewer, self.lookup, self.accept, self.active, self.count = reviewer, lookup, accept, active, count
        self.app = web.Application(client_max_size=MAX_BODY_BYTES)
        self.app.router.add_post(ROUTE, self.handle)
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port, ssl_context=ssl_context).start()

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()

    def _refuse(self, status: int, outcome: str, message: str) -> web.Response:
        self.count(outcome)
        return web.json_response({"error": message}, status=status)

    async def handle(self, request: web.Request) -> web.Response:
        if not self.active():
            self.count("standby")
            return web.json_response({"error": "standby replica"}, status=503, headers={"Retry-After": "1"})
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return self._refuse(401, "unauthenticated", "send the pod's report token as 'Authorization: Bearer'")
        try:
            who = await self.reviewer.identify(auth.removeprefix("Bearer ").strip())
        except TokenRefusedError as exc:
            return self._refuse(401, "unauthenticated", str(exc))
        ns, name, stage = (request.match_info[k] for k in ("namespace", "name", "stage"))
        if why := authorize(who, ns, *self.lookup(ns, name, stage)):
            log.warning("refused a report for %s/%s stage %s from pod %s/%s: %s", ns, name, stage,
                        who.namespace, who.pod_name, why)  # fmt: skip
            return self._refuse(403, "forbidden", why)
        try:
            report = RunnerReport.model_validate(json.loads(await request.read()))
        except (ValueError, ValidationError) as exc:
            detail = (
                "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                if isinstance(exc, ValidationError)
                else str(exc)
            )
            return self._refuse(400, "invalid", f"not a progress report: {detail}")
        self.accept((ns, name), stage, report)
        self.count("accepted")
        return web.json_response({"accepted": True})
