"""The local control plane is real: scheduler, controller-manager, RBAC, CEL, kwok stages."""

from __future__ import annotations

import json
import subprocess
import time
import uuid

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException
from qjob_dev import localcluster
from qjob_dev.localcluster import pinned_k8s_version
from qjob_dev.waits import wait_for

pytestmark = pytest.mark.cluster

IMAGE = "registry.invalid/qjob/noop:1"  # never pulled: kwok plays the pod lifecycle


def gpu_job(name: str, *, gpus: int = 1, annotations=None, affinity=None, parallelism=1,
            backoff_limit=0) -> client.V1Job:  # fmt: skip
    return client.V1Job(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1JobSpec(
            parallelism=parallelism,
            completions=parallelism,
            backoff_limit=backoff_limit,
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(annotations=annotations or {}),
                spec=client.V1PodSpec(
                    restart_policy="Never",
                    affinity=affinity,
                    containers=[
                        client.V1Container(
                            name="quantize",
                            image=IMAGE,
                            resources=client.V1ResourceRequirements(
                                requests={"cpu": "1", "nvidia.com/gpu": str(gpus)},
                                limits={"nvidia.com/gpu": str(gpus)},
                            ),
                        )
                    ],
                ),
            ),
        ),
    )


def job_condition(batch: client.BatchV1Api, ns: str, name: str, ctype: str):
    job = batch.read_namespaced_job_status(name, ns)
    for c in job.status.conditions or []:
        if c.type == ctype and c.status == "True":
            return c
    return None


