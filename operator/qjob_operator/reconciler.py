"""Runs ``attempts.observe_attempts`` (``status.observe``) and ``status.decide`` for one
QuantizationJob at a time and carries out the decision.

Reconciles are level-based and idempotent: any event (the job, one of its Jobs or Pods, a node)
schedules a reconcile of the job; a job already being reconciled is marked dirty and runs once
more afterwards, so bursts of events coalesce and one job never reconciles concurrently.
Inputs come from kopf's in-memory indexes (kopf holds handlers back until they are fully listed),
so a reconcile costs no API reads; it writes only what changed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import kopf
from pydantic import ValidationError
from qjob_api.reasons import Reason
from qjob_api.v1alpha1 import TERMINAL_PHASES, Phase, QuantizationJobSpec

from . import attempts, multipod
from .builders import QuantizationJobRef, build_job, build_role, build_role_binding, build_service_account
from .config import OperatorConfig
from .kube import Kube
from .metrics import Metrics
from .plan import Stage, plan_stages
from .status import decide, fmt_time, parse_time, transition_events

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, name)
RETRY_SECONDS = 5.0
DEBOUNCE_SECONDS = 1.0


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """JSON merge patch turning ``old`` into ``new`` for the keys ``new`` sets (nested objects are
    diffed so keys that disappeared are sent as null; lists are replaced whole)."""
    patch: dict[str, Any] = {}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            nested = merge_patch(before, value)
            nested.update({k: None for k in before if k not in value})
            if nested:
                patch[key] = nested
        elif value != before:
            patch[key] = value
    return patch


def apply_merge_patch(target: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    result = dict(target)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = apply_merge_patch(result[key], value)
        else:
            result[key] = value
    return result


def _revision(body: Mapping[str, Any]) -> int:
    try:
        return int(body["metadata"].get("resourceVersion") or 0)
    except ValueError:
        return 0


class Indexes:
    """kopf's indexes of the operator's stage Jobs and their Pods (keyed by namespace,
    QuantizationJob name, stage) and of the cluster's nodes."""

    def __init__(self) -> None:
        self.stage_jobs: kopf.Index | None = None
        self.pods: kopf.Index | None = None
        self.nodes: kopf.Index | None = None

    def bind(self, stage_jobs: kopf.Index, pods: kopf.Index, nodes: kopf.Index) -> None:
        self.stage_jobs, self.pods, self.nodes = stage_jobs, pods, nodes

    def jobs_of_stage(self, key: tuple[str, str, str]) -> list[dict[str, Any]]:
        """Every Job of a stage (a re-planned quantize stage has one per attempt)."""
        return list(self.stage_jobs.get(key, ())) if self.stage_jobs is not None else []

    def stage_pods(self, key: tuple[str, str, str]) -> list[dict[str, Any]]:
        return list(self.pods.get(key, ())) if self.pods is not None else []

    def all_nodes(self) -> list[dict[str, Any]]:
        return [n for store in (self.nodes.values() if self.nodes is not None else ()) for n in store]


