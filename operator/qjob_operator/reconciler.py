"""Runs ``attempts.observe_attempts`` (``status.observe``) and ``status.decide`` for one
QuantizationJob at a time and carries out the decision.

Reconciles are level-based and idempotent: any event (the job, one of its Jobs or Pods, a node)
schedules a reconcile of the job; a job already being reconciled is marked dirty and runs once
more afterwards, so bursts of events coalesce and one job never reconciles concurrently.
Inputs come from kopf's in-memory indexes (kopf holds handlers back until they are fully listed),
so a reconcile costs no API reads; it writes only what changed, and a status change that is not a
phase or reason change waits until ``statusWriteIntervalSeconds`` after the job's previous write
(the changes in between go out in one patch). Runner progress arrives through the report
endpoint (reports.py) and goes out with the job's next status write.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import kopf
from pydantic import ValidationError
from qjob_api.reasons import Reason
from qjob_api.runner import REUSE_STAGE
from qjob_api.v1alpha1 import TERMINAL_PHASES, Phase, QuantizationJobSpec, RunnerReport
from qjob_api.work import recipe_key, recipe_of

from . import attempts, multipod, reuse, sharedcache
from .builders import QuantizationJobRef, build_job
from .config import OperatorConfig
from .events import build_event
from .fetch import FETCH_STAGE, shared_namespace
from .guards import (
    OutputTarget,
    controller_uid,
    foreign_child_message,
    output_conflict,
    output_target,
    owned_by,
    refusal,
    same_output,
)
from .kube import ApiError, Kube
from .metrics import Metrics
from .nodes import NodeFit
from .plan import LABEL_PREFIX, QUANTIZE_STAGE, Stage, plan_stages
from .status import decide, fmt_time, parse_time, runner_result, set_condition, transition_events

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, name)
RETRY_SECONDS = 5.0
MAX_RETRY_SECONDS = 300.0
DEBOUNCE_SECONDS = 1.0
# Versions up to 0.1 had kopf put this finalizer on every job; it is removed on sight (children
# are garbage-collected through owner references, so deleting a job needs no operator).
LEGACY_FINALIZER = f"{LABEL_PREFIX}/finalizer"


# Parsed specs kept (the most recently reconciled jobs'): one is ~10 KB of pydantic objects, its
# JSON ~0.6 KB, parsing it again ~0.15 ms; a cluster of thousands of jobs reconciles few at a time.
PARSED_SPECS = 512


class ParsedSpec:
    """A job's spec parsed once per generation (the spec is immutable but for runPolicy)."""

    def __init__(self, body: Mapping[str, Any], spec: Mapping[str, Any], config: OperatorConfig):
        meta = body["metadata"]
        self.uid, self.generation = meta.get("uid"), meta.get("generation")
        self.spec = QuantizationJobSpec.model_validate(spec)
        self.stages = plan_stages(self.spec, config, namespace=meta.get("namespace", ""))
        self.recipe = recipe_of(self.spec)
        self.recipe_key = recipe_key(self.recipe)

    def current(self, body: Mapping[str, Any]) -> bool:
        meta = body["metadata"]
        return (self.uid, self.generation) == (meta.get("uid"), meta.get("generation"))


def retry_delay(failures: int) -> float:
    """Exponential backoff per job: 5 s, 10 s, 20 s, ... up to 5 minutes."""
    return min(MAX_RETRY_SECONDS, RETRY_SECONDS * 2 ** max(0, failures - 1))