def test_version_is_pinned(cluster, kube_api):
    info = client.VersionApi(kube_api).get_code()
    assert info.git_version == pinned_k8s_version()
    assert info.major == "1" and info.minor == pinned_k8s_version().split(".")[1]
    # kubectl and helm from the same build talk to the cluster
    out = json.loads(cluster.run_kubectl("version", "-o", "json").stdout)
    assert out["serverVersion"]["gitVersion"] == pinned_k8s_version()
    assert out["clientVersion"]["gitVersion"] == pinned_k8s_version()
    helm = subprocess.run([str(cluster.helm), "version", "--short"], capture_output=True, text=True, check=True)
    assert helm.stdout.startswith("v3.")
    subprocess.run(
        [str(cluster.helm), "--kubeconfig", str(cluster.kubeconfig), "list", "-A"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip


def test_topology_nodes(kube_api):
    nodes = {n.metadata.name: n for n in client.CoreV1Api(kube_api).list_node().items}
    hopper = [n for n in nodes.values() if n.metadata.labels.get("nvidia.com/gpu.family") == "hopper"]
    assert len(hopper) >= 2
    h = hopper[0]
    assert h.metadata.labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert h.metadata.labels["nvidia.com/gpu.compute.major"] == "9"
    assert h.status.allocatable["nvidia.com/gpu"] == "8"
    families = {n.metadata.labels.get("nvidia.com/gpu.family") for n in nodes.values()}
    assert {"hopper", "ada-lovelace", "blackwell", None} <= families
    for n in nodes.values():
        ready = [c for c in n.status.conditions if c.type == "Ready"]
        assert ready and ready[0].status == "True", n.metadata.name


def test_gpu_job_lands_on_hopper_and_completes(kube_api, namespace):
    batch, core = client.BatchV1Api(kube_api), client.CoreV1Api(kube_api)
    affinity = client.V1Affinity(
        node_affinity=client.V1NodeAffinity(
            required_during_scheduling_ignored_during_execution=client.V1NodeSelector(
                node_selector_terms=[
                    client.V1NodeSelectorTerm(
                        match_expressions=[
                            client.V1NodeSelectorRequirement(
                                key="nvidia.com/gpu.compute.major", operator="In", values=["9"]
                            )
                        ]
                    )
                ]
            )
        )
    )
    batch.create_namespaced_job(namespace, gpu_job("hopper-job", affinity=affinity))
    pods = wait_for(
        lambda: [
            p
            for p in core.list_namespaced_pod(namespace, label_selector="job-name=hopper-job").items
            if p.spec.node_name
        ],
        timeout=60,
        what="the Job's pod to be bound",
    )
    node = core.read_node(pods[0].spec.node_name)
    assert node.metadata.labels["nvidia.com/gpu.family"] == "hopper"
    assert node.metadata.labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    scheduled = [c for c in pods[0].status.conditions or [] if c.type == "PodScheduled"]
    assert scheduled and scheduled[0].status == "True"
    wait_for(lambda: job_condition(batch, namespace, "hopper-job", "Complete"), timeout=90,
             what="Job Complete")  # fmt: skip
    job = batch.read_namespaced_job_status("hopper-job", namespace)
    assert job.status.succeeded == 1
    pod = core.read_namespaced_pod(pods[0].metadata.name, namespace)
    assert pod.status.phase == "Succeeded"
    assert pod.status.container_statuses[0].state.terminated.exit_code == 0


def test_too_many_gpus_is_unschedulable(kube_api, namespace):
    core = client.CoreV1Api(kube_api)
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name="greedy"),
        spec=client.V1PodSpec(
            restart_policy="Never",
            containers=[
                client.V1Container(
                    name="c",
                    image=IMAGE,
                    resources=client.V1ResourceRequirements(
                        requests={"nvidia.com/gpu": "9"}, limits={"nvidia.com/gpu": "9"}
                    ),
                )
            ],
        ),
    )
    core.create_namespaced_pod(namespace, pod)

    def unschedulable():
        p = core.read_namespaced_pod_status("greedy", namespace)
        return next(
            (c for c in p.status.conditions or [] if c.type == "PodScheduled" and c.status == "False"),
            None,
        )

    cond = wait_for(unschedulable, timeout=60, what="PodScheduled=False")
    assert cond.reason == "Unschedulable"
    assert "nvidia.com/gpu" in cond.message
    events = wait_for(
        lambda: [
            e
            for e in core.list_namespaced_event(namespace, field_selector="involvedObject.name=greedy").items
            if e.reason == "FailedScheduling"
        ],
        timeout=60,
        what="FailedScheduling event",
    )
    assert "Insufficient nvidia.com/gpu" in events[0].message
    p = core.read_namespaced_pod("greedy", namespace)
    assert p.status.phase == "Pending" and not p.spec.node_name


def test_deleting_job_garbage_collects_pods(kube_api, namespace):
    batch, core = client.BatchV1Api(kube_api), client.CoreV1Api(kube_api)
    batch.create_namespaced_job(
        namespace,
        gpu_job("held", annotations={localcluster.HOLD_ANNOTATION: "true"}, parallelism=2),
    )
    sel = "job-name=held"

    def running():
        pods = core.list_namespaced_pod(namespace, label_selector=sel).items
        return len(pods) == 2 and all(p.status.phase == "Running" for p in pods) and pods

    pods = wait_for(running, timeout=60, what="2 running pods")
    owner = pods[0].metadata.owner_references[0]
    assert owner.kind == "Job" and owner.name == "held"
    time.sleep(2)  # held pods do not complete
    assert all(p.status.phase == "Running" for p in core.list_namespaced_pod(namespace, label_selector=sel).items)
    assert job_condition(batch, namespace, "held", "Complete") is None

    batch.delete_namespaced_job("held", namespace, propagation_policy="Background")
    wait_for(lambda: not core.list_namespaced_pod(namespace, label_selector=sel).items,
             timeout=60, what="garbage collection of the Job's pods")  # fmt: skip
    with pytest.raises(ApiException) as e:
        batch.read_namespaced_job("held", namespace)
    assert e.value.status == 404


