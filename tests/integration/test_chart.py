"""The Helm chart, the plain manifests and the examples against the real local control plane.

What is tested is the objects, not the operator pod: there is no image registry here, so the
Deployment's pod never runs a real container (kwok may still report it Running on a simulated
node). RBAC is checked by acting as the operator's ServiceAccount (impersonation), doing what the
operator does (the same pure builders create a job's Job), and by running the real operator process
with the chart's rendered config and a token of its ServiceAccount (Lease, TLS Secret, Jobs, status).
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes import config as kube_config
from kubernetes.client.rest import ApiException
from qjob_api.v1alpha1 import GROUP, PLURAL, VERSION, QuantizationJob
from qjob_dev import localcluster
from qjob_dev.operator_process import OperatorProcess
from qjob_dev.waits import wait_for
from qjob_operator.config import OperatorConfig

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "qjob-operator"
EXAMPLES = ROOT / "examples"
DEPLOY = ROOT / "deploy" / "qjob-operator.yaml"
CRD_NAME = f"{PLURAL}.{GROUP}"
STORAGE = EXAMPLES / "storage.yaml"  # the claims the examples share, applied with them below
VALID_EXAMPLES = sorted(p for p in EXAMPLES.glob("*.yaml") if not p.name.startswith("invalid-") and p != STORAGE)
INVALID_EXAMPLE = EXAMPLES / "invalid-nvfp4-on-hopper.yaml"


# ------------------------------------------------------------------------------------- helpers


def helm(cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(cluster.helm), f"--kubeconfig={cluster.kubeconfig}", *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if check and proc.returncode:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def render(cluster, *args: str, namespace: str = "qjob-test") -> list[dict[str, Any]]:
    out = helm(
        cluster,
        "template",
        "qjob-operator",
        str(CHART),
        "--namespace",
        namespace,
        "--kube-version",
        cluster.version,
        *args,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def values_file(tmp_path: Path, values: dict[str, Any]) -> str:
    path = tmp_path / f"values-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def impersonating(cluster, user: str) -> client.ApiClient:
    api = kube_config.new_client_from_config(config_file=str(cluster.kubeconfig))
    api.set_default_header("Impersonate-User", user)
    return api


def service_account_user(namespace: str, name: str) -> str:
    return f"system:serviceaccount:{namespace}:{name}"


def can_i(kube_api, user: str, verb: str, resource: str, *, group: str = "", namespace: str | None = None,
          subresource: str | None = None, name: str | None = None) -> bool:  # fmt: skip
    review = client.V1SubjectAccessReview(
        spec=client.V1SubjectAccessReviewSpec(
            user=user,
            groups=["system:serviceaccounts", "system:authenticated"],
            resource_attributes=client.V1ResourceAttributes(
                verb=verb,
                group=group,
                resource=resource,
                namespace=namespace,
                subresource=subresource,
                name=name,
            ),  # fmt: skip
        )
    )
    return client.AuthorizationV1Api(kube_api).create_subject_access_review(review).status.allowed


def differences(small: Any, big: Any, path: str = "") -> list[str]:
    """Where ``small`` is not contained in ``big``, as paths. An empty list or map in ``small``
    matches an absent key (the apiserver leaves unset collections out)."""
    if isinstance(small, dict) and isinstance(big, dict):
        return [
            d
            for k, v in small.items()
            if k in big or v not in ([], {})
            for d in (differences(v, big[k], f"{path}.{k}") if k in big else [f"{path}.{k}: missing"])
        ]
    if isinstance(small, list) and isinstance(big, list) and len(small) == len(big):
        return [d for i, (a, b) in enumerate(zip(small, big, strict=True)) for d in differences(a, b, f"{path}[{i}]")]
    return [] if small == big else [f"{path}: {small!r} != {big!r}"]


def exists(read, *args) -> bool:
    try:
        read(*args)
        return True
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise


@pytest.fixture(scope="module")
def crd(cluster, kube_api):
    """The CRD from crds/ is in the cluster (whoever installed it first) and Established."""
    ext = client.ApiextensionsV1Api(kube_api)
    if not exists(ext.read_custom_resource_definition, CRD_NAME):
        cluster.run_kubectl("create", "-f", str(ROOT / "crds"))
    wait_for(
        lambda: any(c.type == "Established" and c.status == "True"
                    for c in ext.read_custom_resource_definition(CRD_NAME).status.conditions or []),
        timeout=60, what="the QuantizationJob CRD to be Established",
    )  # fmt: skip
    return CRD_NAME


@pytest.fixture
def extra_namespace(kube_api, namespace):
    core = client.CoreV1Api(kube_api)
    name = f"{namespace[:55]}-w"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    try:
        yield name
    finally:
        core.delete_namespace(name, propagation_policy="Background")


# ------------------------------------------------------------------------------- static checks


def test_helm_lint_strict(cluster, tmp_path):
    helm(cluster, "lint", "--strict", str(CHART))
    namespaced = values_file(
        tmp_path, {"watchNamespaces": ["team-a", "team-b"], "metrics": {"serviceMonitor": {"enabled": True}}}
    )
    helm(cluster, "lint", "--strict", str(CHART), "-f", namespaced)


@pytest.mark.parametrize(
    "bad",
    [
        ["--set", "imagee.tag=1"],  # misspelt top-level key
        ["--set", "runner.image.tagg=1"],  # misspelt nested key
        ["--set", "runner.shmSize=lots"],  # not a quantity
        ["--set", "image.pullPolicy=Sometimes"],  # not an enum value
        ["--set", "architectures.volta[0]=7.0"],  # not an architecture the operator knows
        ["--set", "watchNamespaces[0]=Not_A_Namespace"],  # not a DNS label
        ["--set", "metrics.port=0"],
        # null drops the key (Helm): values the operator's config needs are required, so null fails
        # the install instead of crashing the operator at start.
        ["--set", "metrics.port=null"],
        ["--set", "policy.maxGpusPerPod=null"],
        ["--set", "nodeLabels.product=null"],
        ["--set", "runner.shmSize=null"],
    ],
    ids=lambda a: a[1],
)
def test_values_schema_refuses_mistakes(cluster, bad):
    proc = helm(cluster, "template", "x", str(CHART), "--kube-version", cluster.version, *bad, check=False)
    assert proc.returncode != 0, f"{bad} was accepted"
    assert "schema" in proc.stderr.lower() or "values don't meet" in proc.stderr.lower(), proc.stderr


def test_operations_knobs_render(cluster, tmp_path):
    """Security contexts can be overridden (OpenShift assigns UIDs), pull secrets take the usual
    [{name: ...}] (bare names still work), a readiness probe, an optional NetworkPolicy."""
    values = {
        "imagePullSecrets": [{"name": "regcred"}, "legacy"],
        "podSecurityContext": {"runAsUser": None, "runAsGroup": None, "fsGroup": None},  # Helm merges: null drops
        "runner": {"imagePullSecrets": [{"name": "runner-reg"}], "runAsUser": None},
        "networkPolicy": {"enabled": True, "metricsFrom": [{"namespaceSelector": {}}]},
    }
    objects = render(cluster, "-f", values_file(tmp_path, values))
    (deployment,) = by_kind(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}, {"name": "legacy"}]
    assert "runAsUser" not in pod["securityContext"] and "fsGroup" not in pod["securityContext"]
    assert pod["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/readyz"
    (policy,) = by_kind(objects, "NetworkPolicy")
    assert policy["spec"]["ingress"][0]["from"] == [{"namespaceSelector": {}}]
    (cm,) = by_kind(objects, "ConfigMap")
    config = OperatorConfig.model_validate(yaml.safe_load(cm["data"]["config.yaml"]))
    assert config.runner.image_pull_secrets == ["runner-reg"] and config.runner.run_as_user is None
    assert not by_kind(render(cluster), "NetworkPolicy")


def test_config_is_what_the_operator_reads(cluster, tmp_path):
    """The ConfigMap is a valid OperatorConfig (extra keys forbidden there) and carries the values."""
    values = {
        "watchNamespaces": ["team-a", "team-b"],
        "nodeLabels": {"computeMajor": "gpu.example.com/cc-major"},
        "architectures": {"ampere": None, "hopper": ["9.0", "9.1"]},
        "runner": {
            "image": {"repository": "registry.example/runner", "tag": "2.0"},
            "env": {"HF_HUB_OFFLINE": "1"},
            "shmSize": "64Gi",
            "jobTtlSecondsAfterFinished": 3600,
            "podLabels": {"team": "ml"},
            "podAnnotations": {"cost-center": "42"},
        },
        "policy": {"allowTrustRemoteCode": True, "maxGpusPerPod": 4, "allowedOutputClaims": ["artifacts"]},
        "metrics": {"port": 9191},
        "healthPort": 8181,
        "resyncSeconds": 10,
    }
    objs = render(cluster, "-f", values_file(tmp_path, values))
    (cm,) = by_kind(objs, "ConfigMap")
    cfg = OperatorConfig.model_validate(yaml.safe_load(cm["data"]["config.yaml"]))
    assert cfg.namespaces == ["team-a", "team-b"]
    assert cfg.node_labels.compute_major == "gpu.example.com/cc-major"
    assert cfg.node_labels.compute_minor == "nvidia.com/gpu.compute.minor"  # defaults merge in
    assert "ampere" not in cfg.architectures and cfg.architectures["hopper"] == ["9.0", "9.1"]
    assert cfg.architectures["blackwell"] == OperatorConfig().architectures["blackwell"]
    assert cfg.runner.image == "registry.example/runner:2.0"
    assert cfg.runner.env == {"HF_HUB_OFFLINE": "1"} and cfg.runner.shm_size == "64Gi"
    assert cfg.runner.job_ttl_seconds_after_finished == 3600
    assert cfg.runner.pod_labels == {"team": "ml"} and cfg.runner.pod_annotations == {"cost-center": "42"}
    assert cfg.policy.allow_trust_remote_code and cfg.policy.max_gpus_per_pod == 4
    assert (cfg.metrics_port, cfg.health_port, cfg.resync_seconds) == (9191, 8181, 10)
    (dep,) = by_kind(objs, "Deployment")
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "metrics": 9191,
        "health": 8181,
        "reports": 8443,
    }
    services = {o["metadata"]["name"]: o["spec"]["ports"][0]["port"] for o in by_kind(objs, "Service")}
    assert services == {"qjob-operator-metrics": 9191, "qjob-operator": 8443}  # metrics; runners' reports


def test_rbac_modes(cluster, tmp_path):
    cluster_wide = render(cluster)
    names = {o["metadata"]["name"] for o in by_kind(cluster_wide, "ClusterRole")}
    assert names == {"qjob-operator", "qjob-operator-edit", "qjob-operator-view"}
    # in its own namespace only: the Lease and the TLS Secret, by name
    assert [(r["metadata"]["name"], r["metadata"]["namespace"]) for r in by_kind(cluster_wide, "Role")] == [
        ("qjob-operator-self", "qjob-test")
    ]
    (main,) = [o for o in by_kind(cluster_wide, "ClusterRole") if o["metadata"]["name"] == "qjob-operator"]
    assert any("namespaces" in r["resources"] for r in main["rules"]), "kopf watches namespaces cluster-wide"

    namespaced = render(cluster, "-f", values_file(tmp_path, {"watchNamespaces": ["team-a", "team-b"]}))
    roles = by_kind(namespaced, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["qjob-test", "team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in by_kind(namespaced, "RoleBinding")) == [
        "qjob-test",
        "team-a",
        "team-b",
    ]
    (cluster_reads,) = [
        o for o in by_kind(namespaced, "ClusterRole") if o["metadata"]["name"] == "qjob-operator-cluster"
    ]
    resources = {res for r in cluster_reads["rules"] for res in r["resources"]}
    assert resources == {"nodes", "customresourcedefinitions", "namespaces", "tokenreviews", "priorityclasses"}, (
        "only cluster-scoped"
    )
    for rule in cluster_reads["rules"]:
        allowed = {"tokenreviews": {"create"}, "priorityclasses": {"get"}}.get(
            rule["resources"][0], {"get", "list", "watch"}
        )
        assert set(rule["verbs"]) == allowed, rule

    without_aggregation = render(cluster, "--set", "rbac.aggregateToDefaultRoles=false")
    assert {o["metadata"]["name"] for o in by_kind(without_aggregation, "ClusterRole")} == {"qjob-operator"}


def test_service_monitor_is_optional(cluster):
    assert not by_kind(render(cluster), "ServiceMonitor")
    (sm,) = by_kind(
        render(
            cluster,
            "--set",
            "metrics.serviceMonitor.enabled=true",
            "--set",
            "metrics.serviceMonitor.labels.release=prom",
        ),
        "ServiceMonitor",
    )
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert sm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "metrics"


# --------------------------------------------------------------------- install/upgrade/uninstall


def test_install_upgrade_uninstall(cluster, kube_api, namespace, extra_namespace, tmp_path):
    core, apps, policy = client.CoreV1Api(kube_api), client.AppsV1Api(kube_api), client.PolicyV1Api(kube_api)
    rbac, ext = client.RbacAuthorizationV1Api(kube_api), client.ApiextensionsV1Api(kube_api)
    # The operator pod must pass the "restricted" Pod Security Standard: enforce it here, so a
    # violation leaves the ReplicaSet without a pod.
    core.patch_namespace(
        namespace,
        {
            "metadata": {
                "labels": {
                    "pod-security.kubernetes.io/enforce": "restricted",
                    "pod-security.kubernetes.io/warn": "restricted",
                }
            }
        },
    )
    release = f"qjob-operator-{uuid.uuid4().hex[:6]}"  # also the object prefix (fullname)

    # ---- install (cluster-wide mode)
    out = helm(cluster, "install", release, str(CHART), "--namespace", namespace)
    assert "kubectl" in out.stdout and "get qjob -w" in out.stdout, "NOTES.txt says what to do next"
    assert "/metrics" in out.stdout
    assert exists(ext.read_custom_resource_definition, CRD_NAME), "helm installs the CRD from crds/"
    dep = apps.read_namespaced_deployment(release, namespace)
    assert dep.spec.strategy.type == "RollingUpdate" and dep.spec.replicas == 2
    assert policy.read_namespaced_pod_disruption_budget(release, namespace).spec.max_unavailable == 1
    assert core.read_namespaced_service(release, namespace).spec.ports[0].port == 8443  # the report endpoint
    assert not core.read_namespaced_secret(f"{release}-report-tls", namespace).data  # filled by the operator
    cm = core.read_namespaced_config_map(f"{release}-config", namespace)
    cfg = OperatorConfig.model_validate(yaml.safe_load(cm.data["config.yaml"]))
    assert cfg.namespaces == [] and cfg.runner.image == "ghcr.io/qjob-dev/qjob-runner:0.1.0"
    assert core.read_namespaced_service_account(release, namespace)
    assert core.read_namespaced_service(f"{release}-metrics", namespace).spec.ports[0].port == 9090
    assert rbac.read_cluster_role_binding(release).subjects[0].namespace == namespace
    pods = wait_for(
        lambda: core.list_namespaced_pod(namespace, label_selector=f"app.kubernetes.io/instance={release}").items,
        timeout=60, what="the operator pod (created by the ReplicaSet under PodSecurity restricted)",
    )  # fmt: skip
    assert pods[0].spec.containers[0].security_context.read_only_root_filesystem is True
    checksum = dep.spec.template.metadata.annotations["checksum/config"]

    # ---- upgrade: another runner image, watch two namespaces only
    upgraded = {
        "runner": {"image": {"repository": "registry.example/qjob-runner", "tag": "9.9.9"}},
        "watchNamespaces": [namespace, extra_namespace],
    }
    helm(cluster, "upgrade", release, str(CHART), "--namespace", namespace, "-f", values_file(tmp_path, upgraded))
    cm = core.read_namespaced_config_map(f"{release}-config", namespace)
    cfg = OperatorConfig.model_validate(yaml.safe_load(cm.data["config.yaml"]))
    assert cfg.runner.image == "registry.example/qjob-runner:9.9.9"
    assert cfg.namespaces == [namespace, extra_namespace]
    dep2 = apps.read_namespaced_deployment(release, namespace)
    assert dep2.spec.template.metadata.annotations["checksum/config"] != checksum, "config change rolls the pod"
    assert dep2.metadata.generation > dep.metadata.generation
    for ns in (namespace, extra_namespace):
        assert rbac.read_namespaced_role(release, ns) and rbac.read_namespaced_role_binding(release, ns)
    assert not exists(rbac.read_cluster_role_binding, release), "no cluster-wide grant in namespaced mode"
    assert rbac.read_cluster_role(f"{release}-cluster")
    history = json.loads(helm(cluster, "history", release, "--namespace", namespace, "-o", "json").stdout)
    assert [h["status"] for h in history] == ["superseded", "deployed"]

    # ---- uninstall: everything the release made goes, except the CRD (Helm never deletes crds/)
    helm(cluster, "uninstall", release, "--namespace", namespace, "--wait")
    assert not exists(apps.read_namespaced_deployment, release, namespace)
    assert not exists(core.read_namespaced_config_map, f"{release}-config", namespace)
    assert not exists(core.read_namespaced_service_account, release, namespace)
    assert not exists(core.read_namespaced_service, f"{release}-metrics", namespace)
    for ns in (namespace, extra_namespace):
        assert not exists(rbac.read_namespaced_role, release, ns)
        assert not exists(rbac.read_namespaced_role_binding, release, ns)
    for name in (f"{release}-cluster", f"{release}-edit", f"{release}-view"):
        assert not exists(rbac.read_cluster_role, name)
    assert exists(ext.read_custom_resource_definition, CRD_NAME), "the CRD (and so every job) stays"
    assert helm(cluster, "list", "--namespace", namespace, "-q").stdout.strip() == ""


def test_operator_rbac_is_enough_and_no_more(cluster, kube_api, crd, namespace):
    """Act as the operator's ServiceAccount and do what the operator does for one job."""
    from qjob_operator.builders import QuantizationJobRef, build_job
    from qjob_operator.plan import plan_stages

    release = f"qjob-operator-{uuid.uuid4().hex[:6]}"
    helm(cluster, "install", release, str(CHART), "--namespace", namespace)
    try:
        operator = service_account_user(namespace, release)
        # What the operator needs (the contract in the chart's README) ...
        needed = [
            ("list", "quantizationjobs", GROUP, None),
            ("watch", "quantizationjobs", GROUP, None),
            ("patch", "quantizationjobs", GROUP, None),
            ("delete", "quantizationjobs", GROUP, None),
            ("list", "jobs", "batch", None),
            ("create", "jobs", "batch", None),
            ("delete", "jobs", "batch", None),
            ("watch", "pods", "", None),
            ("create", "events", "", None),
            ("create", "events", "events.k8s.io", None),
        ]
        for verb, resource, group, _ in needed:
            assert can_i(kube_api, operator, verb, resource, group=group, namespace=namespace), (verb, resource)
        assert can_i(kube_api, operator, "patch", PLURAL, group=GROUP, namespace=namespace, subresource="status")
        # blockOwnerDeletion on children (OwnerReferencesPermissionEnforcement is on in the local cluster).
        assert can_i(kube_api, operator, "update", PLURAL, group=GROUP, namespace=namespace, subresource="finalizers")
        assert can_i(kube_api, operator, "get", "priorityclasses", group="scheduling.k8s.io")
        assert not can_i(kube_api, operator, "update", PLURAL, group=GROUP, namespace=namespace)
        assert not can_i(kube_api, operator, "update", PLURAL, group=GROUP, namespace=namespace, subresource="status")
        assert can_i(kube_api, operator, "watch", "nodes")
        assert can_i(kube_api, operator, "watch", "customresourcedefinitions", group="apiextensions.k8s.io")
        assert can_i(kube_api, operator, "create", "tokenreviews", group="authentication.k8s.io")
        # its own Lease and TLS Secret, by name, in its own namespace only
        for verb, resource, group, name in (("update", "leases", "coordination.k8s.io", release),
                                            ("get", "secrets", "", f"{release}-report-tls"),
                                            ("update", "secrets", "", f"{release}-report-tls")):  # fmt: skip
            assert can_i(kube_api, operator, verb, resource, group=group, namespace=namespace, name=name)
            assert not can_i(kube_api, operator, verb, resource, group=group, namespace="default", name=name)
        assert not can_i(kube_api, operator, "get", "secrets", namespace=namespace, name="someone-elses")
        # ... and what it must not have: nothing to grant runners (they get no API identity).
        refused = [
            ("get", "secrets", ""),
            ("list", "secrets", ""),
            ("create", "pods", ""),
            ("delete", "pods", ""),
            ("create", "quantizationjobs", GROUP),
            ("create", "configmaps", ""),
            ("list", "configmaps", ""),
            ("escalate", "roles", "rbac.authorization.k8s.io"),
            ("bind", "roles", "rbac.authorization.k8s.io"),
            ("create", "clusterroles", "rbac.authorization.k8s.io"),
            ("create", "deployments", "apps"),
            ("create", "serviceaccounts", ""),
            ("create", "roles", "rbac.authorization.k8s.io"),
            ("create", "rolebindings", "rbac.authorization.k8s.io"),
            ("update", "quantizationjobs", GROUP),
        ]
        for verb, resource, group in refused:
            assert not can_i(kube_api, operator, verb, resource, group=group, namespace=namespace), (verb, resource)
        assert not can_i(kube_api, operator, "patch", "nodes")
        assert not can_i(kube_api, operator, "create", "customresourcedefinitions", group="apiextensions.k8s.io")

        # A real QuantizationJob (created by the user), then the operator's children, as the operator.
        doc = next(
            d
            for d in yaml.safe_load_all((EXAMPLES / "fp8-hopper.yaml").read_text())
            if d and d["kind"] == "QuantizationJob"
        )
        # Suspended, so an operator running in the same test session creates no children of its
        # own (this test creates them, as the operator's identity).
        doc["spec"].setdefault("runPolicy", {})["suspend"] = True
        custom = client.CustomObjectsApi(kube_api)
        body = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, doc)
        ref = QuantizationJobRef.from_body(body)
        spec = QuantizationJob.model_validate(body).spec
        cfg = OperatorConfig()
        stages = plan_stages(spec, cfg)
        as_operator = impersonating(cluster, operator)
        try:
            core = client.CoreV1Api(as_operator)
            client.BatchV1Api(as_operator).create_namespaced_job(namespace, build_job(ref, spec, stages[0], cfg))
            client.CustomObjectsApi(as_operator).patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, ref.name, {"status": {"phase": "Pending"}}
            )
            client.CoreV1Api(as_operator).list_node()
            with pytest.raises(ApiException) as denied:
                core.read_namespaced_secret("anything", namespace)
            assert denied.value.status == 403
        finally:
            as_operator.close()

        # The runners' ServiceAccount is the namespace's default one, untouched: nothing was bound.
        runner = service_account_user(namespace, cfg.runner.service_account_name)
        assert not can_i(kube_api, runner, "get", PLURAL, group=GROUP, namespace=namespace, name=ref.name)
        assert not can_i(
            kube_api, runner, "patch", PLURAL, group=GROUP, namespace=namespace, name=ref.name, subresource="status"
        )
    finally:
        helm(cluster, "uninstall", release, "--namespace", namespace)


