"""The reuse stage (no GPU): an earlier identical job's artifacts, checked and copied.

The operator passes the Succeeded jobs of the namespace whose recipe matches this job's
(``RunnerConfig.reuse``). This stage resolves this job's inputs without downloading the model
(``work.resolve_model_revision``, the calibration texts, its own library versions), computes the
work key and, for the newest candidate with the same key, checks that candidate's output where it
lies (its PVC folder, mounted read-only, or its S3 prefix): every ``manifest.json`` its status
lists exists, each file the manifests list has the sha256 they record, and each artifact's digest
equals the one in the candidate's status. Then the files are linked (same filesystem) or copied
into this job's output, with manifests that name this job and the one it reused, uploaded or
renamed into place manifest last. Any mismatch leaves this job's output untouched and the stage
reports why (``ReuseOutcome``); the operator then runs the normal stages.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qjob_api.reasons import Reason
from qjob_api.runner import ReuseCandidate, ReuseOutcome
from qjob_api.v1alpha1 import EngineTarget, Quality, WorkInputs
from qjob_api.work import work_key

from . import storage, work
from .artifacts import MANIFEST, FileHashes
from .context import RunContext
from .errors import InvalidConfig, InvalidInput, RunnerError
from .registration import artifact_uri
from .steps import data

log = logging.getLogger("qjob_runner.reuse")


class NotReusable(Exception):  # noqa: N818 - named after what it says, like the runner's other errors
    def __init__(self, reason: Reason, message: str):
        super().__init__(message)
        self.reason = reason


ENGINES = "engines/"
#: (path under the output root, size, sha256) of one file a manifest lists.
Listed = tuple[str, int, str]


def _relative(uri: str, base: str) -> str | None:
    base = base.rstrip("/")
    return uri[len(base) + 1 :] if uri.startswith(base + "/") else None


def manifest_paths(candidate: ReuseCandidate) -> list[str]:
    """The manifests the candidate's status lists (quantize stage and one per engine), under its output."""
    paths = [_relative(a.uri, candidate.output_uri) for a in candidate.artifacts if a.kind == "manifest"]
    if not paths or None in paths:
        raise NotReusable(Reason.REUSE_ARTIFACT_MISSING, f"its status lists no manifest under {candidate.output_uri}")
    return paths  # type: ignore[return-value]


def listed_files(entry: dict[str, Any], is_file: Callable[[str], bool]) -> list[Listed]:
    """The files a manifest entry vouches for. An entry is a folder (``files`` relative to it) or one file."""
    root = entry["path"]
    files = entry.get("files") or []
    if len(files) == 1 and is_file(root):
        return [(root, int(files[0]["size"]), files[0]["sha256"])]
    return [(posixpath.join(root, f["path"]), int(f["size"]), f["sha256"]) for f in files]


def folder_digest(entry: dict[str, Any], listed: list[Listed]) -> str:
    """The artifact digest as ``artifacts.describe`` computes it, from the manifest's own file list."""
    import hashlib

    files = entry.get("files") or []
    if len(listed) == 1 and listed[0][0] == entry["path"]:
        return listed[0][2]
    return hashlib.sha256("".join(f"{f['path']} {f['sha256']}\n" for f in files).encode()).hexdigest()


def engine_of(doc: dict[str, Any]) -> EngineTarget | None:
    """The engine target a build stage's manifest was made for (its effective runner config)."""
    engine = ((doc.get("effectiveConfig") or {}).get("runner") or {}).get("engine")
    return EngineTarget.model_validate(engine) if engine else None


def chosen_manifests(root: Path, candidate: ReuseCandidate, wanted: list[EngineTarget]) -> list[tuple[str, dict]]:
    """The checkpoint's manifest (required), and those of the candidate's engines whose target this
    job asks for (any other engine is built again)."""
    paths = manifest_paths(candidate)
    if MANIFEST not in paths:
        raise NotReusable(Reason.REUSE_ARTIFACT_MISSING, f"its status lists no {candidate.output_uri}/{MANIFEST}")
    chosen = []
    for path in paths:
        try:
            doc = json.loads((root / path).read_text())
        except (OSError, ValueError):
            if path == MANIFEST:
                raise NotReusable(
                    Reason.REUSE_ARTIFACT_MISSING, f"{candidate.output_uri}/{path} is gone or unreadable"
                ) from None
            continue
        if path == MANIFEST or engine_of(doc) in wanted:
            chosen.append((path, doc))
    return chosen


Checked = list[tuple[str, dict[str, Any], list[Listed]]]


