"""What a runner pod does to report progress, done from a test or benchmark: a token as the
kubelet projects it into the pod, the report URL and CA from the pod's RunnerConfig, and the POST
to the operator's endpoint."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from typing import Any

from qjob_api.runner import CONFIG_ENV


def report_token(kube_api, pod, audience: str = "qjob.dev/report", bound: bool = True) -> str:
    """The token a kubelet projects into a runner pod's report-token volume: the pod's
    ServiceAccount, the report audience, bound to the pod (``bound=False``: to no object)."""
    from kubernetes import client

    spec: dict[str, Any] = {"audiences": [audience], "expirationSeconds": 600}
    if bound:
        spec["boundObjectRef"] = {"kind": "Pod", "apiVersion": "v1", "name": pod.metadata.name, "uid": pod.metadata.uid}
    return (
        client.CoreV1Api(kube_api)
        .create_namespaced_service_account_token(pod.spec.service_account_name, pod.metadata.namespace, {"spec": spec})
        .status.token
    )


def runner_reporting(kube_api, namespace: str, job_name: str) -> dict[str, Any]:
    """The reporting section of a Job's inline RunnerConfig (URL and CA, as the runner gets them)."""
    from kubernetes import client

    job = client.BatchV1Api(kube_api).read_namespaced_job(job_name, namespace)
    env = {e.name: e.value for e in job.spec.template.spec.containers[0].env}
    return json.loads(env[CONFIG_ENV])["reporting"]


def post_report(url: str, ca_cert: str, token: str | None, body: Any) -> tuple[int, dict[str, Any]]:
    """POSTs a report to the operator's endpoint over TLS verified with the runner's CA."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    context = ssl.create_default_context(cadata=ca_cert)
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
