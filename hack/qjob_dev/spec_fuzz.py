"""Generated invalid and extreme QuantizationJobs, and what the real apiserver and the operator
make of them.

Specs come from hypothesis strategies derived from the API's pydantic models (through the schema
``qjob_api.crd`` generates from them): a valid spec with one to three fields replaced by values at,
just beyond or far outside their bounds, of the wrong type, or with characters Kubernetes refuses.
Each is created on the apiserver. A refusal must name a field. An accepted spec must be runnable:
the operator parses it, and the apiserver accepts (server-side dry run, every admission plugin)
each batch/v1 Job the operator builds from it. ``accepted_unrunnable`` lists the ones that are not.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from qjob_api import crd
from qjob_api.v1alpha1 import GROUP, NAME_MAX_LENGTH, PLURAL, VERSION, QuantizationJobSpec

#: A spec every mutation starts from (valid, with a runner summary so kwok-run pods succeed).
BASE: dict[str, Any] = {
    "model": {"huggingFace": {"repo": "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "tokenSecretRef": {"name": "hf-token"}}},
    "quantization": {"format": "fp8"},
    "calibration": {"dataset": {"configMap": {"name": "calibration", "key": "samples.jsonl"}}, "samples": 64},
    "engines": [{"architecture": "hopper"}],
    "output": {"pvc": {"claimName": "artifacts"}},
    "resources": {"cpu": "1", "memory": "4Gi"},
    "scheduling": {"podLabels": {"team": "nlp"}, "tolerations": [{"key": "gpu", "operator": "Exists"}]},
}

_ODD_STRINGS = ["", " ", "-a", "a-", "A", "a/b/c", "../x", "/abs", "a..b", "ä", "a\nb", "*", "a b", "a_b", ".", "0"]
_KEYS = st.one_of(
    st.from_regex(r"\A([a-z0-9]{1,20}\.){0,2}[a-z]{1,10}/[A-Za-z0-9][-A-Za-z0-9_.]{0,20}\Z"),
    st.text(max_size=70),
    st.sampled_from(["qjob.dev/job-name", "job-name", "controller-uid", "batch.kubernetes.io/x", "a" * 64, "-x"]),
)


def _strings(schema: dict[str, Any]) -> st.SearchStrategy:
    limit = schema.get("maxLength", 256)
    options = [
        st.sampled_from(_ODD_STRINGS),
        st.text(max_size=min(limit + 8, 300)),
        st.just("x" * limit),
        st.just("x" * (limit + 1)),
        st.just("A" * min(limit, 64)),
    ]
    if "pattern" in schema:
        valid = st.from_regex(schema["pattern"].replace("^", r"\A", 1).removesuffix("$") + r"\Z")
        options.append(valid.filter(lambda s: len(s) <= limit))
    return st.one_of(options)


def _integers(schema: dict[str, Any]) -> st.SearchStrategy:
    low, high = schema.get("minimum", -(2**31)), schema.get("maximum", 2**31)
    edges = [low, high, low - 1, high + 1, 0, -1, 2**31, 2**63 - 1, 2**63]
    return st.one_of(st.sampled_from(edges), st.integers(low - 5, high + 5))


def values(schema: dict[str, Any], depth: int = 0) -> st.SearchStrategy:
    """Extreme, invalid and some valid values for one field of the schema."""
    wrong_type = st.sampled_from([None, "text", 7, -1.5, True, [], {}])
    if "enum" in schema:
        good = st.sampled_from(schema["enum"])
        return st.one_of(good, st.sampled_from(["bogus", "", "FP8"]), wrong_type)
    kind = schema.get("type")
    if kind == "string":
        good = _strings(schema)
    elif kind == "integer":
        good = _integers(schema)
    elif kind == "number":
        good = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([0.0, -1.0, 1e308]))
    elif kind == "boolean":
        good = st.booleans()
    elif kind == "array" and depth < 3:
        items = values(schema["items"], depth + 1)
        good = st.lists(items, max_size=schema.get("maxItems", 4) + 2)
    elif kind == "object" and "properties" in schema and depth < 3:
        optional = {name: values(prop, depth + 1) for name, prop in schema["properties"].items()}
        good = st.fixed_dictionaries({}, optional=optional)
    elif kind == "object" and "additionalProperties" in schema:
        good = st.dictionaries(
            _KEYS, values(schema["additionalProperties"], depth + 1), max_size=schema.get("maxProperties", 4) + 2
        )
    else:
        good = st.just({})
    return st.one_of(good, wrong_type) if depth == 0 else good


def schema_paths(schema: dict[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], dict]]:
    """Every field of the spec, nested objects included (paths of property names)."""
    for name, prop in (schema.get("properties") or {}).items():
        yield (*path, name), prop
        if prop.get("type") == "object" and "properties" in prop:
            yield from schema_paths(prop, (*path, name))


def _put(spec: dict[str, Any], path: tuple[str, ...], value: Any) -> bool:
    node = spec
    for key in path[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            return False
    node[path[-1]] = value
    return True


@st.composite
def mutated_specs(draw: st.DrawFn) -> tuple[dict[str, Any], list[str]]:
    """A valid spec with one to three fields replaced by generated values."""
    paths = list(schema_paths(crd.spec_schema()))
    spec = copy.deepcopy(BASE)
    changed = []
    for _ in range(draw(st.integers(1, 3))):
        path, schema = draw(st.sampled_from(paths))
        if _put(spec, path, draw(values(schema))):
            changed.append("spec." + ".".join(path))
    return spec, changed


names = st.sampled_from([8, 40, NAME_MAX_LENGTH, NAME_MAX_LENGTH + 1, 253])


@dataclass
class Outcome:
    name: str
    fields: list[str]
    accepted: bool
    status: int | None = None  # the apiserver's answer to the create when refused
    message: str = ""
    names_a_field: bool = True
    runnable: bool | None = None  # accepted only: would the operator's Jobs be created?
    why: str = ""

    def brief(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, "", [])}


_FIELD = re.compile(r"\b(spec|metadata)(\.[A-Za-z\[\]0-9]+)+|\bspec\b")


def _names_a_field(body: dict[str, Any]) -> bool:
    causes = (body.get("details") or {}).get("causes") or []
    texts = [
        body.get("message") or "",
        *(c.get("field") or "" for c in causes),
        *(c.get("message", "") for c in causes),
    ]
    return any(_FIELD.search(t) for t in texts)


def probe(
    kube_api, namespace: str, spec: dict[str, Any], name: str, fields: list[str], config, keep: bool = True
) -> Outcome:
    """Apply one spec; if accepted, check the operator could run it (and leave it for the operator,
    unless ``keep`` is false)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from qjob_operator.builders import QuantizationJobRef, build_job
    from qjob_operator.plan import plan_stages

    manifest = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "QuantizationJob", "metadata": {"name": name}, "spec": spec}
    try:
        created = client.CustomObjectsApi(kube_api).create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, manifest
        )
    except ApiException as exc:
        try:
            body = json.loads(exc.body)
        except (TypeError, ValueError):
            body = {"message": str(exc.body)}
        return Outcome(name, fields, False, exc.status, body.get("message", "")[:600], _names_a_field(body))
    outcome = Outcome(name, fields, True)
    if not keep:
        client.CustomObjectsApi(kube_api).delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    try:
        parsed = QuantizationJobSpec.model_validate(created["spec"])
    except ValidationError as exc:
        outcome.runnable, outcome.why = False, f"the operator cannot parse it: {exc.errors()[0]}"
        return outcome
    ref = QuantizationJobRef.from_body(created)
    for stage in plan_stages(parsed, config):
        job = build_job(ref, parsed, stage, config)
        try:
            client.BatchV1Api(kube_api).create_namespaced_job(namespace, job, dry_run="All")
        except ApiException as exc:
            outcome.runnable = False
            outcome.why = f"stage {stage.name}: {exc.status} {json.loads(exc.body).get('message', '')[:600]}"
            return outcome
    outcome.runnable = True
    return outcome


