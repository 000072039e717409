"""The API model, the capability matrix and the generated CRD."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from qjob_api import crd
from qjob_api.capabilities import (
    FORMAT_ARCHITECTURES,
    GPUArchitecture,
    KVCacheFormat,
    QuantFormat,
    architecture_of,
    unsupported_reasons,
)
from qjob_api.runner import ExitCode, RunnerResult
from qjob_api.v1alpha1 import Artifact, PVCLocation, QuantizationJobSpec, quantity_to_mib

ROOT = Path(__file__).resolve().parents[2]


def test_committed_crd_matches_models():
    committed = (ROOT / "crds" / crd.CRD_FILENAME).read_text()
    assert committed == crd.render(), "crds/ drifted from api/qjob_api: run `make crds`"


def _schema():
    return crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _walk(schema, path=""):
    yield path, schema
    for name, prop in schema.get("properties", {}).items():
        yield from _walk(prop, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


def test_every_field_has_a_description_for_kubectl_explain():
    # Scalar list items and map values are described by their field.
    missing = [
        p
        for p, s in _walk(_schema())
        if p
        and not p.startswith(".metadata")
        and not s.get("description")
        and not (p.endswith(("[]", "{}")) and s.get("type") != "object")
    ]
    assert missing == []


def test_schema_is_structural():
    for path, node in _walk(_schema()):
        for banned in ("anyOf", "oneOf", "allOf", "$ref", "title", "x-qjob-optional"):
            assert banned not in node, f"{path} has {banned}"
        if path:
            typed = ("type", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string")
            assert any(node.get(k) for k in typed), path


def test_matrix_rule_message_names_blackwell():
    rules = _schema()["properties"]["spec"]["x-kubernetes-validations"]
    nvfp4 = [r for r in rules if "'nvfp4'" in r["rule"] and "format" in r["rule"]]
    assert nvfp4 and nvfp4[0]["message"].startswith("NVFP4 needs Blackwell")


def test_defaults_are_filled_in(spec):
    assert spec.calibration.sequence_length == 512
    assert spec.export.formats == ["hf"]
    assert spec.run_policy.backoff_limit == 2
    assert spec.quantization.kv_cache == KVCacheFormat.NONE


@pytest.mark.parametrize(
    "fmt, arch, ok",
    [
        (QuantFormat.NVFP4, GPUArchitecture.HOPPER, False),
        (QuantFormat.NVFP4, GPUArchitecture.BLACKWELL, True),
        (QuantFormat.W4A8_AWQ, GPUArchitecture.BLACKWELL, False),
        (QuantFormat.INT4_AWQ, GPUArchitecture.ADA, True),
        (QuantFormat.FP8, GPUArchitecture.AMPERE, False),
        (QuantFormat.FP8, GPUArchitecture.ADA, True),
    ],
)
def test_capability_matrix(fmt, arch, ok):
    assert (arch in FORMAT_ARCHITECTURES[fmt]) is ok
    assert (unsupported_reasons(fmt, KVCacheFormat.NONE, [arch]) == []) is ok


def test_unsupported_reason_is_readable():
    [reason] = unsupported_reasons(QuantFormat.NVFP4, KVCacheFormat.NONE, [GPUArchitecture.HOPPER])
    assert reason == "NVFP4 needs Blackwell; it cannot target hopper"


def test_architecture_of_compute_capability():
    assert architecture_of(9, 0) == GPUArchitecture.HOPPER
    assert architecture_of(8, 9) == GPUArchitecture.ADA
    assert architecture_of(10, 3) == GPUArchitecture.BLACKWELL
    assert architecture_of(12, 0) == GPUArchitecture.BLACKWELL_RTX
    assert architecture_of(12, 1) == GPUArchitecture.BLACKWELL_RTX
    assert architecture_of(7, 5) is None


def test_quantity_to_mib():
    assert quantity_to_mib("40Gi") == 40960
    assert quantity_to_mib("81559Mi") == 81559
    assert quantity_to_mib("80G") == 76293
    with pytest.raises(ValueError):
        quantity_to_mib("lots")


def test_pvc_path_must_stay_inside_the_volume():
    with pytest.raises(ValidationError, match="relative to the volume root"):
        PVCLocation(claim_name="models", path="../etc")
    assert PVCLocation(claim_name="models", path="llama/8b").path == "llama/8b"


def test_termination_message_fits_the_kubernetes_limit():
    artifacts = [
        Artifact(kind="engine", format="tensorrt", uri=f"pvc://out/{'x' * 200}/{i}", sha256="a" * 64) for i in range(40)
    ]
    result = RunnerResult(
        outcome="Failed",
        stage="quantize",
        exit_code=ExitCode.INVALID_INPUT,
        message="m" * 9000,
        artifacts=artifacts,
        versions={f"lib{i}": "1.0" for i in range(50)},
    )
    text = result.termination_message()
    assert len(text.encode()) <= 4096
    assert '"exitCode":3' in text


def test_example_like_spec_round_trips(spec):
    again = QuantizationJobSpec.model_validate(yaml.safe_load(yaml.safe_dump(spec.to_api())))
    assert again == spec
