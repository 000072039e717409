"""A quantize stage spread over several pods: one Indexed Job plus a headless Service.

No extra controller: the Job controller gives each pod a completion index and the stable
hostname ``<job>-<index>``; the headless Service (named like the Job, the pods' subdomain) makes
``<job>-0.<job>.<namespace>.svc`` resolve to rank 0, the torchrun rendezvous point. All pods are
one Job, so Kueue admits them as one Workload (one pod set of ``pods`` pods) or not at all, and
``backoffLimit: 0`` makes any rank's failure fail the attempt; the operator then starts a new
attempt of the whole stage (``attempts.advance``).
"""

from __future__ import annotations

from typing import Any

from qjob_api.v1alpha1 import QuantizePlan

RENDEZVOUS_PORT = 29500
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"


def rendezvous_address(job_name: str, namespace: str) -> str:
    """Rank 0's stable DNS name: its hostname under the headless Service's subdomain."""
    return f"{job_name}-0.{job_name}.{namespace}.svc"


def rendezvous_env(job_name: str, namespace: str, plan: QuantizePlan) -> list[dict[str, Any]]:
    return [
        {"name": "MASTER_ADDR", "value": rendezvous_address(job_name, namespace)},
        {"name": "MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
        {"name": "NNODES", "value": str(plan.pods)},
        {"name": "NPROC_PER_NODE", "value": str(plan.gpus_per_pod)},
        {"name": "WORLD_SIZE", "value": str(plan.pods * plan.gpus_per_pod)},
        {
            "name": "NODE_RANK",
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}},
        },
    ]


#: torchrun (``qjob_runner.launch``: torchrun's launcher reading the env above) starts one runner
#: per GPU with RANK, LOCAL_RANK and WORLD_SIZE, and ends the pod with the exit code and
#: termination message of the rank that failed first.
TORCHRUN_COMMAND = ["python", "-m", "qjob_runner.launch"]


def spread(job: dict[str, Any], plan: QuantizePlan) -> dict[str, Any]:
    """Turns a one-pod stage Job into the Indexed Job of a multi-pod plan (in place)."""
    meta, spec = job["metadata"], job["spec"]
    name, namespace = meta["name"], meta["namespace"]
    spec.update(completionMode="Indexed", completions=plan.pods, parallelism=plan.pods, backoffLimit=0)
    # A rank that is evicted cannot rejoin a running rendezvous: no failure is ignored here.
    spec["podFailurePolicy"]["rules"] = [r for r in spec["podFailurePolicy"]["rules"] if r.get("action") != "Ignore"]
    pod = spec["template"]["spec"]
    pod["subdomain"] = name
    container = pod["containers"][0]
    container["command"] = list(TORCHRUN_COMMAND)
    container["env"] = [*container["env"], *rendezvous_env(name, namespace, plan)]
    container["ports"] = [{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT}]
    return job


def build_rank_service(job: dict[str, Any]) -> dict[str, Any]:
    """The headless Service giving the Job's pods their DNS names (before they are Ready:
    ranks look each other up while starting)."""
    meta = job["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "labels": dict(meta["labels"]),
            "ownerReferences": list(meta["ownerReferences"]),
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {JOB_NAME_LABEL: meta["name"]},
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT}],
        },
    }