def test_namespaced_mode_rbac(cluster, kube_api, namespace, extra_namespace, tmp_path):
    release = f"qjob-operator-{uuid.uuid4().hex[:6]}"
    helm(cluster, "install", release, str(CHART), "--namespace", namespace,
         "-f", values_file(tmp_path, {"watchNamespaces": [extra_namespace]}))  # fmt: skip
    try:
        operator = service_account_user(namespace, release)
        assert can_i(kube_api, operator, "watch", PLURAL, group=GROUP, namespace=extra_namespace)
        assert can_i(kube_api, operator, "create", "jobs", group="batch", namespace=extra_namespace)
        assert not can_i(kube_api, operator, "watch", PLURAL, group=GROUP, namespace=namespace)
        assert not can_i(kube_api, operator, "create", "jobs", group="batch", namespace="default")
        assert not can_i(kube_api, operator, "watch", PLURAL, group=GROUP)  # not cluster-wide
        assert can_i(kube_api, operator, "list", "namespaces")  # kopf checks its namespaces exist
        assert not can_i(kube_api, operator, "create", "configmaps", namespace=namespace)
        assert can_i(kube_api, operator, "watch", "nodes")
    finally:
        helm(cluster, "uninstall", release, "--namespace", namespace)


def service_account_kubeconfig(cluster, kube_api, namespace: str, name: str, path: Path) -> Path:
    """A kubeconfig that authenticates as a ServiceAccount (token from the TokenRequest API), as
    the operator's pod would: so the operator below runs with exactly the chart's RBAC."""
    token = (
        client.CoreV1Api(kube_api)
        .create_namespaced_service_account_token(
            name,
            namespace,
            client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600)),
        )
        .status.token
    )
    return localcluster.token_kubeconfig(cluster.kubeconfig, token, path)


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced"])
def test_operator_runs_with_the_charts_config_and_rbac(cluster, kube_api, crd, namespace, extra_namespace,
                                                       tmp_path, mode):  # fmt: skip
    """The real operator process, with the ConfigMap the chart rendered and a token of the chart's
    ServiceAccount: it starts (kopf's own watches allowed), serves /healthz and /metrics on the
    configured ports, and handles a QuantizationJob (creates its Job, writes status)
    without a single Forbidden, taking the chart's Lease and filling the chart's empty TLS Secret."""
    metrics_port, health_port, report_port = localcluster.free_ports(3)
    watched = extra_namespace if mode == "namespaced" else namespace
    values = {
        "metrics": {"port": metrics_port},
        "healthPort": health_port,
        "reports": {"port": report_port},
        "watchNamespaces": [extra_namespace] if mode == "namespaced" else [],
        "runner": {"image": {"repository": "registry.invalid/qjob-runner", "tag": "test"}},
    }
    release = f"qjob-operator-{uuid.uuid4().hex[:6]}"
    helm(cluster, "install", release, str(CHART), "--namespace", namespace, "-f", values_file(tmp_path, values))
    op = None
    try:
        cm = client.CoreV1Api(kube_api).read_namespaced_config_map(f"{release}-config", namespace)
        config = yaml.safe_load(cm.data["config.yaml"])
        kubeconfig = service_account_kubeconfig(cluster, kube_api, namespace, release, tmp_path / "sa.kubeconfig")
        user = service_account_user(namespace, release)
        op = OperatorProcess(kubeconfig=kubeconfig, workdir=tmp_path, config=config)
        op.start()  # waits for GET /healthz on healthPort

        doc = next(
            d
            for d in yaml.safe_load_all((EXAMPLES / "fp8-hopper.yaml").read_text())
            if d and d["kind"] == "QuantizationJob"
        )
        client.CustomObjectsApi(kube_api).create_namespaced_custom_object(GROUP, VERSION, watched, PLURAL, doc)
        name = doc["metadata"]["name"]
        wait_for(
            lambda: (
                metric(op.metrics(), "qjob_api_requests_total", verb="create") >= 1
                and metric(op.metrics(), "qjob_jobs") >= 1
            ),
            timeout=60,
            what=f"the operator to handle {watched}/{name} (log: {op.log_path})",
        )
        wait_for(
            lambda: client.BatchV1Api(kube_api).list_namespaced_job(watched).items,
            timeout=30,
            what="the stage Job the operator creates",
        )
        wait_for(
            lambda: (
                client.CustomObjectsApi(kube_api)
                .get_namespaced_custom_object(GROUP, VERSION, watched, PLURAL, name)
                .get("status")
                or {}
            ).get("phase"),
            timeout=30,
            what="a status written by the operator",
        )
        text = op.metrics()
        assert metric(text, "qjob_reconcile_errors_total") == 0, op.log_tail()
        core = client.CoreV1Api(kube_api)
        assert set(core.read_namespaced_secret(f"{release}-report-tls", namespace).data) == {
            "ca.crt",
            "tls.crt",
            "tls.key",
        }
        lease = client.CoordinationV1Api(kube_api).read_namespaced_lease(release, namespace)
        assert lease.spec.holder_identity
        # RBAC denials only (other tests' namespaces being deleted also answer 403, for another reason).
        denied = [line for line in op.log_path.read_text().splitlines() if f'User "{user}" cannot' in line]
        assert denied == [], "\n".join(denied[:5])
    finally:
        if op:
            op.stop()
        helm(cluster, "uninstall", release, "--namespace", namespace)