def test_serviceaccount_without_binding_is_forbidden(cluster, kube_api, namespace):
    core, rbac = client.CoreV1Api(kube_api), client.RbacAuthorizationV1Api(kube_api)
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="nobody"))
    )
    tr = core.create_namespaced_service_account_token(
        "nobody",
        namespace,
        client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=600)),
    )
    token = tr.status.token
    assert token

    cfg = client.Configuration()
    cfg.host = cluster.server
    cfg.ssl_ca_cert = kube_api.configuration.ssl_ca_cert
    # The header itself: the generated clients' api_key names differ between versions.
    with client.ApiClient(cfg, header_name="Authorization", header_value=f"Bearer {token}") as sa_api:
        review = client.AuthenticationV1Api(sa_api).create_self_subject_review(client.V1SelfSubjectReview())
        assert review.status.user_info.username == f"system:serviceaccount:{namespace}:nobody"
        with pytest.raises(ApiException) as e:
            client.CoreV1Api(sa_api).list_namespaced_pod(namespace)
        assert e.value.status == 403
        assert "forbidden" in e.value.body.lower()

        # ...and RBAC really is evaluated: a RoleBinding grants exactly what it says.
        rbac.create_namespaced_role(
            namespace,
            client.V1Role(
                metadata=client.V1ObjectMeta(name="pod-reader"),
                rules=[client.V1PolicyRule(api_groups=[""], resources=["pods"], verbs=["list"])],
            ),
        )
        rbac.create_namespaced_role_binding(
            namespace,
            client.V1RoleBinding(
                metadata=client.V1ObjectMeta(name="nobody-reads-pods"),
                role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="pod-reader"),
                subjects=[client.RbacV1Subject(kind="ServiceAccount", name="nobody", namespace=namespace)],
            ),
        )
        wait_for(lambda: client.CoreV1Api(sa_api).list_namespaced_pod(namespace) is not None,
                 timeout=30, what="RoleBinding to take effect")  # fmt: skip
        with pytest.raises(ApiException) as e:
            client.CoreV1Api(sa_api).list_namespaced_secret(namespace)
        assert e.value.status == 403


def test_crd_cel_rule_rejects_bad_object(kube_api, namespace):
    ext = client.ApiextensionsV1Api(kube_api)
    group = f"t{uuid.uuid4().hex[:8]}.test.qjob.dev"
    rule_message = "minReplicas must not exceed replicas"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "required": ["replicas", "minReplicas"],
                                    "properties": {
                                        "replicas": {"type": "integer"},
                                        "minReplicas": {"type": "integer"},
                                    },
                                    "x-kubernetes-validations": [
                                        {"rule": "self.minReplicas <= self.replicas", "message": rule_message}
                                    ],
                                },
                                "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                            },
                        }
                    },
                }
            ],
        },
    }
    ext.create_custom_resource_definition(crd)
    try:

        def established():
            c = ext.read_custom_resource_definition(f"widgets.{group}")
            return any(x.type == "Established" and x.status == "True" for x in c.status.conditions or [])

        wait_for(established, timeout=30, what="CRD Established")
        co = client.CustomObjectsApi(kube_api)

        def obj(name, replicas, min_replicas):
            return {
                "apiVersion": f"{group}/v1",
                "kind": "Widget",
                "metadata": {"name": name},
                "spec": {"replicas": replicas, "minReplicas": min_replicas},
            }

        # the CRD's REST mapping may take a moment after Established
        wait_for(lambda: co.create_namespaced_custom_object(group, "v1", namespace, "widgets", obj("good", 3, 1)),
                 timeout=30, what="good Widget accepted")  # fmt: skip
        with pytest.raises(ApiException) as e:
            co.create_namespaced_custom_object(group, "v1", namespace, "widgets", obj("bad", 1, 3))
        assert e.value.status == 422
        assert rule_message in e.value.body
    finally:
        ext.delete_custom_resource_definition(f"widgets.{group}")


