"""Pure checks that keep one QuantizationJob from acting on what is not its own: children it did
not create (matched by owner uid, never by label alone) and output folders another job writes."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from datetime import datetime
from typing import Any

from qjob_api.reasons import Reason
from qjob_api.v1alpha1 import Phase

from .status import fmt_time, set_condition


def controller_uid(obj: Mapping[str, Any]) -> str | None:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return next((r.get("uid") for r in refs if r.get("controller")), None)


def owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    return controller_uid(obj) == uid


def foreign_child_message(kind: str, namespace: str, name: str, uid: str) -> str:
    return (
        f"{kind} {namespace}/{name} exists but was not created by this QuantizationJob (uid {uid}); it is never "
        "adopted: delete it, or create the QuantizationJob under another name"
    )


def _parts(path: str) -> tuple[str, ...]:
    return tuple(p for p in path.split("/") if p and p != ".")


def _overlap(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """One folder is the other or inside it."""
    return a[: len(b)] == b or b[: len(a)] == a


def _age(body: Mapping[str, Any]) -> tuple[str, str]:
    meta = body["metadata"]
    return meta.get("creationTimestamp") or "", meta.get("name") or ""


OutputTarget = tuple[str, str, tuple[str, ...]]  # (field, store, folder)


def output_target(body: Mapping[str, Any]) -> OutputTarget:
    """(field, store, folder) a job writes, from its stored body (no parsing: this runs for every
    other job). A claim is namespaced, so its store includes the namespace; a bucket is not."""
    meta = body["metadata"]
    out = (body.get("spec") or {}).get("output") or {}
    default = f"{meta.get('namespace')}/{meta.get('name')}"
    if s3 := out.get("s3"):
        return (
            "spec.output.s3",
            f"s3 {s3.get('endpoint') or ''} {s3.get('bucket')}",
            _parts(s3.get("prefix") or default),
        )
    pvc = out.get("pvc") or {}
    return "spec.output.pvc", f"pvc {meta.get('namespace')}/{pvc.get('claimName')}", _parts(pvc.get("path") or default)


def same_output(a: OutputTarget, b: OutputTarget) -> bool:
    """The same store, and one folder is the other or inside it."""
    return a[1] == b[1] and _overlap(a[2], b[2])


def output_conflict(
    body: Mapping[str, Any], others: Iterable[Mapping[str, Any]], started: Collection[str] = ()
) -> str | None:
    """Why this job may not write its output folder: another job writes the same claim (or bucket)
    at the same folder, inside it, or around it (they would overwrite or plant each other's files).
    The older job keeps the folder, unless the newer one already started (``started``: uids with
    children, also those the operator saw first); the other is refused. Buckets are compared
    across namespaces, without naming another namespace's job."""
    meta = body["metadata"]
    target = output_target(body)
    field, _, folder = target
    for other in others:
        theirs = other["metadata"]
        if theirs.get("uid") == meta.get("uid") or theirs.get("deletionTimestamp"):
            continue
        if (other.get("status") or {}).get("reason") == Reason.OUTPUT_PATH_CONFLICT:
            continue  # refused before it wrote anything: the folder is not its
        if (
            _age(other) >= _age(body)
            and theirs.get("uid") not in started
            and not (other.get("status") or {}).get("stages")
        ):
            continue
        theirs_target = output_target(other)
        if same_output(theirs_target, target):
            their_folder = theirs_target[2]
            whose = (
                f"QuantizationJob {theirs['name']}"
                if theirs.get("namespace") == meta.get("namespace")
                else "a QuantizationJob of another namespace"
            )
            return (
                f"{field} folder {'/'.join(folder)} overlaps the output of {whose} ({'/'.join(their_folder)}); jobs "
                f"never share an output folder: set another {field}.{'prefix' if 's3' in field else 'path'} (or "
                "leave it empty for <namespace>/<name>)"
            )
    return None


def refusal(old: Mapping[str, Any], reason: str, message: str, now: datetime, generation: int | None) -> dict[str, Any]:
    """The status of a job that fails before (or instead of) running anything."""
    conditions = list(old.get("conditions") or [])
    for type_, value in (("Failed", "True"), ("Complete", "False"), ("Running", "False")):
        conditions = set_condition(conditions, type_, value, reason, message, now, generation)
    return {
        "phase": Phase.FAILED,
        "reason": reason,
        "message": message,
        "completionTime": fmt_time(now),
        "observedGeneration": generation,
        "conditions": conditions,
    }