def verify(root: Path, candidate: ReuseCandidate, wanted: list[EngineTarget]) -> Checked:
    """Check a candidate's output in ``root`` (its folder, or a download of it): returns each
    chosen manifest (path, document, files) once every file it lists matches; raises NotReusable."""
    status_digest = {
        rel: a.sha256
        for a in candidate.artifacts
        if a.kind != "manifest" and (rel := _relative(a.uri, candidate.output_uri))
    }
    checked: Checked = []
    covered: set[str] = set()
    for path, doc in chosen_manifests(root, candidate, wanted):
        files: list[Listed] = []
        for entry in doc.get("artifacts") or []:
            listed = listed_files(entry, lambda p: (root / p).is_file())
            digest = folder_digest(entry, listed)
            if digest != entry.get("sha256") or status_digest.get(entry["path"], digest) != digest:
                raise NotReusable(
                    Reason.REUSE_ARTIFACT_CHANGED,
                    f"{entry['path']}: {path} and the job's status disagree about its sha256",
                )
            files += listed
            covered.add(entry["path"])
        checked.append((path, doc, files))
    checkpoint = {rel for rel in status_digest if not rel.startswith(ENGINES)}
    if missing := sorted(checkpoint - covered):
        raise NotReusable(Reason.REUSE_ARTIFACT_MISSING, f"status lists {missing} but {MANIFEST} does not")
    every = [f for _, _, files in checked for f in files]
    absent = [rel for rel, size, _ in every if not (root / rel).is_file() or (root / rel).stat().st_size != size]
    if absent:
        raise NotReusable(Reason.REUSE_ARTIFACT_MISSING, f"{len(absent)} file(s) are gone or resized, e.g. {absent[0]}")
    hashes = FileHashes()
    try:
        actual = hashes.map([root / rel for rel, _, _ in every])
    finally:
        hashes.close()
    for (rel, _, expected), got in zip(every, actual, strict=True):
        if got != expected:
            raise NotReusable(
                Reason.REUSE_ARTIFACT_CHANGED,
                f"{rel} no longer matches its sha256 ({got[:12]}... vs {expected[:12]}...)",
            )
    return checked


def download(ctx: RunContext, candidate: ReuseCandidate, into: Path, wanted: list[EngineTarget]) -> Path:
    """The files of an S3 candidate's chosen manifests, downloaded into ``into`` (then verified there)."""
    loc = candidate.output_s3
    assert loc is not None
    store = storage.ObjectStore(loc)
    base = storage.join_key(loc.prefix)
    try:
        objects = {storage.relative_key(o["Key"], base): o for o in store.list(loc.prefix)}
        manifests = [m for m in manifest_paths(candidate) if m in objects]
        store.download([objects[m] for m in manifests], loc.prefix, into)
        wanted_files = set()
        for _, doc in chosen_manifests(into, candidate, wanted):
            for entry in doc.get("artifacts") or []:
                wanted_files |= {rel for rel, _, _ in listed_files(entry, lambda p: p in objects)}
        if absent := sorted(wanted_files - set(objects)):
            raise NotReusable(Reason.REUSE_ARTIFACT_MISSING, f"{len(absent)} object(s) are gone, e.g. {absent[0]}")
        meter = storage.RateMeter(storage.message_only(ctx), f"downloading {candidate.output_uri} to check it")
        store.download([objects[k] for k in sorted(wanted_files)], loc.prefix, into, progress=meter)
    except (InvalidInput, InvalidConfig) as exc:  # its bucket is gone or no longer readable: not reusable
        raise NotReusable(Reason.REUSE_ARTIFACT_MISSING, str(exc)) from None
    return into


def _place(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)  # same filesystem: no copy (published files are replaced, never rewritten)
    except OSError:
        shutil.copy2(source, target)


def publish(
    ctx: RunContext, candidate: ReuseCandidate, root: Path, checked: Checked, key_record: dict[str, Any]
) -> None:
    """The checked files into this job's output, each manifest naming this job and the one reused."""
    staging = ctx.staging
    assert staging is not None
    now = datetime.now(UTC).isoformat()
    reused_from = {**candidate.job.to_api(), "uri": candidate.output_uri}
    for path, doc, files in checked:
        for rel, _, _ in files:
            _place(root / rel, staging.path / rel)
        mine = {**doc, "job": ctx.config.job, "createdAt": now, "reusedFrom": reused_from, "work": key_record}
        (staging.path / path).parent.mkdir(parents=True, exist_ok=True)
        (staging.path / path).write_text(json.dumps(mine, indent=2, default=str))
    if ctx.config.output_s3 is not None:
        storage.upload_stage(ctx, staging.path, "")
    staging.publish(last=MANIFEST)
    ctx.staging = None
    taken = {path for path, _, _ in checked} | {e["path"] for _, doc, _ in checked for e in doc.get("artifacts") or []}
    ctx.artifacts = [
        a.model_copy(update={"uri": artifact_uri(ctx, rel)})
        for a in candidate.artifacts
        if (rel := _relative(a.uri, candidate.output_uri)) in taken
    ]
    top = next((doc for path, doc, _ in checked if path == MANIFEST), None)
    if top and top.get("quality"):
        ctx.quality = Quality.model_validate(top["quality"])
    for art in ctx.artifacts:
        ctx.reporter.add_artifact(art)


