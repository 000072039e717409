"""Bounded disk: every emptyDir of a runner pod has a sizeLimit, and the pod requests their sum
as ephemeral-storage, so the scheduler places it where the disk is and the kubelet evicts a pod
that outgrows it instead of letting it fill a shared GPU node's disk. Pure functions only.

The scratch volume (/var/cache/qjob) holds what a pod downloads or stages locally: the model when
the pod downloads it itself (no fetch stage), and an S3 output's artifacts before the upload. Its
size comes from ``spec.resources.scratchStorage``, else from the model's weight bytes when the
model stage reported them (status.modelSize), else the operator's ``runner.scratchSize``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qjob_api.capabilities import ExportFormat
from qjob_api.v1alpha1 import QuantizationJobSpec, quantity_to_mib

from .config import OperatorConfig
from .plan import MODEL_STAGES, REUSE_STAGE, Stage

MiB = 1 << 20
#: Hugging Face metadata, tokenizer and compile caches, logs.
HEADROOM = 2048 * MiB


@dataclass(frozen=True)
class ScratchPlan:
    scratch_bytes: int  # the /var/cache/qjob emptyDir
    tmp_bytes: int  # the /tmp emptyDir

    @property
    def request_bytes(self) -> int:
        return self.scratch_bytes + self.tmp_bytes


def quantity(size: int) -> str:
    return f"{math.ceil(size / MiB)}Mi"


def staged_output_bytes(spec: QuantizationJobSpec, stage: Stage, model_bytes: int) -> int:
    """An upper estimate of what a stage stages before uploading to S3: each export format is at
    most one copy of the unquantized weights (ONNX of an encoder in float32: two); a build stage
    also holds the quantize stage's output it downloaded and its engine."""
    exported = sum(2 * model_bytes if f == ExportFormat.ONNX else model_bytes for f in spec.export.formats)
    return exported + model_bytes if stage.architecture else exported


def scratch_plan(spec: QuantizationJobSpec, stage: Stage, config: OperatorConfig) -> ScratchPlan:
    tmp = quantity_to_mib(config.runner.tmp_size) * MiB
    if stage.name == REUSE_STAGE:  # an S3 side stages the earlier job's artifacts here (their sizes are known)
        local = spec.output.s3 is None and all(c.output_s3 is None for c in stage.candidates)
        staged = max((sum(a.size_bytes or 0 for a in c.artifacts) for c in stage.candidates), default=0)
        return ScratchPlan(HEADROOM + (0 if local else staged), tmp)
    if stage.name in MODEL_STAGES:  # fetch writes to the cache PVC; inspect reads headers only
        return ScratchPlan(HEADROOM, tmp)
    if spec.resources.scratch_storage:
        return ScratchPlan(quantity_to_mib(spec.resources.scratch_storage) * MiB, tmp)
    downloads = not spec.model.pvc and stage.cache is None
    if not downloads and not spec.output.s3:
        return ScratchPlan(HEADROOM, tmp)  # model and artifacts live on PVCs
    if not downloads and stage.model_bytes is not None:
        return ScratchPlan(HEADROOM + staged_output_bytes(spec, stage, stage.model_bytes), tmp)
    return ScratchPlan(quantity_to_mib(config.runner.scratch_size) * MiB, tmp)
