"""Every field of the spec is bounded, so a QuantizationJob the apiserver accepts always fits where
it goes: the RunnerConfig in one environment variable (execve refuses a string over 128 KiB), and
kopf's annotations on the object itself (256 KiB for all annotations together)."""

from __future__ import annotations

import json

import pytest
from qjob_api import crd
from qjob_api.runner import CONFIG_ENV
from qjob_api.v1alpha1 import QUALIFIED_NAME_MAX_LENGTH, QuantizationJobSpec
from qjob_operator.builders import QuantizationJobRef, build_job
from qjob_operator.config import OperatorConfig
from qjob_operator.plan import plan_stages

#: Worst case for one character in JSON: a \\uXXXX escape.
ESCAPED = 6
#: Spec and RunnerConfig ceilings this test holds the API to. The bound counts every alternative
#: (model from a PVC, S3 and the Hub at once) although the CRD allows one: the real worst case is lower.
SPEC_LIMIT = 128 * 1024
ARG_MAX_STRLEN = 128 * 1024


def json_bound(schema: dict, path: str = "spec") -> int:
    """Largest JSON encoding (bytes) of any value the schema accepts; raises naming an unbounded field."""
    if "enum" in schema:
        return max(len(json.dumps(v)) for v in schema["enum"])
    kind = schema.get("type") or ("string" if schema.get("x-kubernetes-int-or-string") else None)
    if kind == "string":
        if "maxLength" not in schema:
            raise AssertionError(f"{path} has no maxLength")
        return 2 + schema["maxLength"] * (1 if "pattern" in schema else ESCAPED)
    if kind in ("integer", "number"):
        return 24
    if kind == "boolean":
        return 5
    if kind == "array":
        if "maxItems" not in schema:
            raise AssertionError(f"{path} has no maxItems")
        return 2 + schema["maxItems"] * (json_bound(schema["items"], f"{path}[]") + 1)
    if kind == "object" and "properties" in schema:
        return 2 + sum(len(n) + 4 + json_bound(p, f"{path}.{n}") for n, p in schema["properties"].items())
    if kind == "object" and "additionalProperties" in schema:
        if "maxProperties" not in schema:
            raise AssertionError(f"{path} has no maxProperties")
        value = json_bound(schema["additionalProperties"], f"{path}.*")
        return 2 + schema["maxProperties"] * (QUALIFIED_NAME_MAX_LENGTH + 4 + value)
    raise AssertionError(f"{path}: cannot bound a {kind or 'schema without type'}")


def test_every_spec_field_is_bounded_and_the_spec_stays_small():
    assert json_bound(crd.spec_schema()) <= SPEC_LIMIT


@pytest.mark.parametrize("field", ["podLabels", "nodeSelector", "podAnnotations"])
def test_maps_refuse_keys_kubernetes_refuses(field):
    base = {
        "model": {"pvc": {"claimName": "models"}},
        "quantization": {"format": "fp8"},
        "calibration": {"dataset": {"pvc": {"claimName": "data"}}},
        "output": {"pvc": {"claimName": "out"}},
    }
    for key in ("-bad", "a" * 64, "x/" + "a" * 64, "UPPER.example.com/x", "a" * 254 + "/x", "a b"):
        with pytest.raises(ValueError):
            QuantizationJobSpec.model_validate({**base, "scheduling": {field: {key: "v"}}})
    QuantizationJobSpec.model_validate({**base, "scheduling": {field: {"example.com/team": "nlp"}}})


def test_largest_runner_config_fits_one_environment_variable():
    """A spec filled to its limits (the strings that reach the runner at their maxLength)."""
    long = "m" * 256
    spec = QuantizationJobSpec.model_validate(
        {
            "model": {"huggingFace": {"repo": "o/" + "r" * 198, "revision": "v" * 255}},
            "quantization": {"format": "fp8", "excludeModules": [long] * 64},
            "calibration": {"dataset": {"huggingFace": {"name": "d" * 200, "config": "é" * 200, "split": "s" * 200}}},
            "output": {"pvc": {"claimName": "c" * 253, "path": "é/" * 512}},
        }
    )
    config = OperatorConfig()
    ref = QuantizationJobRef("n" * 63, "s" * 63, "0" * 36)
    for stage in plan_stages(spec, config):
        env = build_job(ref, spec, stage, config)["spec"]["template"]["spec"]["containers"][0]["env"]
        value = next(e["value"] for e in env if e["name"] == CONFIG_ENV)
        assert len(value.encode()) < ARG_MAX_STRLEN
