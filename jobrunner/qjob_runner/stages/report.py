"""report: artifact manifest, then move everything into ``output_dir`` (manifest last)."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qjob_api.v1alpha1 import Artifact

from ..artifacts import MANIFEST, describe
from ..context import RunContext
from ..versions import gpu_info, library_versions

log = logging.getLogger("qjob_runner.report")


KINDS = {"hf": ("checkpoint", "hf"), "tensorrt_llm": ("checkpoint", "tensorrt_llm"), "onnx": ("onnx", "onnx")}


def artifact_uri(ctx: RunContext, relative: str) -> str:
    base = ctx.config.output_uri  # the operator sets pvc://<claim>/<path>; local runs use file://
    if base:
        return f"{base.rstrip('/')}/{relative}"
    return (ctx.paths.output_dir / relative).as_uri()


def public_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics without internal objects (tensors, windows) - the JSON-able part."""
    return {k: v for k, v in metrics.items() if not k.startswith("_")}


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
        "metrics": public_metrics(ctx.metrics),
        "stepSeconds": {k: round(v, 3) for k, v in ctx.step_seconds.items()},
        "resumedFromCalibrationState": ctx.resumed,
        "notes": ctx.notes,
    }


def register(ctx: RunContext, name: str, path: Path, relative: str, **extra) -> dict[str, Any]:
    size, digest, files = describe(path)
    kind, fmt = KINDS.get(name, ("engine", name))
    art = Artifact(
        kind=extra.pop("kind", kind),
        format=extra.pop("format", fmt),
        uri=artifact_uri(ctx, relative),
        size_bytes=size,
        sha256=digest,
        **extra,
    )
    ctx.artifacts.append(art)
    ctx.reporter.add_artifact(art)
    return {
        "name": name,
        "path": relative,
        "kind": art.kind,
        "format": art.format,
        "sizeBytes": size,
        "sha256": digest,
        "files": files,
        **{k: v for k, v in art.to_api().items() if k in {"architecture", "computeCapability", "tensorrtVersion"}},
    }


def run(ctx: RunContext) -> None:
    for t in ctx.background:  # e.g. the resume state still being written
        t.join()
    staging = ctx.staging
    assert staging is not None
    ctx.reporter.update(step="report", message="hashing artifacts and writing the manifest")
    entries = [register(ctx, name, path, name) for name, path in ctx.staged.items()]
    if "_engine_entry" in ctx.metrics:  # build stages register their engine folder themselves
        entries.append(ctx.metrics.pop("_engine_entry"))
    (staging.path / MANIFEST).write_text(json.dumps(manifest(ctx, entries), indent=2, default=str))
    staging.publish(last=MANIFEST)
    ctx.staging = None
    ctx.artifacts.append(Artifact(kind="manifest", format="json", uri=artifact_uri(ctx, MANIFEST)))
    ctx.reporter.update(message=f"published {len(entries)} artifacts to {ctx.paths.output_dir}")
