"""Two operator replicas behind a Lease: one reconciles, the other takes over when it dies.

Both run with the chart's RBAC and share the report endpoint's certificate through the chart's
(empty) TLS Secret. The active one is killed with SIGKILL in the middle of a burst of jobs: the
standby must take over within the Lease duration, create no duplicate Job and lose no status.
"""

from __future__ import annotations

import ssl
import time

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from qjob_dev.operator_process import OPERATOR_NS, OperatorProcess, operator_config
from qjob_dev.qjobs import GROUP, PLURAL, VERSION, create_qjob, make_artifacts_pvc, make_calibration_configmap
from qjob_dev.waits import wait_for

from tests.operator_fixtures import basic_spec

pytestmark = pytest.mark.cluster

LEASE = "qjob-operator"  # the chart's names for release qjob-operator (its Role allows these only)
TLS_SECRET = "qjob-operator-report-tls"
LEASE_SECONDS = 4


def served_certificate(replica: OperatorProcess) -> str:
    return ssl.get_server_certificate(("127.0.0.1", replica.config["reports"]["port"]))


@pytest.fixture
def replicas(kube_api, namespace, operator, tmp_path):
    """Two replicas watching only ``namespace``; the session's operator is stopped meanwhile."""
    core, coordination = client.CoreV1Api(kube_api), client.CoordinationV1Api(kube_api)
    for delete in (lambda: coordination.delete_namespaced_lease(LEASE, OPERATOR_NS),
                   lambda: core.delete_namespaced_secret(TLS_SECRET, OPERATOR_NS)):  # fmt: skip
        try:
            delete()
        except ApiException as exc:
            if exc.status != 404:
                raise
    core.create_namespaced_secret(OPERATOR_NS, {"metadata": {"name": TLS_SECRET}})  # as the chart does: empty
    operator.stop()
    made = []
    try:
        for i in range(2):
            config = operator_config(
                namespaces=[namespace],
                operatorNamespace=OPERATOR_NS,
                leaderElection={"enabled": True, "leaseName": LEASE, "leaseDurationSeconds": LEASE_SECONDS,
                                "renewDeadlineSeconds": 3, "retryPeriodSeconds": 0.5},
            )  # fmt: skip
            config["reports"]["tlsSecret"] = TLS_SECRET
            (tmp_path / f"replica-{i}").mkdir()
            replica = OperatorProcess(kubeconfig=operator.kubeconfig, workdir=tmp_path / f"replica-{i}", config=config)
            replica.start()
            made.append(replica)
        yield made
    finally:
        for replica in made:
            replica.stop()
        operator.start()


def test_standby_takes_over_without_duplicates_or_lost_status(kube_api, namespace, replicas):
    make_artifacts_pvc(kube_api, namespace)
    make_calibration_configmap(kube_api, namespace)
    first = wait_for(lambda: [r for r in replicas if r.active()], timeout=30, what="one active replica")
    assert len(first) == 1, "exactly one replica is active"
    leader, standby = first[0], next(r for r in replicas if r is not first[0])
    # One certificate for both (the runners' CA must be right whichever replica built their Job).
    assert served_certificate(leader) == served_certificate(standby)

    spec = basic_spec(engines=[{"architecture": "hopper"}],
                      scheduling={"podAnnotations": {"localcluster.qjob.dev/run-duration": "3s"}})  # fmt: skip
    names = [create_qjob(kube_api, namespace, spec, name=f"burst-{i}") for i in range(12)]
    batch, custom = client.BatchV1Api(kube_api), client.CustomObjectsApi(kube_api)
    wait_for(lambda: len(batch.list_namespaced_job(namespace).items) >= 3, timeout=60, what="the burst under way")
    before = {o["metadata"]["name"]: o.get("status") or {}
              for o in custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]}  # fmt: skip

    leader.kill()
    killed = time.monotonic()
    wait_for(lambda: standby.active(), timeout=LEASE_SECONDS + 10, interval=0.1, what="the standby to take over")
    takeover = time.monotonic() - killed
    assert takeover <= LEASE_SECONDS + 3, takeover

    def all_succeeded():
        items = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
        return sum((o.get("status") or {}).get("phase") == "Succeeded" for o in items) == len(names)

    wait_for(all_succeeded, timeout=180, interval=1, what=f"all jobs Succeeded (log: {standby.log_path})")
    jobs = batch.list_namespaced_job(namespace).items
    assert sorted(j.metadata.name for j in jobs) == sorted(
        f"{n}-{s}" for n in names for s in ("quantize", "build-hopper")
    )
    for obj in custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]:
        status, earlier = obj["status"], before[obj["metadata"]["name"]]
        assert all(s["attempts"] == 1 and s["phase"] == "Succeeded" for s in status["stages"]), status
        if earlier.get("startTime"):  # what the first replica wrote was kept
            assert status["startTime"] == earlier["startTime"]

    # A graceful stop hands the Lease over at once (rolling updates): no wait for expiry.
    leader.start()
    wait_for(lambda: not leader.active(), timeout=10, what="the restarted replica standing by")
    standby.stop()
    stopped = time.monotonic()
    wait_for(lambda: leader.active(), timeout=LEASE_SECONDS + 10, interval=0.1, what="the other replica taking over")
    assert time.monotonic() - stopped < LEASE_SECONDS