# ------------------------------------------------------------------------------------- examples


@pytest.mark.parametrize("path", VALID_EXAMPLES, ids=lambda p: p.name)
def test_example_passes_server_side_dry_run(cluster, crd, namespace, path):
    proc = cluster.run_kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(STORAGE), "-f", str(path),
                               "-o", "json", check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    returned = json.loads(proc.stdout)
    items = returned["items"] if returned.get("kind") == "List" else [returned]
    (server_job,) = [i for i in items if i["kind"] == "QuantizationJob"]
    (sent,) = [d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == "QuantizationJob"]
    assert differences(sent["spec"], server_job["spec"], ".spec") == [], "the apiserver pruned or changed a field"
    # The apiserver's defaults agree with the API model's.
    model = QuantizationJob.model_validate(sent).spec.to_api()
    assert differences(model, server_job["spec"], ".spec") == [], "CRD defaults differ from the model's"


def test_minimal_job_is_accepted_and_defaulted_like_the_model(cluster, crd, namespace):
    """Only the required fields: the CRD's defaults must fill in what its CEL rules read
    (spec.export.formats, spec.engines), and agree with the API model's defaults."""
    minimal = {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "QuantizationJob", "metadata": {"name": "minimal"},
        "spec": {
            "model": {"huggingFace": {"repo": "Qwen/Qwen3-8B"}},
            "quantization": {"format": "fp8"},
            "calibration": {"dataset": {"huggingFace": {"name": "abisee/cnn_dailymail"}}},
            "output": {"pvc": {"claimName": "qjob-artifacts"}},
        },
    }  # fmt: skip
    proc = cluster.run_kubectl("create", "--dry-run=server", "-n", namespace, "-f", "-", "-o", "json",
                               input=json.dumps(minimal), check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    model = QuantizationJob.model_validate(minimal).spec.to_api()
    assert differences(model, json.loads(proc.stdout)["spec"], ".spec") == []


def test_invalid_example_is_refused_with_the_reason(cluster, crd, namespace):
    proc = cluster.run_kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(INVALID_EXAMPLE),
                               check=False)  # fmt: skip
    assert proc.returncode != 0, "the apiserver accepted NVFP4 on Hopper"
    assert "NVFP4 needs Blackwell" in proc.stderr and "spec.engines" in proc.stderr, proc.stderr
    proc = cluster.run_kubectl("get", "qjob", "invalid-nvfp4-on-hopper", "-n", namespace, check=False)
    assert proc.returncode != 0


