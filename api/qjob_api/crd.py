"""Generates the QuantizationJob CustomResourceDefinition from the pydantic models.

``python -m qjob_api.crd > crds/qjob.dev_quantizationjobs.yaml`` writes the file the chart and
``kubectl apply -f crds/`` use; a unit test fails when the committed file drifts from the models.
Pydantic's JSON schema is turned into a Kubernetes *structural* schema: references inlined,
``Optional`` unwrapped, titles dropped, descriptions kept, CEL rules carried over.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

from . import v1alpha1

CRD_FILENAME = f"{v1alpha1.GROUP}_{v1alpha1.PLURAL}.yaml"

_DROP = {"title", "discriminator", "$defs"}
_OPTIONAL = "x-qjob-optional"  # internal marker, removed before the schema is written


def _structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    node = dict(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        # The field's own description wins over the referenced type's docstring.
        node = {**_structural(target, defs), **{k: v for k, v in node.items() if k not in _DROP}}
        return node
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"unions are not structural: {options}")
        merged = _structural(options[0], defs)
        merged = {**merged, **{k: v for k, v in node.items() if k not in _DROP and k != "default"}}
        if merged.get("type") == "object":
            merged[_OPTIONAL] = True  # an Optional[...] object: absent means "not set"
        return merged
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP or (key == "default" and value is None):
            continue
        if key == "const":
            out["enum"] = [value]
        elif key == "properties":
            out["properties"] = {name: _structural(prop, defs) for name, prop in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _structural(value, defs)
        elif key == "format" and value == "date-time":
            out["format"] = "date-time"
        elif key == "additionalProperties" and value is False:
            continue
        else:
            out[key] = value
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    if "properties" in out:
        out.setdefault("type", "object")
    return out


def _defaults_for_objects(schema: dict[str, Any]) -> dict[str, Any]:
    """Give optional sub-objects that have no required fields ``default: {}`` so the apiserver
    fills in their inner defaults (the CEL rules rely on those being present)."""
    for name, prop in schema.get("properties", {}).items():
        _defaults_for_objects(prop)
        optional = prop.pop(_OPTIONAL, False)
        if (
            prop.get("type") == "object"
            and "properties" in prop
            and not prop.get("required")
            and name not in schema.get("required", [])
            and "default" not in prop
            and not optional
        ):
            prop["default"] = {}
    if isinstance(schema.get("items"), dict):
        _defaults_for_objects(schema["items"])
    return schema


def _schema(model: type, *, mode: str) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode=mode)
    return _structural(raw, raw.get("$defs", {}))


def spec_schema() -> dict[str, Any]:
    return _defaults_for_objects(_schema(v1alpha1.QuantizationJobSpec, mode="validation"))


def status_schema() -> dict[str, Any]:
    schema = _schema(v1alpha1.QuantizationJobStatus, mode="serialization")
    _strip_defaults(schema)  # the operator writes status; defaults there only add noise
    return schema


def _strip_defaults(schema: dict[str, Any]) -> None:
    schema.pop("default", None)
    schema.pop(_OPTIONAL, None)
    for prop in schema.get("properties", {}).values():
        _strip_defaults(prop)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            _strip_defaults(schema[key])


PRINTER_COLUMNS = [
    {
        "name": "Format",
        "type": "string",
        "jsonPath": ".spec.quantization.format",
        "description": "Quantization format.",
    },
    {
        "name": "KV",
        "type": "string",
        "jsonPath": ".spec.quantization.kvCache",
        "priority": 1,
        "description": "KV cache format.",
    },
    {
        "name": "Targets",
        "type": "string",
        "jsonPath": ".status.targetArchitectures",
        "description": "Engine architectures.",
    },
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Lifecycle phase."},
    {"name": "Progress", "type": "integer", "jsonPath": ".status.progress.percent", "description": "Percent done."},
    {
        "name": "Stage",
        "type": "string",
        "jsonPath": ".status.progress.stage",
        "priority": 1,
        "description": "Stage in progress.",
    },
    {
        "name": "Reason",
        "type": "string",
        "jsonPath": ".status.reason",
        "priority": 1,
        "description": "Reason of the latest phase change.",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def build_crd() -> dict[str, Any]:
    root = {
        "type": "object",
        "description": v1alpha1.QuantizationJob.__doc__,
        "required": ["spec"],
        "x-kubernetes-validations": v1alpha1.ROOT_RULES,
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion of this object: qjob.dev/v1alpha1."},
            "kind": {"type": "string", "description": "Kind of this object: QuantizationJob."},
            "metadata": {"type": "object"},
            "spec": {**spec_schema(), "description": v1alpha1.QuantizationJobSpec.__doc__},
            "status": {**status_schema(), "description": v1alpha1.QuantizationJobStatus.__doc__},
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{v1alpha1.PLURAL}.{v1alpha1.GROUP}",
            "labels": {"app.kubernetes.io/name": "qjob-operator", "app.kubernetes.io/component": "crd"},
        },
        "spec": {
            "group": v1alpha1.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": v1alpha1.KIND,
                "listKind": f"{v1alpha1.KIND}List",
                "plural": v1alpha1.PLURAL,
                "singular": v1alpha1.SINGULAR,
                "shortNames": v1alpha1.SHORT_NAMES,
                "categories": ["all", "qjob"],
            },
            "versions": [
                {
                    "name": v1alpha1.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # no &id001 anchors: people read this file
        return True


def _str_presenter(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str_presenter)


def render() -> str:
    header = "# Generated by `python -m qjob_api.crd` from api/qjob_api/v1alpha1.py. Do not edit.\n"
    return header + yaml.dump(build_crd(), Dumper=_Dumper, sort_keys=False, width=120)


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
