"""Bounded disk: every emptyDir has a sizeLimit, pods request ephemeral-storage for them, sized
from the model's weight bytes when the fetch stage reported them (status.modelSize)."""

from __future__ import annotations

import dataclasses

import pytest
from qjob_api.v1alpha1 import ModelSize, QuantizationJobSpec
from qjob_operator.builders import QuantizationJobRef, build_job
from qjob_operator.config import OperatorConfig
from qjob_operator.plan import plan_stages

REF = QuantizationJobRef("llama", "ml", "uid-1")
GiB = 1 << 30
S3_OUT = {"s3": {"bucket": "artifacts"}}


def _mib(quantity: str) -> int:
    assert quantity.endswith(("Mi", "Gi")), quantity
    return int(quantity[:-2]) * (1024 if quantity.endswith("Gi") else 1)


def _disk(job) -> tuple[dict[str, int], int]:
    """(emptyDir name -> sizeLimit MiB for disk-backed ones, ephemeral-storage request MiB)."""
    pod = job["spec"]["template"]["spec"]
    limits = {}
    for v in pod["volumes"]:
        if "emptyDir" in v:
            assert "sizeLimit" in v["emptyDir"], f"emptyDir {v['name']} has no sizeLimit"
            if v["emptyDir"].get("medium") != "Memory":
                limits[v["name"]] = _mib(v["emptyDir"]["sizeLimit"])
    return limits, _mib(pod["containers"][0]["resources"]["requests"]["ephemeral-storage"])


@pytest.mark.parametrize(
    "model, output, cache",
    [
        ({"huggingFace": {"repo": "org/m"}}, {"pvc": {"claimName": "a"}}, ""),
        ({"huggingFace": {"repo": "org/m"}}, S3_OUT, "model-cache"),
        ({"pvc": {"claimName": "models"}}, S3_OUT, ""),
        ({"s3": {"bucket": "models"}}, {"pvc": {"claimName": "a"}}, "model-cache"),
    ],
)
def test_every_emptydir_is_bounded_and_requested(spec_dict, model, output, cache):
    spec_dict.update(model=model, output=output)
    config = OperatorConfig.model_validate({"modelCache": {"claimName": cache}})
    spec = QuantizationJobSpec.model_validate(spec_dict)
    for stage in plan_stages(spec, config):
        limits, request = _disk(build_job(REF, spec, stage, config))
        assert set(limits) == {"cache", "tmp"} and request == sum(limits.values()), stage.name


def test_pvc_model_and_output_need_headroom_only(spec_dict, config):
    spec_dict["model"] = {"pvc": {"claimName": "models"}}
    spec = QuantizationJobSpec.model_validate(spec_dict)
    limits, _ = _disk(build_job(REF, spec, plan_stages(spec, config)[0], config))
    assert limits == {"cache": 2048, "tmp": 4096}


def test_unknown_model_size_uses_the_operator_default(spec_dict):
    spec = QuantizationJobSpec.model_validate(spec_dict)  # Hugging Face model, no cache: the pod downloads
    config = OperatorConfig.model_validate({"runner": {"scratchSize": "300Gi"}})
    limits, _ = _disk(build_job(REF, spec, plan_stages(spec, config)[0], config))
    assert limits["cache"] == 300 * 1024


def test_s3_output_staging_is_sized_from_the_fetched_weight_bytes(spec_dict):
    spec_dict["output"] = S3_OUT
    spec_dict["export"] = {"formats": ["hf", "tensorrt_llm"]}
    config = OperatorConfig.model_validate({"modelCache": {"claimName": "model-cache"}})
    spec = QuantizationJobSpec.model_validate(spec_dict)
    assert [s.model_bytes for s in plan_stages(spec, config)] == [None, None, None]  # nothing reported yet
    fetch, quantize, build = plan_stages(
        spec, config, model_size=ModelSize(weight_bytes=16 * GiB, parameters=8 * 10**9, dtype="BF16")
    )
    assert fetch.model_bytes is None  # the fetch stage writes to the cache PVC, sized by itself
    assert quantize.model_bytes == build.model_bytes == 16 * GiB
    q_limits, q_request = _disk(build_job(REF, spec, quantize, config))
    assert q_limits["cache"] == 2048 + 2 * 16 * 1024  # two export formats, each at most one copy
    b_limits, _ = _disk(build_job(REF, spec, build, config))
    assert b_limits["cache"] == 2048 + 3 * 16 * 1024  # the downloaded exports plus the engine
    assert q_request == q_limits["cache"] + q_limits["tmp"]
    # An explicit size wins.
    explicit = QuantizationJobSpec.model_validate({**spec_dict, "resources": {"scratchStorage": "500Gi"}})
    limits, _ = _disk(build_job(REF, explicit, dataclasses.replace(quantize), config))
    assert limits["cache"] == 500 * 1024
