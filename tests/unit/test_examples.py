"""Examples and shipped manifests, checked without a cluster.

- every `examples/*.yaml` QuantizationJob parses with the API model, uses only fields the CRD
  declares (the model ignores unknown fields and the apiserver prunes them silently, so a typo
  would otherwise pass), targets architectures that have kernels for its formats, and brings the
  PersistentVolumeClaims / ConfigMaps it references;
- `examples/invalid-nvfp4-on-hopper.yaml` is well-formed but breaks the capability matrix (the
  CRD's CEL rule refuses it; tests/integration/test_chart.py checks the apiserver's message);
- the chart's copy of the CRD equals `crds/` (run `deploy/render.sh` to refresh it);
- `deploy/qjob-operator.yaml` is structurally what the chart promises, and its operator settings
  are exactly the operator's own defaults (OperatorConfig).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from qjob_api.capabilities import (
    CUDA_ONLY_FORMATS,
    ExportFormat,
    GPUArchitecture,
    KVCacheFormat,
    ModelTask,
    QuantFormat,
    ServingRuntime,
    unsupported_reasons,
)
from qjob_api.v1alpha1 import API_VERSION, KIND, QuantizationJob

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
CHART = ROOT / "charts" / "qjob-operator"
DEPLOY = ROOT / "deploy" / "qjob-operator.yaml"
CRD = ROOT / "crds" / "qjob.dev_quantizationjobs.yaml"

INVALID_PREFIX = "invalid-"
#: The claims the examples share: applied once, so deleting one example deletes no one's artifacts.
STORAGE = EXAMPLES / "storage.yaml"
ALL_EXAMPLES = sorted(p for p in EXAMPLES.glob("*.yaml") if p != STORAGE)
VALID_EXAMPLES = [p for p in ALL_EXAMPLES if not p.name.startswith(INVALID_PREFIX)]
INVALID_EXAMPLES = [p for p in ALL_EXAMPLES if p.name.startswith(INVALID_PREFIX)]
#: Kinds an example may bring besides its QuantizationJob (its own ConfigMap, never a shared claim).
COMPANION_KINDS = {("v1", "ConfigMap")}


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def qjobs(path: Path) -> list[dict[str, Any]]:
    return [d for d in documents(path) if d.get("kind") == KIND]


def crd_spec_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def unknown_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Paths in ``value`` that the structural schema does not declare (what the apiserver prunes)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if props is not None and key in props:
                found += unknown_fields(item, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += unknown_fields(item, extra, f"{path}.{key}")
            else:
                found.append(f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


def referenced_claims(job: QuantizationJob) -> set[str]:
    spec = job.spec
    claims = {spec.output.pvc.claim_name} if spec.output.pvc else set()
    if spec.model.pvc:
        claims.add(spec.model.pvc.claim_name)
    if spec.calibration.dataset.pvc:
        claims.add(spec.calibration.dataset.pvc.claim_name)
    return claims


# ------------------------------------------------------------------------------------- examples


def test_examples_exist():
    assert VALID_EXAMPLES, "no examples found"
    assert [p.name for p in INVALID_EXAMPLES] == ["invalid-int4-awq-for-vllm.yaml", "invalid-nvfp4-on-hopper.yaml"]
    assert (EXAMPLES / "fp8-hopper.yaml") in VALID_EXAMPLES


@pytest.mark.parametrize("path", ALL_EXAMPLES, ids=lambda p: p.name)
def test_example_starts_with_a_comment(path: Path):
    first = path.read_text().lstrip().splitlines()[0]
    assert first.startswith("# "), f"{path.name}: start with a comment that says what it shows"


@pytest.mark.parametrize("path", VALID_EXAMPLES, ids=lambda p: p.name)
def test_example_parses_with_the_api_model(path: Path):
    docs = documents(path)
    jobs = qjobs(path)
    assert len(jobs) == 1, f"{path.name}: exactly one QuantizationJob per example"
    for doc in docs:
        if doc.get("kind") == KIND:
            assert doc["apiVersion"] == API_VERSION
        else:
            assert (doc.get("apiVersion"), doc.get("kind")) in COMPANION_KINDS, doc.get("kind")
        assert "namespace" not in doc["metadata"], "examples are applied with -n <namespace>"
    job = QuantizationJob.model_validate(jobs[0])
    assert job.metadata["name"]


@pytest.mark.parametrize("path", ALL_EXAMPLES, ids=lambda p: p.name)
def test_example_uses_only_declared_fields(path: Path):
    schema = crd_spec_schema()["properties"]["spec"]
    for doc in qjobs(path):
        assert unknown_fields(doc["spec"], schema, ".spec") == [], f"{path.name}: fields the CRD does not declare"


def test_unknown_fields_finds_typos():
    schema = crd_spec_schema()["properties"]["spec"]
    spec = {"quantization": {"format": "fp8", "kvcache": "fp8"}, "engines": [{"architecture": "ada", "maxBatch": 1}]}
    assert unknown_fields(spec, schema, ".spec") == [".spec.quantization.kvcache", ".spec.engines[0].maxBatch"]


@pytest.mark.parametrize("path", VALID_EXAMPLES, ids=lambda p: p.name)
def test_example_respects_the_capability_matrix(path: Path):
    job = QuantizationJob.model_validate(qjobs(path)[0])
    q = job.spec.quantization
    archs = job.spec.target_architectures()
    assert unsupported_reasons(q.format, q.kv_cache, archs) == []
    if q.format in CUDA_ONLY_FORMATS and job.spec.scheduling.calibration_architecture:
        assert unsupported_reasons(q.format, q.kv_cache, [job.spec.scheduling.calibration_architecture]) == []
    # The cross-field rules the CRD checks with CEL (so a valid example really is valid).
    formats = set(job.spec.export.formats)
    if ExportFormat.ONNX in formats:
        assert job.spec.model.task == ModelTask.ENCODER
    if job.spec.model.task == ModelTask.ENCODER:
        assert q.kv_cache == KVCacheFormat.NONE
        assert not archs or ExportFormat.ONNX in formats
        assert ExportFormat.TENSORRT_LLM not in formats
    if job.spec.evaluation.gate and job.spec.evaluation.gate.max_perplexity_increase is not None:
        assert job.spec.model.task == ModelTask.CAUSAL_LM
    assert job.spec.serving_problems() == []


@pytest.mark.parametrize("path", VALID_EXAMPLES, ids=lambda p: p.name)
def test_example_brings_what_it_references(path: Path):
    docs = documents(path)
    job = QuantizationJob.model_validate(qjobs(path)[0])
    claims = {d["metadata"]["name"] for d in documents(STORAGE) if d["kind"] == "PersistentVolumeClaim"}
    assert referenced_claims(job) <= claims, f"{path.name}: add the PersistentVolumeClaims it uses to storage.yaml"
    if cm := job.spec.calibration.dataset.config_map:
        maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
        assert cm.name in maps, f"{path.name}: add the ConfigMap {cm.name}"
        text = maps[cm.name]["data"][cm.key]
        lines = [line for line in text.splitlines() if line.strip()]
        needed = job.spec.calibration.samples + (job.spec.evaluation.samples if job.spec.evaluation.enabled else 0)
        assert len(lines) >= needed, "calibration and held-out evaluation samples must not overlap"
        for line in lines:
            assert isinstance(yaml.safe_load(line)["text"], str)


def test_shared_claims_live_apart_from_the_examples():
    """`kubectl delete -f <example>` must not delete the claim every other example writes to."""
    assert {d["kind"] for d in documents(STORAGE)} == {"PersistentVolumeClaim"}
    for path in ALL_EXAMPLES:
        assert "PersistentVolumeClaim" not in {d["kind"] for d in documents(path)}, path.name


def test_examples_cover_each_architecture_task_and_source():
    """One example each: FP8 on Hopper, INT4 AWQ on Ada, NVFP4 (+ NVFP4 KV cache) on Blackwell,
    several architectures in one job, an encoder to ONNX + engines, model and data on PVCs, and
    data from a ConfigMap."""
    jobs = [QuantizationJob.model_validate(qjobs(p)[0]).spec for p in VALID_EXAMPLES]

    def has(pred):
        return any(pred(s) for s in jobs)

    assert has(
        lambda s: s.quantization.format == QuantFormat.FP8 and s.target_architectures() == [GPUArchitecture.HOPPER]
    )
    assert has(
        lambda s: s.quantization.format == QuantFormat.INT4_AWQ and s.target_architectures() == [GPUArchitecture.ADA]
    )
    assert has(
        lambda s: (
            s.quantization.format == QuantFormat.NVFP4
            and s.quantization.kv_cache == KVCacheFormat.NVFP4
            and s.target_architectures() == [GPUArchitecture.BLACKWELL]
        )
    )
    assert has(lambda s: len(set(s.target_architectures())) >= 2)
    assert has(lambda s: s.model.task == ModelTask.ENCODER and ExportFormat.ONNX in s.export.formats and s.engines)
    assert has(lambda s: s.model.pvc is not None and s.calibration.dataset.pvc is not None)
    assert has(lambda s: s.calibration.dataset.config_map is not None)
    # Issue 10: one example per serving runtime.
    for runtime in ServingRuntime:
        assert has(lambda s, r=runtime: [x.name for x in s.serving.runtimes] == [r]), runtime


@pytest.mark.parametrize(
    ("name", "breaks"),
    [("invalid-nvfp4-on-hopper.yaml", "Blackwell"), ("invalid-int4-awq-for-vllm.yaml", "vLLM cannot load int4_awq")],
)
def test_invalid_example_breaks_one_table(name, breaks):
    path = EXAMPLES / name
    text = path.read_text()
    assert "INVALID" in text.splitlines()[0], "say at the top that it is refused on purpose"
    (doc,) = documents(path)
    job = QuantizationJob.model_validate(doc)  # well-formed: only a CEL rule of one table refuses it
    q = job.spec.quantization
    reasons = unsupported_reasons(q.format, q.kv_cache, job.spec.target_architectures()) + job.spec.serving_problems()
    assert reasons and all(breaks in r for r in reasons), reasons


# ------------------------------------------------------------------------------------------ CRD


def test_chart_crds_are_a_copy_of_crds():
    source = {p.name: p.read_bytes() for p in (ROOT / "crds").glob("*.yaml")}
    copy = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
    assert source, "crds/ is empty"
    fix = "run deploy/render.sh (or: cp crds/*.yaml charts/qjob-operator/crds/)"
    assert sorted(copy) == sorted(source), f"charts/qjob-operator/crds/ has other files than crds/: {fix}"
    for name in source:
        assert copy[name] == source[name], f"charts/qjob-operator/crds/{name} differs from crds/{name}: {fix}"


# ---------------------------------------------------------------------------- plain manifests


def deploy_objects() -> list[dict[str, Any]]:
    return documents(DEPLOY)


def test_deploy_manifest_shape():
    objs = deploy_objects()
    kinds = [o["kind"] for o in objs]
    assert kinds[0] == "Namespace" and objs[0]["metadata"]["name"] == "qjob-system"
    assert "CustomResourceDefinition" not in kinds, "the CRD is applied from crds/ first"
    for kind in ("ServiceAccount", "ConfigMap", "ClusterRole", "ClusterRoleBinding", "Service", "Deployment"):
        assert kind in kinds, kind
    assert "ServiceMonitor" not in kinds, "the ServiceMonitor is off by default"
    for obj in objs[1:]:
        if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"] == "qjob-system", obj["metadata"]["name"]


def test_deploy_manifest_operator_pod_is_restricted():
    (dep,) = [o for o in deploy_objects() if o["kind"] == "Deployment"]
    # Active/standby behind a Lease: two replicas, rolled one at a time, one per node if possible.
    assert dep["spec"]["replicas"] == 2 and dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    (pdb,) = [o for o in deploy_objects() if o["kind"] == "PodDisruptionBudget"]
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {p["name"] for p in c["ports"]} == {"metrics", "health", "reports"}
    assert c["resources"]["requests"] and c["resources"]["limits"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["QJOB_OPERATOR_CONFIG"] == "/etc/qjob-operator/config.yaml"
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/tmp", "/etc/qjob-operator"} <= mounts


def test_deploy_manifest_config_is_the_operator_default():
    """The chart's default values render exactly the operator's default settings (apart from
    nothing): a key the operator does not know fails here (OperatorConfig forbids extras)."""
    from qjob_operator.config import OperatorConfig

    (cm,) = [o for o in deploy_objects() if o["kind"] == "ConfigMap"]
    rendered = OperatorConfig.model_validate(yaml.safe_load(cm["data"]["config.yaml"]))
    assert rendered == OperatorConfig()


def test_chart_exposes_every_operator_setting():
    """Every OperatorConfig field (and sub-field) appears in the chart's rendered config, so a
    setting added to the operator without a chart value fails here (run deploy/render.sh)."""
    from pydantic import BaseModel
    from qjob_operator.config import OperatorConfig

    (cm,) = [o for o in deploy_objects() if o["kind"] == "ConfigMap"]
    rendered = yaml.safe_load(cm["data"]["config.yaml"])

    def aliases(model: type[BaseModel]) -> dict[str, Any]:
        return {(f.alias or name): f.annotation for name, f in model.model_fields.items() if not f.exclude}

    optional_absent = {"jobTtlSecondsAfterFinished"}  # null by default: rendered only when set
    missing = []
    for key, annotation in aliases(OperatorConfig).items():
        if key not in rendered:
            missing.append(key)
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            missing += [
                f"{key}.{sub}" for sub in aliases(annotation) if sub not in rendered[key] and sub not in optional_absent
            ]
    assert missing == [], f"chart values/config template lack: {missing}"


def test_deploy_manifest_rbac_has_no_wildcards_or_escalation():
    for obj in deploy_objects():
        if obj["kind"] in ("ClusterRole", "Role"):
            for rule in obj["rules"]:
                assert "*" not in rule["verbs"] and "*" not in rule["resources"], obj["metadata"]["name"]
                assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])
                if "secrets" in rule["resources"]:  # only its own TLS Secret, by name, in its namespace
                    assert obj["kind"] == "Role" and obj["metadata"]["namespace"] == "qjob-system"
                    assert rule["resourceNames"] == ["qjob-operator-report-tls"]
                    assert set(rule["verbs"]) == {"get", "update"}