@dataclass
class FuzzRun:
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def accepted(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.accepted]

    @property
    def accepted_unrunnable(self) -> list[Outcome]:
        return [o for o in self.accepted if not o.runnable]

    @property
    def refusals_naming_no_field(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.accepted and not o.names_a_field]

    def figures(self) -> dict[str, Any]:
        return {
            "specs": len(self.outcomes),
            "refused": len(self.outcomes) - len(self.accepted),
            "accepted": len(self.accepted),
            "accepted_unrunnable": len(self.accepted_unrunnable),
            "refusals_naming_no_field": len(self.refusals_naming_no_field),
        }


def run(kube_api, namespace: str, examples: int, config, keep: bool = True) -> FuzzRun:
    """Generate ``examples`` specs (and names, reproducibly) and probe each on the apiserver;
    accepted ones are left to the operator unless ``keep`` is false."""
    result = FuzzRun()

    @settings(
        max_examples=examples,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(mutated_specs(), names)
    def one(case: tuple[dict[str, Any], list[str]], name_length: int) -> None:
        spec, fields = case
        index = len(result.outcomes)
        name = f"f{index:05d}-".ljust(name_length, "x")[:name_length]
        result.outcomes.append(probe(kube_api, namespace, spec, name, fields, config, keep))

    one()
    return result
