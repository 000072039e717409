"""Reuse of identical finished work (spec.reuse): pure decisions.

A Succeeded job records ``status.work`` (its work key, the key of its recipe and the resolved
inputs). kopf indexes Succeeded jobs by (namespace, recipe key) (``handlers.qjob_finished_work``);
a new job with ``spec.reuse: IfAvailable`` whose recipe key has entries in its own namespace gets
a GPU-less ``reuse`` stage first. That stage resolves the new job's inputs (model revision,
calibration texts, library versions: the recipe alone cannot know them), computes its work key
with ``qjob_api.work.work_key`` and, for the first candidate with the same key, checks the
candidate's ``manifest.json`` files and every file's sha256 where they lie (PVC or S3), then copies
them into this job's output. Reused: the job succeeds with that stage alone (``status.reusedFrom``),
or with it and the builds of the engines the candidate did not have with this job's target
(engines are matched one by one).
Not reused (inputs changed, artifact gone or changed): the normal stages run after it.

Only the job's own namespace is searched: artifacts can come from a gated model fetched with
another team's token, and the reuse pod could not mount another namespace's claim or Secret.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from qjob_api.reasons import Reason
from qjob_api.runner import MAX_REUSE_CANDIDATES, ReuseCandidate
from qjob_api.v1alpha1 import (
    Artifact,
    JobReference,
    Phase,
    PVCLocation,
    QuantizationJobSpec,
    ReusePolicy,
    ReuseStatus,
    S3Location,
    WorkInputs,
    WorkRecord,
)
from qjob_api.work import WorkRecipe, work_key

from .objectstore import S3Use

Mode = Literal["check", "reused"] | None
REUSE_ROLE = "reuse"


@dataclass(frozen=True)
class Candidate:
    """A Succeeded job of the namespace with the same recipe, as the index holds it."""

    ref: JobReference
    work: WorkRecord
    output_pvc: PVCLocation | None
    output_s3: S3Location | None
    artifacts: tuple[Artifact, ...]
    completion_time: str

    @property
    def output_uri(self) -> str:
        if self.output_s3:
            return f"s3://{self.output_s3.bucket}/{self.output_s3.prefix.strip('/')}"
        assert self.output_pvc is not None
        return f"pvc://{self.output_pvc.claim_name}/{self.output_pvc.path}"

    def s3_use(self, index: int) -> S3Use | None:
        """Its S3 output as this job's reuse pod reads it: credentials from its Secret (same namespace)."""
        if self.output_s3 is None:
            return None
        where = f"the output of {self.ref.name} (its spec.output.s3)"
        return S3Use(f"{REUSE_ROLE}{index}", where, self.output_s3, self.output_s3.prefix)


