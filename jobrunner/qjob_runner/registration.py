"""Artifact registration: a staged file or folder becomes an API ``Artifact`` (uri, size, sha256)
and a manifest entry. The report step registers the staged exports, the build step its engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qjob_api.v1alpha1 import Artifact

from .artifacts import describe
from .context import RunContext

KINDS = {"hf": ("checkpoint", "hf"), "tensorrt_llm": ("checkpoint", "tensorrt_llm"), "onnx": ("onnx", "onnx")}


def artifact_uri(ctx: RunContext, relative: str) -> str:
    base = ctx.config.output_uri  # the operator sets pvc://<claim>/<path>; local runs use file://
    if base:
        return f"{base.rstrip('/')}/{relative}"
    return (ctx.paths.output_dir / relative).as_uri()


def register(ctx: RunContext, name: str, path: Path, relative: str, **extra) -> dict[str, Any]:
    size, digest, files = describe(path, ctx.staging.hashes if ctx.staging else None)
    kind, fmt = KINDS.get(name, ("engine", name))
    art = Artifact(
        kind=extra.pop("kind", kind),
        format=extra.pop("format", fmt),
        uri=artifact_uri(ctx, relative),
        size_bytes=size,
        sha256=digest,
        runtimes=ctx.serving_targets.get(name),  # hf checkpoints: set by the serving step
        **extra,
    )
    ctx.artifacts.append(art)  # reported by the report step once published where users read them
    return {
        "name": name,
        "path": relative,
        "kind": art.kind,
        "format": art.format,
        "sizeBytes": size,
        "sha256": digest,
        "files": files,
        **{
            k: v
            for k, v in art.to_api().items()
            if k in {"architecture", "computeCapability", "tensorrtVersion", "runtimes"}
        },
    }
