"""report: artifact manifest, then move everything into ``output_dir`` (manifest last); with an
object-store output, upload it there first (manifest last)."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from qjob_api.v1alpha1 import Artifact

from .. import storage, work
from ..artifacts import MANIFEST
from ..context import RunContext
from ..registration import artifact_uri, register
from ..versions import gpu_info, library_versions

log = logging.getLogger("qjob_runner.report")


def manifest(ctx: RunContext, entries: list[dict[str, Any]]) -> dict[str, Any]:
    cfg = ctx.config
    return {
        "apiVersion": "qjob.dev/manifest/v1",
        "job": cfg.job,
        "stage": cfg.stage,
        "createdAt": datetime.now(UTC).isoformat(),
        "complete": True,
        "artifacts": entries,
        "versions": library_versions(),
        "gpus": gpu_info(),
        "effectiveConfig": {
            "runner": cfg.model_dump(mode="json", by_alias=True),
            "modelopt": ctx.quant_config,
            "resolvedModelDir": str(ctx.paths.model_dir) if ctx.paths.model_dir else None,
        },
        "quality": ctx.quality.to_api() if ctx.quality else None,
        "metrics": ctx.metrics,
        "stepSeconds": {k: round(v, 3) for k, v in ctx.step_seconds.items()},
        "resumedFromCalibrationState": ctx.resumed,
        "notes": ctx.notes,
        "work": work.record(ctx),
    }


def run(ctx: RunContext) -> None:
    for t in ctx.background:  # e.g. the resume state still being written
        if hasattr(t, "discard"):
            t.discard()  # a resume state kept for a failure: this run succeeds
        t.join()
    staging = ctx.staging
    assert staging is not None
    ctx.reporter.update(step="report", message="hashing artifacts and writing the manifest")
    if ctx.config.work_recipe is not None and not ctx.config.is_build:
        ctx.work = work.inputs_after_run(ctx)  # the work key of what was just made
    entries = [register(ctx, name, path, name) for name, path in ctx.staged.items()]
    if ctx.engine_entry is not None:  # the build step registers its engine folder itself
        entries.append(ctx.engine_entry)
    (staging.path / MANIFEST).write_text(json.dumps(manifest(ctx, entries), indent=2, default=str))
    relative = staging.destination.relative_to(ctx.paths.output_dir).as_posix()
    relative = "" if relative == "." else relative  # engines/<arch> for build stages
    if ctx.config.output_s3 is not None:
        storage.upload_stage(ctx, staging.path, relative)
    staging.publish(last=MANIFEST)
    ctx.staging = None
    manifest_uri = artifact_uri(ctx, f"{relative}/{MANIFEST}" if relative else MANIFEST)
    ctx.artifacts.append(Artifact(kind="manifest", format="json", uri=manifest_uri))
    for art in ctx.artifacts:  # status lists artifacts only once they are complete where users read them
        ctx.reporter.add_artifact(art)
    ctx.reporter.update(message=f"published {len(entries)} artifacts to {ctx.paths.output_dir}")