class ChildRefusedError(Exception):
    """The apiserver refused a child for a reason retrying cannot fix (422 Invalid)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


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


# What reconciles, Events and the report endpoint read of a job's metadata (kopf's bodies carry
# much more: managedFields, annotations, labels).
_KEPT_METADATA = (
    "name",
    "namespace",
    "uid",
    "generation",
    "resourceVersion",
    "creationTimestamp",
    "deletionTimestamp",
    "finalizers",
)


def _output_only(spec: Mapping[str, Any]) -> dict[str, Any]:
    return {"output": spec["output"]} if "output" in spec else {}


def _revision(body: Mapping[str, Any]) -> int:
    try:
        return int(body["metadata"].get("resourceVersion") or 0)
    except ValueError:
        return 0


class Indexes:
    """kopf's indexes of the operator's stage Jobs and their Pods (keyed by namespace,
    QuantizationJob name, stage) and of Succeeded jobs by (namespace, recipe key). Nodes are in
    ``NodeFit``."""

    def __init__(self) -> None:
        self.stage_jobs: kopf.Index | None = None
        self.pods: kopf.Index | None = None
        self.finished_work: kopf.Index | None = None

    def bind(self, stage_jobs: kopf.Index, pods: kopf.Index, finished_work: kopf.Index | None = None) -> None:
        self.stage_jobs, self.pods, self.finished_work = stage_jobs, pods, finished_work

    def reusable(self, namespace: str, key: str) -> list[reuse.Candidate]:
        return list(self.finished_work.get((namespace, key), ())) if self.finished_work is not None else []

    def jobs_of_stage(self, key: tuple[str, str, str]) -> list[dict[str, Any]]:
        """Every Job of a stage (a re-planned quantize stage has one per attempt)."""
        return list(self.stage_jobs.get(key, ())) if self.stage_jobs is not None else []

    def stage_pods(self, key: tuple[str, str, str]) -> list[dict[str, Any]]:
        return list(self.pods.get(key, ())) if self.pods is not None else []


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
        self._created: dict[str, set[str]] = {}  # uid -> Job names created, maybe not indexed yet
        self._outputs: dict[Key, OutputTarget] = {}  # each job's output (guards.output_target)
        self._specs: dict[Key, str] = {}  # each job's spec, JSON
        self._parsed: dict[Key, ParsedSpec] = {}  # the last PARSED_SPECS reconciled, oldest first
        self.node_fit = NodeFit(config)
        self._nodes_changed = False  # a re-check of NoMatchingNodes jobs is due
        self.reports: dict[Key, dict[str, RunnerReport]] = {}  # accepted, not yet written
        self._written_at: dict[Key, float] = {}  # monotonic time of each job's last status write
        self._deferred: dict[Key, asyncio.TimerHandle] = {}
        # Jobs waiting for a status write's turn (and since when), in order; a job whose turn came
        # is reconciled again and writes its newest state (see _write).
        self._write_queue: dict[Key, float] = {}
        self._granted: set[Key] = set()
        self._granter: asyncio.Task | None = None
        self._failures: dict[Key, int] = {}  # consecutive failed reconciles, for backoff
        self._retry_at: dict[Key, float] = {}  # monotonic time of the next retry of a job in backoff
        self._priority_classes: dict[str, bool] = {}  # name -> exists (only missing ones are re-checked)
        self._views: set[str] = set()  # namespaces whose view of the shared model cache is bound
        self.debounce_seconds = DEBOUNCE_SECONDS
        self.listed = False  # kopf listed every watched resource (handlers run only then)

    # ------------------------------------------------------------------------------ scheduling

    def track(self, key: Key, body: Mapping[str, Any]) -> None:
        known = self.bodies.get(key)
        if known is None or known["metadata"].get("generation") != body["metadata"].get("generation"):
            self._retry_at.pop(key, None)  # the user changed the job: retry at once
        # An event older than our own last status write would roll our view back and repeat its
        # events and metrics: keep the newer one (etcd revisions only grow).
        if (
            known is None
            or _revision(body) >= _revision(known)
            or known["metadata"].get("uid") != body["metadata"].get("uid")
        ):
            meta = body["metadata"]
            kept: dict[str, Any] = {
                "apiVersion": body.get("apiVersion"),
                "kind": body.get("kind"),
                "metadata": {k: meta[k] for k in _KEPT_METADATA if k in meta},
                "status": body.get("status") or {},
            }
            # The spec as compact JSON (parsed when reconciled, see PARSED_SPECS); in the body only
            # the output the other jobs' folder checks read (guards.output_target).
            spec = body.get("spec") or {}
            self._specs[key] = json.dumps(spec, separators=(",", ":"))
            kept["spec"] = _output_only(spec)
            self.bodies[key] = kept
            self._outputs[key] = output_target(kept)
        self.schedule(key)

    def forget(self, key: Key) -> None:
        self._failures.pop(key, None)
        self._retry_at.pop(key, None)
        body = self.bodies.pop(key, None)
        for table in (self._parsed, self._specs, self.reports, self._written_at, self._outputs):
            table.pop(key, None)
        self._write_queue.pop(key, None)
        self._granted.discard(key)
        if timer := self._deferred.pop(key, None):
            timer.cancel()
        if body:
            self._created.pop(body["metadata"]["uid"], None)

    # --------------------------------------------------------------------------- runner reports

    def stage_of(self, namespace: str, name: str, stage: str) -> tuple[str | None, list[dict], list[dict]]:
        """The job's uid, the stage's Jobs (one per attempt) and pods, as the report endpoint checks a report."""
        body = self.bodies.get((namespace, name))
        uid = body["metadata"].get("uid") if body else None
        key = (namespace, name, stage)
        return uid, self.indexes.jobs_of_stage(key), self.indexes.stage_pods(key)

    def receive_report(self, key: Key, stage: str, report: RunnerReport) -> None:
        self.reports.setdefault(key, {})[stage] = report
        self.schedule(key)

    def node_event(self, kind: str, node: dict[str, Any]) -> None:
        """From the node watch: a node appearing or changing may unblock jobs waiting with
        NoMatchingNodes (once per batch of node events, however many nodes changed)."""
        changed = self.node_fit.changed(node["metadata"]["name"], None if kind == "DELETED" else node)
        if changed and not self._nodes_changed:
            self._nodes_changed = True
            asyncio.get_running_loop().call_soon(self._after_node_changes)

    def _after_node_changes(self) -> None:
        self._nodes_changed = False
        self.schedule_all(lambda b: (b.get("status") or {}).get("reason") == Reason.NO_MATCHING_NODES)

    def phases(self) -> list[str]:
        return [(b.get("status") or {}).get("phase") or Phase.PENDING for b in self.bodies.values()]

    def schedule(self, key: Key, delay: float = 0.0) -> None:
        # Tasks and timers start in an empty context: they would copy the caller's, and a kopf
        # handler's holds its cause, the event's whole body (~30 KB a job, for as long as they live).
        if delay > 0:
            asyncio.get_running_loop().call_later(delay, self.schedule, key, context=contextvars.Context())
            return
        if self._retry_at.get(key, 0.0) > time.monotonic():
            return  # in backoff: events (our own status writes too) wait for the retry
        task = self._tasks.get(key)
        if task and not task.done():
            self._dirty.add(key)
            return
        self._tasks[key] = asyncio.create_task(
            self._run(key), name=f"reconcile {key[0]}/{key[1]}", context=contextvars.Context()
        )

    def _retry(self, key: Key) -> None:
        # (a timer may fire a hair early; one for an earlier failure finds a later retry time set)
        if self._retry_at.get(key, 0.0) <= time.monotonic() + 0.05:
            self._retry_at.pop(key, None)
            self.schedule(key)

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
            started, granted = time.monotonic(), key in self._granted
            try:
                await self.reconcile(key)
                self._retry_at.pop(key, None)
                if self._failures.pop(key, 0):
                    await self._record_reconciled(key, None)
            except Exception as exc:  # noqa: BLE001 - any failure is retried; the loop must survive
                self.metrics.reconcile_errors.inc()
                failures = self._failures[key] = self._failures.get(key, 0) + 1
                delay = retry_delay(failures)
                log.exception("reconcile of %s/%s failed (%d in a row); retrying in %.0fs", *key, failures, delay)
                self._retry_at[key] = time.monotonic() + delay
                await self._record_reconciled(key, f"{_describe(exc)}; retry {failures} in {delay:.0f}s")
                asyncio.get_running_loop().call_later(delay, self._retry, key)
                self._dirty.discard(key)  # what changed meanwhile waits for the retry too
            finally:
                self.metrics.reconcile_duration.observe(time.monotonic() - started)
                if granted and key in self._granted:  # its turn came but it had nothing to write
                    self._granted.discard(key)
                    self.kube.status_writes.give_back()
            if key not in self._dirty:
                break
        self._tasks.pop(key, None)

    async def _record_reconciled(self, key: Key, error: str | None) -> None:
        """Says in status (condition Reconciled) why the operator cannot move the job on, and clears
        it once it can: errors must not live only in the operator's log."""
        body = self.bodies.get(key)
        if body is None:
            return
        old = body.get("status") or {}
        if error is None and not any(c.get("type") == Reason.RECONCILED for c in old.get("conditions") or []):
            return
        status, reason = ("False", Reason.RECONCILE_FAILED) if error else ("True", Reason.RECONCILED)
        conditions = set_condition(
            list(old.get("conditions") or []),
            Reason.RECONCILED,
            status,
            reason,
            error or "the operator reconciled this job",
            self.clock(),
            body["metadata"].get("generation"),
        )
        try:
            # Not coalesced: a deferred write would reconcile again, outside the backoff.
            await self._write(
                key, body, {"conditions": conditions}, spec_format="unknown", gpus=0, stages=[], news=True, queue=False
            )
        except Exception as exc:  # noqa: BLE001 - the apiserver may be what fails; the log has it
            log.warning("could not record the reconcile error of %s/%s: %s", *key, _describe(exc))

    async def drain(self) -> None:
        """Waits for reconciles in flight (used at shutdown)."""
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    # ------------------------------------------------------------------------------- reconcile

    async def reconcile(self, key: Key) -> None:
        body = self.bodies.get(key)
        if body is None:
            return
        namespace, name = key
        finalizers = body["metadata"].get("finalizers") or []
        if LEGACY_FINALIZER in finalizers:
            await self.kube.remove_finalizer(namespace, name, finalizers, LEGACY_FINALIZER)
        if body["metadata"].get("deletionTimestamp"):
            return
        old = body.get("status") or {}
        try:
            parsed = self._parsed.pop(key, None)
            if parsed is None or not parsed.current(body):
                parsed = ParsedSpec(body, json.loads(self._specs[key]), self.config)
            self._parsed[key] = parsed
            if len(self._parsed) > PARSED_SPECS:
                del self._parsed[next(iter(self._parsed))]
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
        spec = parsed.spec
        # Reports accepted since the last write count as written for this decision.
        if fresh := self.reports.get(key):
            body = {**body, "status": {**old, "runnerReports": {**(old.get("runnerReports") or {}), **{
                s: r.to_api() for s, r in fresh.items()}}}}  # fmt: skip
        self.node_fit.refresh()
        names = [REUSE_STAGE, *(s.name for s in parsed.stages)]
        uid = body["metadata"]["uid"]
        stage_jobs, stage_pods, foreign = {}, {}, []
        for stage in names:
            # Children are ours by owner uid, never by label: an orphan of an earlier job with this
            # name (or a Job someone labelled like ours) is not adopted.
            jobs = self.indexes.jobs_of_stage((namespace, name, stage))
            foreign += [
                foreign_child_message("Job", namespace, j["metadata"]["name"], uid)
                for j in jobs
                if not owned_by(j, uid)
            ]
            stage_jobs[stage] = [j for j in jobs if owned_by(j, uid)]
            job_uids = {j["metadata"].get("uid") for j in stage_jobs[stage]}
            pods = self.indexes.stage_pods((namespace, name, stage))
            stage_pods[stage] = [p for p in pods if controller_uid(p) in job_uids]
        if old.get("phase") not in TERMINAL_PHASES:
            ours = [j for jobs in stage_jobs.values() for j in jobs]
            problem = (Reason.OBJECT_CONFLICT, "; ".join(foreign)) if foreign else None
            problem = problem or await self._before_first_stage(body, spec, bool(ours))
            if problem:
                await self._refuse(key, body, spec, ours, *problem)
                return
        reused = self._reuse_state(namespace, body, parsed, stage_jobs, stage_pods)
        stages, obs, sizing = attempts.observe_attempts(
            body, spec, self.config, stage_jobs, stage_pods, self.node_fit, self.clock(), reused
        )
        decision = decide(obs, spec, stages, self.config)
        if decision.status is not None:
            decision.status.update(sizing.status_fields())
            decision.status.update(reused.status_fields())
            if decision.status.get("phase") == Phase.SUCCEEDED:
                # What quantize ran on comes first: the reuse stage's inputs are only a prediction of it.
                pods = [p for s in (QUANTIZE_STAGE, REUSE_STAGE) for p in obs.stage_pods.get(s, [])]
                results = [runner_result(p) for p in pods]
                work = reuse.work_record(parsed.recipe, parsed.recipe_key, (r for r in results if r))
                if work:
                    decision.status["work"] = work.to_api()

        if decision.delete_self:
            log.info("deleting %s/%s: spec.runPolicy.ttlSecondsAfterFinished passed", namespace, name)
            await self.kube.delete_quantization_job(namespace, name)
            return
        ref = QuantizationJobRef.from_body(body)
        if decision.create:
            try:
                await self._create(ref, spec, decision.create)
            except ChildRefusedError as exc:
                await self._refuse(key, body, spec, list(obs.stage_jobs.values()), exc.reason, exc.message)
                return
        for job_name, suspend in decision.suspend_stage_jobs.items():
            await self.kube.set_batch_job_suspend(namespace, job_name, suspend)
        recorded = True
        if decision.status is not None:
            if fresh:
                decision.status["runnerReports"] = body["status"]["runnerReports"]
            fmt = spec.quantization.format.value if spec.quantization.format else "auto"
            job_created = {s: parse_time(j["metadata"].get("creationTimestamp")) for s, j in obs.stage_jobs.items()}
            recorded = await self._write(
                key,
                self.bodies[key],
                decision.status,
                spec_format=fmt,
                gpus=sizing.current.gpus_per_pod * sizing.current.pods if sizing.current else spec.resources.gpus,
                stages=stages,
                job_created=job_created,
                archs=obs.node_architectures,
            )
        # Jobs are stopped only once the failure is in status: deleting them first would let the
        # next reconcile see a stage without its Job and no recorded outcome (a job stuck Pending).
        if recorded:
            for job_name in decision.delete_stage_jobs:
                await self.kube.delete_batch_job(namespace, job_name)
        if decision.requeue_after:
            self.schedule(key, decision.requeue_after)

    def _reuse_state(
        self,
        namespace: str,
        body: dict[str, Any],
        parsed: ParsedSpec,
        stage_jobs: Mapping[str, list[dict[str, Any]]],
        stage_pods: Mapping[str, list[dict[str, Any]]],
    ) -> reuse.ReuseState:
        """Whether a reuse stage comes first: decided once, before anything of the job exists."""
        uid, old = body["metadata"]["uid"], body.get("status") or {}
        created = self._created.get(uid, set())
        started = bool(stage_jobs.get(REUSE_STAGE)) or any(job.endswith(f"-{REUSE_STAGE}") for job in created)
        fresh = (
            not created
            and not any(stage_jobs.values())
            and old.get("phase") not in TERMINAL_PHASES
            and not any(r.get("jobName") for r in old.get("stages") or [])
        )
        found = reuse.pick(self.indexes.reusable(namespace, parsed.recipe_key), uid)
        succeeded = [p for p in stage_pods.get(REUSE_STAGE, []) if (p.get("status") or {}).get("phase") == "Succeeded"]
        results = [r for p in succeeded if (r := runner_result(p))]
        return reuse.decide_reuse(parsed.spec, old, fresh, started, found, results)

    async def _before_first_stage(
        self, body: dict[str, Any], spec: QuantizationJobSpec, started: bool
    ) -> tuple[str, str] | None:
        """Checks that need other objects, made once before anything is created."""
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if started or body["metadata"]["uid"] in self._created:
            return None
        # Only the jobs whose output overlaps (a pass over cached targets, not over every body).
        target = self._outputs[key]
        overlapping = [self.bodies[k] for k, t in self._outputs.items() if k != key and same_output(t, target)]
        if message := output_conflict(body, overlapping, self._created):
            return Reason.OUTPUT_PATH_CONFLICT, message
        name = spec.scheduling.priority_class_name
        if name and not self._priority_classes.get(name):
            exists = await self.kube.priority_class_exists(name)
            if exists is False:
                return Reason.PRIORITY_CLASS_NOT_FOUND, (
                    f"spec.scheduling.priorityClassName {name!r} names no PriorityClass: runner pods would be "
                    "refused; use one of `kubectl get priorityclasses`, or remove it"
                )
            self._priority_classes[name] = bool(exists)
        return None

    async def _refuse(
        self,
        key: Key,
        body: dict[str, Any],
        spec: QuantizationJobSpec,
        jobs: list[dict[str, Any]],
        reason: str,
        message: str,
    ) -> None:
        """Fails the job with a reason and stops whatever of it still runs (also Jobs just created
        and not indexed yet)."""
        uid = body["metadata"]["uid"]
        done = {j["metadata"]["name"] for j in jobs if (j.get("status") or {}).get("completionTime")}
        started = self._created.get(uid, set()) | {j["metadata"]["name"] for j in jobs}
        old = body.get("status") or {}
        status = refusal(old, reason, message, self.clock(), body["metadata"].get("generation"))
        fmt = spec.quantization.format.value if spec.quantization.format else "auto"
        # Recorded first, then stopped (as in reconcile); a later reconcile of the failed job stops
        # whatever is left (status.decide_ttl).
        if await self._write(key, body, status, spec_format=fmt, gpus=spec.resources.gpus, stages=[]):
            for job_name in sorted(started - done):
                await self.kube.delete_batch_job(key[0], job_name)

    async def _create(self, ref: QuantizationJobRef, spec: QuantizationJobSpec, create: list[Stage]) -> None:
        created = self._created.get(ref.uid, set())
        todo = [s for s in create if s.job_name(ref.name) not in created]
        if not todo:
            return
        # Runner pods need no API identity (see reports.py): a stage is its Job (and, spread over
        # several pods, the headless Service its ranks find each other through).
        manifests = [build_job(ref, spec, s, self.config) for s in todo]
        if any(s.name == FETCH_STAGE and s.cache and s.cache.role == "wait" for s in todo):
            await self._shared_cache_view(ref.namespace)
            await self.kube.create(sharedcache.fill_job(ref, spec, self.config))
        services = [multipod.build_rank_service(j) for s, j in zip(todo, manifests, strict=True) if s.pods > 1]
        await asyncio.gather(*(self.kube.create(m) for m in services))
        results = await asyncio.gather(*(self.kube.create(m) for m in manifests), return_exceptions=True)
        if made := {s.job_name(ref.name) for s, r in zip(todo, results, strict=True) if r is True}:
            self._created[ref.uid] = created | made
        errors = [r for r in results if isinstance(r, BaseException)]
        rejected = next((e for e in errors if isinstance(e, ApiError) and e.status == 422), None)
        if rejected:  # the same spec would be refused again: say why and stop
            raise ChildRefusedError(Reason.JOB_REJECTED, f"the apiserver refused the runner Job: {_describe(rejected)}")
        if errors:
            raise errors[0]

    async def _shared_cache_view(self, namespace: str) -> None:
        """Binds ``namespace``'s read-only view of the shared model cache (once per process; both
        objects are created only if missing). A claim of that name that is not the view is refused:
        it could point the namespace's jobs at other data."""
        if namespace in self._views:
            return
        shared, home = self.config.model_cache.shared, shared_namespace(self.config)
        claim = await self.kube.read_claim(home, shared.claim_name)
        bound = claim and claim.get("spec", {}).get("volumeName")
        if not bound or (claim.get("status") or {}).get("phase") != "Bound":
            raise SharedCacheUnavailable(
                f"the shared model cache's claim {home}/{shared.claim_name} (modelCache.shared.claimName) "
                f"{'is not bound to a volume yet' if claim else 'does not exist'}: create it (ReadWriteMany), "
                "or clear modelCache.shared.claimName"
            )
        source = await self.kube.read_volume(bound)
        if source is None:
            raise SharedCacheUnavailable(f"the shared model cache's volume {bound} is gone")
        volume, enforced = sharedcache.view_volume(source, namespace, self.config)
        if not enforced:
            log.warning(
                "the shared model cache's volume %s has no readOnly field (%s): the view in %s is read-only in "
                "runner pods only, not in pods that namespace's users create",
                bound,
                ", ".join(source["spec"]),
                namespace,
            )
        await self.kube.create(volume)
        await self.kube.create(sharedcache.view_claim(volume, namespace, self.config))
        view = await self.kube.read_claim(namespace, shared.view_claim_name)
        if view and view["spec"].get("volumeName") != volume["metadata"]["name"]:
            raise SharedCacheUnavailable(
                f"PersistentVolumeClaim {namespace}/{shared.view_claim_name} exists and is not the shared model "
                "cache's view: delete it, or set modelCache.shared.viewClaimName to a free name"
            )
        self._views.add(namespace)

    def _defer(self, key: Key, delay: float) -> None:
        """One reconcile of ``key`` in ``delay`` seconds, however many ask for it meanwhile."""
        if key in self._deferred:
            return

        def fire() -> None:
            self._deferred.pop(key, None)
            self.schedule(key)

        self._deferred[key] = asyncio.get_running_loop().call_later(delay, fire, context=contextvars.Context())

    async def _grant_write_turns(self) -> None:
        """Gives the queued jobs their status write turns, first come first served."""
        while self._write_queue:
            await self.kube.status_write_turn()
            if not self._write_queue:  # forgotten meanwhile
                self.kube.status_writes.give_back()
                break
            key = next(iter(self._write_queue))
            self.metrics.status_write_wait.observe(time.monotonic() - self._write_queue.pop(key))
            self._granted.add(key)
            self.schedule(key)

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
        news: bool = False,
        queue: bool = True,
    ) -> bool:
        """Writes what changed in ``status``; True when the status now holds it (written, or
        nothing to write), False when the write was deferred or queued. Without a free turn
        (``statusWritesPerSecond``, Job creates first) the job joins the write queue and this
        decision is dropped: at its turn the job is reconciled again and writes its state as of
        then, once. Queued jobs cost a key each, not a parked reconcile (thousands wait after a
        burst). ``queue=False``: waits here."""
        old = body.get("status") or {}
        patch = merge_patch(old, status)
        if not patch:
            return True
        news = news or "phase" in patch or "reason" in patch
        wait = self._written_at.get(key, -1e9) + self.config.status_write_interval_seconds - time.monotonic()
        if not news and wait > 0:
            self._defer(key, wait)  # progress and stage details go out with the next write
            return False
        if key in self._granted:
            self._granted.discard(key)
        elif not queue:
            waiting = time.monotonic()
            await self.kube.status_write_turn()
            self.metrics.status_write_wait.observe(time.monotonic() - waiting)
        elif self._write_queue or not self.kube.status_write_turn_now():
            self._write_queue.setdefault(key, time.monotonic())
            if self._granter is None or self._granter.done():
                self._granter = asyncio.create_task(self._grant_write_turns(), name="status write turns")
            return False
        else:
            self.metrics.status_write_wait.observe(0.0)
        written = await self.kube.patch_status(key[0], key[1], patch)
        if written is None:
            return False
        self._written_at[key] = time.monotonic()
        if self.reports.get(key) and all(
            status.get("runnerReports", {}).get(s) == r.to_api() for s, r in self.reports[key].items()
        ):
            self.reports.pop(key, None)
        new = apply_merge_patch(old, patch)
        body["status"] = new
        body["metadata"] = {**body["metadata"], "resourceVersion": written["metadata"]["resourceVersion"]}
        for event in transition_events(old, new):
            try:
                await self.kube.create(build_event(body, event, self.clock()))
            except Exception as exc:  # noqa: BLE001 - a lost Event must not lose the metrics below
                log.warning("could not post Event %s for %s/%s: %s", event.reason, *key, _describe(exc))
        self.metrics.observe_transition(
            fmt=spec_format,
            created=parse_time(body["metadata"].get("creationTimestamp")),
            old=old,
            new=new,
            gpus=gpus,
            job_created=job_created or {},
            node_architecture=lambda n: (archs or {}).get(n or "", "unknown"),
        )
        return True


class SharedCacheUnavailable(Exception):  # noqa: N818 - says what is wrong, as the status message reads it
    """The shared model cache cannot be mounted in a namespace yet (retried with backoff)."""


def _describe(exc: BaseException) -> str:
    """One line for status and logs: the apiserver's own message when it sent one."""
    if isinstance(exc, ApiError):
        try:
            return f"{exc.status} {json.loads(exc.body).get('message')}"
        except (TypeError, ValueError, AttributeError):
            return f"{exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}"
