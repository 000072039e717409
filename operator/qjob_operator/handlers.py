"""kopf entry points. Thin on purpose: each handler records what it saw and schedules a
reconcile; the decisions live in ``status.decide`` and the actions in ``reconciler``."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf
from qjob_api.v1alpha1 import GROUP, PLURAL, TERMINAL_PHASES, VERSION

from . import reuse
from .plan import LABEL_PREFIX, LABEL_QUANTIZATION_JOB, LABEL_STAGE
from .reconciler import Reconciler

QJOB = (GROUP, VERSION, PLURAL)
OWNED = {LABEL_QUANTIZATION_JOB: kopf.PRESENT, LABEL_STAGE: kopf.PRESENT}


class NoDiffBase(kopf.DiffBaseStorage):
    """The operator has event handlers and indexes only (no on.create/on.update), which never read
    kopf's diff of an object: building its base (a deep copy of every event's body) is skipped."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    # No finalizer: there is no deletion handler (children go by owner references), so a job can
    # be deleted with the operator gone. Our own prefixes in case kopf stores anything.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=LABEL_PREFIX)
    settings.persistence.diffbase_storage = NoDiffBase()
    # The operator posts its own Events (events.py); handler log lines stay in the log.
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    # Only our own Jobs and Pods reach the operator (server-side selectors): a busy cluster's
    # other pods cost it nothing.
    owned = ",".join(OWNED)
    settings.watching.label_selectors["batch", "jobs"] = owned
    settings.watching.label_selectors["", "pods"] = owned
    # main.py built the reconciler (the report endpoint and the probes use it too).
    config = memo.reconciler.config
    memo.resync = asyncio.create_task(_resync(memo.reconciler, config.resync_seconds))
    logger.info("qjob-operator active: runner image %s", config.runner.image)


async def _resync(reconciler: Reconciler, every: float) -> None:
    """Safety net: re-check unfinished jobs periodically (deadlines, missed events)."""
    while True:
        await asyncio.sleep(every)
        reconciler.schedule_all(lambda b: (b.get("status") or {}).get("phase") not in TERMINAL_PHASES)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    memo.resync.cancel()
    await memo.reconciler.drain()


# Indexes: kopf lists these fully before any handler runs, so a reconcile after a restart sees
# every existing child and never creates a duplicate. Values are trimmed to what decide() reads.
# Coroutines, though they never wait: kopf runs plain functions in its thread pool, a hop per event.


def _trim(body: kopf.Body, status_keys: tuple[str, ...]) -> dict[str, Any]:
    meta = body["metadata"]
    status = body.get("status") or {}
    # uid and the controller reference: children are matched to their owner by uid, not by label.
    owners = [
        {"kind": r.get("kind"), "uid": r.get("uid"), "controller": r.get("controller")}
        for r in meta.get("ownerReferences") or []
    ]
    return {
        "metadata": {
            **{k: meta.get(k) for k in ("name", "namespace", "uid", "creationTimestamp", "labels")},
            "ownerReferences": owners,
        },
        "spec": dict(body.get("spec") or {}),
        "status": {k: status[k] for k in status_keys if k in status},
    }


@kopf.index("batch", "v1", "jobs", labels=OWNED)
async def qjob_stage_jobs(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict:
    trimmed = _trim(body, ("conditions", "active", "failed", "succeeded", "startTime", "completionTime"))
    trimmed["spec"] = {"suspend": body["spec"].get("suspend")}
    return {(namespace, labels[LABEL_QUANTIZATION_JOB], labels[LABEL_STAGE]): trimmed}


@kopf.index("", "v1", "pods", labels=OWNED)
async def qjob_pods(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict:
    trimmed = _trim(body, ("phase", "reason", "message", "conditions", "containerStatuses", "startTime"))
    spec = body.get("spec") or {}
    trimmed["spec"] = {
        "nodeName": spec.get("nodeName"),
        "containers": [{"name": c.get("name"), "image": c.get("image")} for c in spec.get("containers", [])],
    }
    return {(namespace, labels[LABEL_QUANTIZATION_JOB], labels[LABEL_STAGE]): trimmed}


def _finished_work(status: kopf.Status, **_: Any) -> bool:
    return (status or {}).get("phase") == "Succeeded" and bool((status or {}).get("work"))


@kopf.index(*QJOB, when=_finished_work)
async def qjob_finished_work(namespace: str, body: kopf.Body, **_: Any) -> dict | None:
    """Succeeded jobs by (namespace, recipe key): the candidates a new job may reuse (reuse.py)."""
    entry = reuse.indexed(body)
    return {(namespace, entry["recipe_key"]): entry["candidate"]} if entry else None


@kopf.on.event(*QJOB)
async def quantizationjob_event(
    event: dict,
    body: kopf.Body,
    namespace: str,
    name: str,
    memo: kopf.Memo,
    qjob_stage_jobs: kopf.Index,
    qjob_pods: kopf.Index,
    qjob_finished_work: kopf.Index,
    **_: Any,
) -> None:
    reconciler: Reconciler = memo.reconciler
    # kopf holds every handler until all indexed resources are listed: any event means it is done
    reconciler.listed = True
    reconciler.indexes.bind(qjob_stage_jobs, qjob_pods, qjob_finished_work)
    if event.get("type") == "DELETED":
        reconciler.forget((namespace, name))
    else:
        reconciler.track((namespace, name), body)


@kopf.on.event("batch", "v1", "jobs", labels=OWNED)
@kopf.on.event("", "v1", "pods", labels=OWNED)
async def child_event(namespace: str, labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> None:
    memo.reconciler.listed = True  # as above
    memo.reconciler.schedule((namespace, labels[LABEL_QUANTIZATION_JOB]))