class Reconciler:
    def __init__(
        self,
        config: OperatorConfig,
        kube: Kube,
        metrics: Metrics,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ):
        self.config, self.kube, self.metrics, self.clock = config, kube, metrics, clock
        self.indexes = Indexes()
        self.bodies: dict[Key, dict[str, Any]] = {}
        self._tasks: dict[Key, asyncio.Task] = {}
        self._dirty: set[Key] = set()
        self._created: set[tuple[str, str]] = set()  # (uid, Job name): created, maybe not indexed yet
        self.debounce_seconds = DEBOUNCE_SECONDS

    # ------------------------------------------------------------------------------ scheduling

    def track(self, key: Key, body: Mapping[str, Any]) -> None:
        known = self.bodies.get(key)
        # An event older than our own last status write would roll our view back and repeat its
        # events and metrics: keep the newer one (etcd revisions only grow).
        if (
            known is None
            or _revision(body) >= _revision(known)
            or known["metadata"].get("uid") != body["metadata"].get("uid")
        ):
            self.bodies[key] = {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec", "status") if k in body}
        self.schedule(key)

    def forget(self, key: Key) -> None:
        body = self.bodies.pop(key, None)
        if body:
            uid = body["metadata"]["uid"]
            self._created = {c for c in self._created if c[0] != uid}

    def phases(self) -> list[str]:
        return [(b.get("status") or {}).get("phase") or Phase.PENDING for b in self.bodies.values()]

    def schedule(self, key: Key, delay: float = 0.0) -> None:
        if delay > 0:
            asyncio.get_running_loop().call_later(delay, self.schedule, key)
            return
        task = self._tasks.get(key)
        if task and not task.done():
            self._dirty.add(key)
            return
        self._tasks[key] = asyncio.create_task(self._run(key), name=f"reconcile {key[0]}/{key[1]}")

    async def _settle(self) -> None:
        """Events come in bursts (a Job and its pod change together); waiting a moment lets one
        reconcile, and one status write, cover the whole burst."""
        await asyncio.sleep(self.debounce_seconds)

    def schedule_all(self, keep: Callable[[dict[str, Any]], bool]) -> None:
        for key, body in list(self.bodies.items()):
            if keep(body):
                self.schedule(key)

    async def _run(self, key: Key) -> None:
        while True:
            await self._settle()
            self._dirty.discard(key)
            started = self.clock()
            try:
                await self.reconcile(key)
            except Exception:  # noqa: BLE001 - any failure is retried; the loop must survive
                self.metrics.reconcile_errors.inc()
                log.exception("reconcile of %s/%s failed; retrying in %.0fs", *key, RETRY_SECONDS)
                self.schedule(key, RETRY_SECONDS)
            finally:
                self.metrics.reconcile_duration.observe((self.clock() - started).total_seconds())
            if key not in self._dirty:
                break
        self._tasks.pop(key, None)

    async def drain(self) -> None:
        """Waits for reconciles in flight (used at shutdown)."""
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    # ------------------------------------------------------------------------------- reconcile

    async def reconcile(self, key: Key) -> None:
        body = self.bodies.get(key)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        namespace, name = key
        old = body.get("status") or {}
        try:
            spec = QuantizationJobSpec.model_validate(body.get("spec") or {})
        except ValidationError as exc:
            if old.get("phase") not in TERMINAL_PHASES:
                # The CRD schema should have refused it; say why instead of failing silently.
                message = f"spec is invalid: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}"
                await self._write(
                    key,
                    body,
                    {
                        "phase": Phase.FAILED,
                        "reason": Reason.INVALID_SPEC,
                        "message": message,
                        "completionTime": fmt_time(self.clock()),
                    },
                    spec_format="unknown",
                    gpus=0,
                    stages=[],
                )
            return
        names = [s.name for s in plan_stages(spec, self.config)]
        stages, obs, sizing = attempts.observe_attempts(
            body,
            spec,
            self.config,
            {s: self.indexes.jobs_of_stage((namespace, name, s)) for s in names},
            {s: self.indexes.stage_pods((namespace, name, s)) for s in names},
            self.indexes.all_nodes(),
            self.clock(),
        )
        decision = decide(obs, spec, stages, self.config)
        if decision.status is not None:
            decision.status.update(sizing.status_fields())

        if decision.delete_self:
            log.info("deleting %s/%s: spec.runPolicy.ttlSecondsAfterFinished passed", namespace, name)
            await self.kube.delete_quantization_job(namespace, name)
            return
        ref = QuantizationJobRef.from_body(body)
        if decision.create:
            await self._create(ref, spec, decision.create)
        for job_name in decision.delete_stage_jobs:
            await self.kube.delete_batch_job(namespace, job_name)
        for job_name, suspend in decision.suspend_stage_jobs.items():
            await self.kube.set_batch_job_suspend(namespace, job_name, suspend)
        if decision.status is not None:
            fmt = spec.quantization.format.value if spec.quantization.format else "auto"
            job_created = {s: parse_time(j["metadata"].get("creationTimestamp")) for s, j in obs.stage_jobs.items()}
            await self._write(
                key,
                body,
                decision.status,
                spec_format=fmt,
                gpus=sizing.current.gpus_per_pod * sizing.current.pods if sizing.current else spec.resources.gpus,
                stages=stages,
                job_created=job_created,
                archs=obs.node_architectures,
            )
        if decision.requeue_after:
            self.schedule(key, decision.requeue_after)

    async def _create(self, ref: QuantizationJobRef, spec: QuantizationJobSpec, create: list[Stage]) -> None:
        todo = [s for s in create if (ref.uid, s.job_name(ref.name)) not in self._created]
        if not todo:
            return
        first = any(not s.after for s in todo)  # the stage that starts the job (fetch or quantize)
        if first:
            # The pod needs its ServiceAccount to exist when the Job controller creates it.
            await self.kube.create(build_service_account(ref, self.config))
        manifests = [build_job(ref, spec, s, self.config) for s in todo]
        # A multi-pod stage's ranks find each other through its headless Service.
        services = [multipod.build_rank_service(j) for s, j in zip(todo, manifests, strict=True) if s.pods > 1]
        await asyncio.gather(*(self.kube.create(m) for m in services))
        await asyncio.gather(*(self.kube.create(m) for m in manifests))
        self._created.update((ref.uid, s.job_name(ref.name)) for s in todo)
        if first:
            # The runner needs its Role only when it first reports, well after its pod starts.
            await asyncio.gather(self.kube.create(build_role(ref)), self.kube.create(build_role_binding(ref)))

    async def _write(
        self,
        key: Key,
        body: dict[str, Any],
        status: dict[str, Any],
        *,
        spec_format: str,
        gpus: int,
        stages: list[Stage],
        job_created: dict | None = None,
        archs: dict[str, str] | None = None,
    ) -> None:
        old = {k: v for k, v in (body.get("status") or {}).items() if k != "runnerReports"}
        patch = merge_patch(old, status)
        if not patch:
            return
        written = await self.kube.patch_status(key[0], key[1], patch)
        if written is None:
            return
        new = apply_merge_patch(old, patch)
        body["status"] = {**new, "runnerReports": (written.get("status") or {}).get("runnerReports") or {}}
        body["metadata"] = {**body["metadata"], "resourceVersion": written["metadata"]["resourceVersion"]}
        for event in transition_events(old, new):
            kopf.event(body, type=event.type, reason=event.reason, message=event.message)
        self.metrics.observe_transition(
            fmt=spec_format,
            created=parse_time(body["metadata"].get("creationTimestamp")),
            old=old,
            new=new,
            gpus=gpus,
            job_created=job_created or {},
            node_architecture=lambda n: (archs or {}).get(n or "", "unknown"),
        )