def test_fail_annotation_sets_exit_code(kube_api, namespace):
    core, batch = client.CoreV1Api(kube_api), client.BatchV1Api(kube_api)
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(
            name="oom",
            annotations={
                "localcluster.qjob.dev/fail-exit-code": "137",
                "localcluster.qjob.dev/terminated-reason": "OOMKilled",
                "localcluster.qjob.dev/termination-message": "CUDA out of memory",
            },
        ),
        spec=client.V1PodSpec(
            restart_policy="Never",
            containers=[client.V1Container(name="main", image=IMAGE)],
        ),
    )
    core.create_namespaced_pod(namespace, pod)
    p = wait_for(
        lambda: (x := core.read_namespaced_pod("oom", namespace)).status.phase == "Failed" and x,
        timeout=60,
        what="pod Failed",
    )
    term = p.status.container_statuses[0].state.terminated
    assert term.exit_code == 137
    assert term.reason == "OOMKilled"
    assert term.message == "CUDA out of memory"

    # A Job whose pod fails ends Failed (backoffLimit 0), through the real Job controller.
    batch.create_namespaced_job(
        namespace, gpu_job("failing", annotations={"localcluster.qjob.dev/fail-exit-code": "3"})
    )
    cond = wait_for(lambda: job_condition(batch, namespace, "failing", "Failed"), timeout=90,
                    what="Job Failed")  # fmt: skip
    assert cond.reason == "BackoffLimitExceeded"
    pods = core.list_namespaced_pod(namespace, label_selector="job-name=failing").items
    assert pods[0].status.container_statuses[0].state.terminated.exit_code == 3


def test_external_pods_are_left_alone(kube_api, namespace):
    core = client.CoreV1Api(kube_api)
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name="ext", labels={"localcluster.qjob.dev/external": "true"}),
        spec=client.V1PodSpec(
            restart_policy="Never",
            termination_grace_period_seconds=1,
            containers=[client.V1Container(name="main", image=IMAGE)],
        ),
    )
    core.create_namespaced_pod(namespace, pod)
    wait_for(lambda: core.read_namespaced_pod("ext", namespace).spec.node_name, timeout=60,
             what="external pod bound")  # fmt: skip
    time.sleep(3)
    p = core.read_namespaced_pod("ext", namespace)
    assert p.status.phase == "Pending" and not p.status.container_statuses  # kwok did not touch it
    # the external harness writes status itself, and kwok leaves it that way
    core.patch_namespaced_pod_status("ext", namespace, {"status": {"phase": "Running"}})
    time.sleep(2)
    assert core.read_namespaced_pod("ext", namespace).status.phase == "Running"
    # deletion still finishes (kwok force-deletes once the 1 s grace period is over)
    core.delete_namespaced_pod("ext", namespace)

    def gone():
        try:
            core.read_namespaced_pod("ext", namespace)
        except ApiException as e:
            return e.status == 404
        return False

    wait_for(gone, timeout=30, what="external pod deletion")


def test_second_cluster_runs_alongside_and_down_frees_everything(cluster, tmp_path):
    """Ports are picked at run time: a second cluster starts next to the session one."""
    lc = localcluster.LocalCluster(tmp_path / "second")
    lc.up(timeout=180)
    try:
        st = lc.status()
        assert st["healthy"]
        assert st["server"] != cluster.server
        assert len(st["nodes"]) == len(lc.node_manifests())
        assert lc.up() is lc  # running `up` twice reuses the healthy cluster
        again = lc.status()["processes"]
        assert {k: v["pid"] for k, v in again.items()} == {k: v["pid"] for k, v in st["processes"].items()}
    finally:
        ports = list(lc._read_state()["ports"].values())
        pids = [p["pid"] for p in lc._read_state()["processes"].values()]
        lc.down()
    assert not any(localcluster.port_in_use(p) for p in ports)
    assert not any(localcluster.proc_start_time(pid) for pid in pids)
    assert not (tmp_path / "second").exists()