# ------------------------------------------------------------------------------ plain manifests


def test_plain_manifests_are_current(cluster):
    proc = subprocess.run(
        [str(ROOT / "deploy" / "render.sh"), "--stdout"],
        capture_output=True, text=True, env={**os.environ, "HELM": str(cluster.helm)}, check=True,
    )  # fmt: skip
    assert proc.stdout == DEPLOY.read_text(), (
        "deploy/qjob-operator.yaml is stale: run deploy/render.sh and commit the result"
    )


def test_plain_manifests_apply(cluster, kube_api, crd):
    """`kubectl apply -f crds/ && kubectl apply -f deploy/qjob-operator.yaml`, server-side dry-run.
    The Namespace is created for real (dry-run objects cannot go into a namespace that does not
    exist) unless it is there already, and removed again afterwards."""
    core = client.CoreV1Api(kube_api)
    created = not exists(core.read_namespace, "qjob-system")
    if created:
        (ns,) = [d for d in yaml.safe_load_all(DEPLOY.read_text()) if d and d["kind"] == "Namespace"]
        core.create_namespace(ns)
    try:
        crds = cluster.run_kubectl("apply", "--dry-run=server", "-f", str(ROOT / "crds"), check=False)
        assert crds.returncode == 0, crds.stderr
        proc = cluster.run_kubectl("apply", "--dry-run=server", "-f", str(DEPLOY), check=False)
        assert proc.returncode == 0, proc.stderr
        assert "PodSecurity" not in proc.stderr, f"the operator pod breaks the restricted policy: {proc.stderr}"
        applied = [line for line in proc.stdout.splitlines() if "(server dry run)" in line]
        assert len(applied) == len([d for d in yaml.safe_load_all(DEPLOY.read_text()) if d])
    finally:
        if created:
            core.delete_namespace("qjob-system")