def indexed(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """What the index keeps of a job: its recipe key and the candidate (None: not reusable)."""
    status, meta = body.get("status") or {}, body["metadata"]
    work = status.get("work")
    if status.get("phase") != Phase.SUCCEEDED or not work or meta.get("deletionTimestamp"):
        return None
    output = (body.get("spec") or {}).get("output") or {}
    namespace, name = meta["namespace"], meta["name"]
    pvc = s3 = None
    if output.get("pvc"):
        pvc = PVCLocation.model_validate(output["pvc"])
        pvc = pvc if pvc.path else pvc.model_copy(update={"path": f"{namespace}/{name}"})
    elif output.get("s3"):
        s3 = S3Location.model_validate(output["s3"])
        s3 = s3 if s3.prefix else s3.model_copy(update={"prefix": f"{namespace}/{name}"})
    else:
        return None
    candidate = Candidate(
        ref=JobReference(namespace=namespace, name=name, uid=meta["uid"]),
        work=WorkRecord.model_validate(work),
        output_pvc=pvc,
        output_s3=s3,
        artifacts=tuple(Artifact.model_validate(a) for a in status.get("artifacts") or []),
        completion_time=status.get("completionTime") or "",
    )
    return {"recipe_key": candidate.work.recipe_key, "candidate": candidate}


def pick(found: Iterable[Candidate], uid: str) -> list[Candidate]:
    """The candidates to check: others than the job itself, newest first, at most MAX_REUSE_CANDIDATES."""
    others = [c for c in found if c.ref.uid != uid]
    return sorted(others, key=lambda c: c.completion_time, reverse=True)[:MAX_REUSE_CANDIDATES]


@dataclass
class ReuseState:
    """Whether the plan has a reuse stage (``mode``) and what status says about it."""

    mode: Mode = None
    candidates: list[Candidate] = field(default_factory=list)
    status: ReuseStatus | None = None
    reused_from: JobReference | None = None

    @property
    def reused_engines(self) -> set[str]:
        """Architectures whose engines came with the reused checkpoint (no build stage for them)."""
        return set(self.status.engines or ()) if self.status and self.mode == "reused" else set()

    def status_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        if self.status:
            fields["reuse"] = self.status.to_api()
        if self.reused_from:
            fields["reusedFrom"] = self.reused_from.to_api()
        return fields


def decide_reuse(
    spec: QuantizationJobSpec,
    status: Mapping[str, Any],
    fresh: bool,
    started: bool,
    found: list[Candidate],
    results: list[Any],
) -> ReuseState:
    """``fresh``: nothing of the job was created yet (the only moment a reuse stage may be added);
    ``started``: its reuse Job exists (status may not say so yet); ``found``: candidates from the
    index (``pick``ed); ``results``: RunnerResults of the reuse stage's succeeded pods."""
    if spec.reuse == ReusePolicy.NEVER:
        return ReuseState()
    old = ReuseStatus.model_validate(status["reuse"]) if status.get("reuse") else None
    if old is None:
        if not (started or (fresh and found)):
            return ReuseState()
        old = ReuseStatus(candidates=[c.ref for c in found], outcome="Checking")
    if old.outcome == "Reused" and status.get("reusedFrom"):
        return ReuseState("reused", found, old, JobReference.model_validate(status["reusedFrom"]))
    outcome = next((r.reuse for r in results if r.outcome == "Succeeded" and r.reuse), None)
    if outcome is None:
        return ReuseState("check", found, old)
    if outcome.reused_from and outcome.reason == Reason.REUSED:
        engines = [a.value for a in outcome.engines] or None
        done = old.model_copy(
            update={"outcome": "Reused", "reason": Reason.REUSED, "message": outcome.message, "engines": engines}
        )
        return ReuseState("reused", found, done, outcome.reused_from)
    missed = old.model_copy(update={"outcome": "NotReused", "reason": outcome.reason, "message": outcome.message})
    return ReuseState("check", found, missed)


def runner_candidates(candidates: list[Candidate], mount_path) -> list[ReuseCandidate]:
    """The candidates as the reuse runner gets them; ``mount_path(PVCLocation)``: where a claim's folder is."""
    out = []
    for i, c in enumerate(candidates):
        use = c.s3_use(i)
        out.append(
            ReuseCandidate(
                job=c.ref,
                work_key=c.work.key,
                inputs=c.work.inputs,
                output_uri=c.output_uri,
                output_dir=mount_path(c.output_pvc) if c.output_pvc else None,
                output_s3=use.runner() if use else None,
                artifacts=list(c.artifacts),
            )
        )
    return out


def work_record(recipe: WorkRecipe, recipe_key: str, results: Iterable[Any]) -> WorkRecord | None:
    """status.work of a Succeeded job: the inputs the quantize (or reuse) stage resolved, keyed
    here with the same function the runner used (an old runner that reports none: no record)."""
    inputs: WorkInputs | None = next((r.work for r in results if r.outcome == "Succeeded" and r.work), None)
    if inputs is None:
        return None
    return WorkRecord(key=work_key(recipe, inputs), recipe_key=recipe_key, inputs=inputs)
