"""The work key: what identifies the artifacts a QuantizationJob produces.

Two parts, because the spec alone does not say what the work runs on:

* the **recipe** (``recipe_of``): what the spec asks for of the checkpoint — the model's source
  (without the revision it names), the quantization, the calibration settings, export, serving
  runtimes and evaluation (gate included, so a reused job's gate verdict is its own). Not in it:
  where the work runs (resources, scheduling), where it is written (output), retries, reuse
  itself, and the engines: each engine is reused on its own when its target (architecture, batch,
  sequence length, optimization level) equals the one asked for; the TensorRT version that built
  it is among the key's libraries. The operator indexes Succeeded jobs by ``recipe_key``.
* the **inputs** (``WorkInputs``), resolved at run time by the runner: the model revision (the
  Hugging Face commit a branch points to, the S3 objects' ETags, a PVC folder's file hashes), a
  digest of the calibration texts, and the versions of the libraries that shape the artifacts.

``work_key(recipe, inputs)`` is the one function both sides use: the runner writes it into
``manifest.json`` and its result, the operator into ``status.work`` of a finished job, and the
reuse stage compares a new job's key with the earlier job's before reusing anything.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from pydantic import Field

from .capabilities import ModelTask
from .v1alpha1 import (
    APIModel,
    EvaluationSpec,
    ExportSpec,
    QuantizationJobSpec,
    QuantizationSpec,
    ServingSpec,
    WorkInputs,
)

#: Key format: a change to what goes into the key changes this, so old keys never match new ones.
WORK_KEY_VERSION = 1

#: Libraries whose versions are part of the key: they write the checkpoints and build the engines.
#: (The runner's own code counts as `qjob-operator`, the distribution it ships in.)
WORK_LIBRARIES = (
    "qjob-operator",
    "nvidia-modelopt",
    "torch",
    "transformers",
    "accelerate",
    "safetensors",
    "onnx",
    "onnxscript",
    "tensorrt",
    "tensorrt-cu12",
    "tensorrt-cu13",
    "tensorrt-llm",
    "tensorrt_llm",
    "cuda",
)


class RecipeCalibration(APIModel):
    """Calibration as asked for; the texts themselves are an input (``WorkInputs.calibration_data``)."""

    samples: int
    sequence_length: int
    batch_size: int
    layerwise: bool


class WorkRecipe(APIModel):
    """Everything in a spec that shapes the checkpoint (engines are matched one by one)."""

    model_source: str = Field(description="hf:<repo>, s3:<endpoint>/<bucket>/<prefix> or pvc:<claim>/<path>.")
    task: ModelTask
    trust_remote_code: bool
    dtype: str
    quantization: QuantizationSpec
    calibration: RecipeCalibration
    export: ExportSpec
    serving: ServingSpec
    evaluation: EvaluationSpec


def model_source(spec: QuantizationJobSpec) -> str:
    """Where the model comes from, without the revision (the inputs carry the resolved one)."""
    m = spec.model
    if m.hugging_face:
        return f"hf:{m.hugging_face.repo}"
    if m.s3:
        return f"s3:{m.s3.endpoint or 'aws:' + m.s3.region}/{m.s3.bucket}/{m.s3.prefix.strip('/')}"
    assert m.pvc is not None
    return f"pvc:{m.pvc.claim_name}/{m.pvc.path.strip('/')}"


def recipe_of(spec: QuantizationJobSpec) -> WorkRecipe:
    cal = spec.calibration
    return WorkRecipe(
        model_source=model_source(spec),
        task=spec.model.task,
        trust_remote_code=spec.model.trust_remote_code,
        dtype=spec.model.dtype,
        quantization=spec.quantization,
        calibration=RecipeCalibration(
            samples=cal.samples, sequence_length=cal.sequence_length, batch_size=cal.batch_size, layerwise=cal.layerwise
        ),
        export=spec.export,
        serving=spec.serving,
        evaluation=spec.evaluation,
    )


def _digest(document: Mapping[str, Any]) -> str:
    # Defaults included (exclude_none only): a field that gains a default keeps the key of specs
    # that spelled the same value out.
    return "sha256:" + hashlib.sha256(json.dumps(document, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def recipe_key(recipe: WorkRecipe) -> str:
    return _digest({"v": WORK_KEY_VERSION, "recipe": recipe.to_api()})


def work_versions(versions: Mapping[str, str]) -> dict[str, str]:
    """The part of a runner's library versions that goes into the key."""
    return {name: versions[name] for name in WORK_LIBRARIES if name in versions}


def work_key(recipe: WorkRecipe, inputs: WorkInputs) -> str:
    fixed = inputs.model_copy(update={"versions": work_versions(inputs.versions)})
    return _digest({"v": WORK_KEY_VERSION, "recipe": recipe.to_api(), "inputs": fixed.to_api()})