def what_changed(before: WorkInputs | None, now: WorkInputs) -> str:
    if before is None:
        return "its work key differs"
    changes = []
    if before.model_revision != now.model_revision:
        changes.append(f"model revision {before.model_revision} -> {now.model_revision}")
    if before.calibration_data != now.calibration_data:
        changes.append("the calibration texts differ")
    old, new = work.work_versions(before.versions), work.work_versions(now.versions)
    changes += [
        f"{lib} {old.get(lib, 'absent')} -> {new.get(lib, 'absent')}"
        for lib in sorted(set(old) | set(new))
        if old.get(lib) != new.get(lib)
    ]
    return "; ".join(changes) or "its work key differs"


def resolve_inputs(ctx: RunContext) -> WorkInputs:
    calib, held_out, _ = data.select_texts(ctx)
    return WorkInputs(
        model_revision=work.resolve_model_revision(ctx),
        calibration_data=data.texts_digest(calib, held_out),
        versions=work.own_versions(),
    )


def run(ctx: RunContext) -> None:
    cfg = ctx.config
    if cfg.work_recipe is None or cfg.reuse is None:
        raise InvalidConfig(
            "the reuse stage got no work recipe or candidates", "run the operator and the runner of the same version"
        )
    ctx.reporter.update(message="resolving this job's model revision, calibration texts and library versions")
    try:
        ctx.work = resolve_inputs(ctx)
    except RunnerError as exc:
        # Reuse only saves work: a job whose inputs cannot be resolved here runs its stages,
        # which read the model as they always do (and fail there, with their reason, if they must).
        ctx.reuse = ReuseOutcome(reason=Reason.REUSE_INPUTS_UNRESOLVED, message=f"{exc.problem}: the job runs")
        ctx.reporter.update(message=f"not reused ({ctx.reuse.message})", percent=100)
        return
    key = work_key(cfg.work_recipe, ctx.work)
    misses: list[tuple[Reason, str]] = []
    for candidate in cfg.reuse.candidates:
        name = f"{candidate.job.namespace}/{candidate.job.name}"
        if candidate.work_key != key:
            misses.append((Reason.REUSE_INPUTS_CHANGED, f"{name}: {what_changed(candidate.inputs, ctx.work)}"))
            continue
        ctx.reporter.update(message=f"checking the artifacts of {name} at {candidate.output_uri}")
        scratch = ctx.paths.work_dir / f"reuse-{candidate.job.uid}"
        wanted = cfg.reuse.engines
        try:
            root = (
                download(ctx, candidate, scratch, wanted) if candidate.output_s3 else Path(candidate.output_dir or "")
            )
            if not root.is_dir():
                raise NotReusable(Reason.REUSE_ARTIFACT_MISSING, f"{candidate.output_uri} is gone")
            checked = verify(root, candidate, wanted)
            publish(ctx, candidate, root, checked, work.record(ctx) or {})
        except NotReusable as exc:
            log.info("not reusing %s: %s", name, exc)
            misses.append((exc.reason, f"{name}: {exc}"))
            continue
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        engines = [e.architecture for path, doc, _ in checked if path != MANIFEST and (e := engine_of(doc))]
        built = [e.architecture.value for e in wanted if e.architecture not in engines]
        ctx.reuse = ReuseOutcome(
            reused_from=candidate.job,
            reason=Reason.REUSED,
            message=f"{len(ctx.artifacts)} artifact(s) of {name} checked (sha256) and copied to {cfg.output_uri}"
            + (f"; engines to build: {', '.join(built)}" if built else ""),
            engines=engines,
        )
        ctx.reporter.update(message=ctx.reuse.message, percent=100)
        return
    reason, _ = misses[0] if misses else (Reason.REUSE_ARTIFACT_MISSING, "")
    ctx.reuse = ReuseOutcome(reason=reason, message="; ".join(m for _, m in misses) or "no earlier job to check")
    ctx.reporter.update(message=f"not reused ({ctx.reuse.message}): the job runs", percent=100)
