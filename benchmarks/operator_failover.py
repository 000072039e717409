"""Failover of the operator: two replicas behind a Lease, the active one killed mid-burst.

  python benchmarks/operator_failover.py [--jobs 200] [--kill-at 0.3]

On a fresh local cluster (audit log on), two operator processes with the chart's RBAC, the
chart's Lease timings and one shared TLS Secret. JOBS two-stage QuantizationJobs are created one
after another; when KILL_AT of them have their first Job (creation still going on), the active
replica gets SIGKILL. Measured:
seconds from the kill until the standby holds the Lease and until it writes its first status,
duplicate Jobs (Jobs per stage, and Job creates answered 409 AlreadyExists: harmless, but each
is a stage the dead replica had done and the new one did not know of), lost status (a job
without status, a stage run twice, a startTime that changed), and the time until every job is
Succeeded. Printed and written to benchmarks/results/operator_failover.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from kubernetes import client
from operator_scale import namespace, spec  # this folder is on sys.path when run as a script
from qjob_dev.bench import RESULTS_DIR, control_plane, report_results
from qjob_dev.localcluster import RUN_DURATION_ANNOTATION
from qjob_dev.operator_process import OPERATOR_NS, OperatorProcess, chart_identity, operator_config
from qjob_dev.qjobs import GROUP, PLURAL, VERSION, make_artifacts_pvc, make_calibration_configmap, qjob_manifest
from qjob_dev.waits import wait_for

RESULTS = RESULTS_DIR / "operator_failover.json"
LEASE, TLS_SECRET = "qjob-operator", "qjob-operator-report-tls"


def status_writes(replica: OperatorProcess) -> float:
    for line in replica.metrics().splitlines():
        if line.startswith('qjob_api_requests_total{verb="patch"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--kill-at", type=float, default=0.3, help="fraction of first Jobs created before the kill")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="qjob-failover-"))
    replicas: list[OperatorProcess] = []
    with control_plane(workdir, audit=True) as (cluster, api):
        try:
            core, batch, custom = client.CoreV1Api(api), client.BatchV1Api(api), client.CustomObjectsApi(api)
            kubeconfig, user = chart_identity(cluster, api, workdir)
            core.create_namespaced_secret(OPERATOR_NS, {"metadata": {"name": TLS_SECRET}})  # the chart's: empty
            ns = namespace(core, "bench-failover")
            make_artifacts_pvc(api, ns)
            make_calibration_configmap(api, ns)
            for i in range(2):
                config = operator_config(namespaces=[ns], operatorNamespace=OPERATOR_NS)
                config["reports"]["tlsSecret"] = TLS_SECRET
                config["leaderElection"] = {"enabled": True, "leaseName": LEASE}  # the chart's timings
                (workdir / f"replica-{i}").mkdir()
                replica = OperatorProcess(kubeconfig=kubeconfig, workdir=workdir / f"replica-{i}", config=config)
                replica.start()
                replicas.append(replica)
            leader = wait_for(lambda: next((r for r in replicas if r.active()), None), timeout=60, what="a leader")
            standby = next(r for r in replicas if r is not leader)

            job_spec = spec(engines=[{"architecture": "hopper"}])
            # added to spec's annotations: without its runner summary a stage ends NoArtifacts
            job_spec["scheduling"]["podAnnotations"][RUN_DURATION_ANNOTATION] = "2s"
            start = time.time()

            def burst() -> None:  # the user keeps creating while the active replica dies
                for i in range(args.jobs):
                    custom.create_namespaced_custom_object(
                        GROUP, VERSION, ns, PLURAL, qjob_manifest(f"f-{i}", job_spec)
                    )

            creating = threading.Thread(target=burst, daemon=True)
            creating.start()
            threshold = max(1, int(args.kill_at * args.jobs))
            wait_for(
                lambda: len(batch.list_namespaced_job(ns, label_selector="qjob.dev/stage=quantize").items) >= threshold,
                timeout=600,
                interval=0.2,
                what="the burst under way",
            )
            before = {
                o["metadata"]["name"]: o.get("status") or {}
                for o in custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]
            }
            first_jobs_at_kill = len(batch.list_namespaced_job(ns, label_selector="qjob.dev/stage=quantize").items)
            leader.kill()
            killed = time.monotonic()
            created_at_kill = len(custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"])
            wait_for(lambda: standby.active(), timeout=120, interval=0.05, what="standby active")
            takeover = time.monotonic() - killed
            writes = status_writes(standby)
            wait_for(lambda: status_writes(standby) > writes, timeout=120, interval=0.05, what="standby reconciling")
            reconciling = time.monotonic() - killed

            def succeeded() -> int:
                items = custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]
                return sum((o.get("status") or {}).get("phase") == "Succeeded" for o in items)

            creating.join()
            wait_for(lambda: succeeded() == args.jobs, timeout=1800, interval=2, what="all jobs Succeeded")
            all_done = time.time() - start
            time.sleep(3)
            final = {
                o["metadata"]["name"]: o.get("status") or {}
                for o in custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]
            }
            jobs_per_stage = Counter(
                (j.metadata.labels["qjob.dev/job-name"], j.metadata.labels["qjob.dev/stage"])
                for j in batch.list_namespaced_job(ns).items
            )
            conflicts = 0
            for line in (cluster.dir / "logs" / "audit.log").read_text().splitlines():
                entry = json.loads(line)
                ref = entry.get("objectRef") or {}
                if (entry.get("stage") == "ResponseComplete" and entry["user"]["username"] == user
                        and entry["verb"] == "create" and ref.get("resource") == "jobs" and ref.get("namespace") == ns
                        and (entry.get("responseStatus") or {}).get("code") == 409):  # fmt: skip
                    conflicts += 1
            lost = {
                "jobs_without_status": sum(1 for s in final.values() if not s.get("phase")),
                "stages_run_more_than_once": sum(
                    1 for s in final.values() for st in s.get("stages", []) if st.get("attempts", 0) > 1
                ),  # fmt: skip
                "start_times_changed": sum(
                    1 for n, s in before.items() if s.get("startTime") and final[n].get("startTime") != s["startTime"]
                ),
            }
            results = {
                "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
                "jobs": args.jobs,
                "stages_per_job": 2,
                "lease": {"durationSeconds": 15, "renewDeadlineSeconds": 10, "retryPeriodSeconds": 2},
                "quantization_jobs_created_at_kill": created_at_kill,
                "first_jobs_at_kill": first_jobs_at_kill,
                "seconds_kill_to_standby_active": round(takeover, 2),
                "seconds_kill_to_standby_first_status_write": round(reconciling, 2),
                "seconds_create_to_all_succeeded": round(all_done, 1),
                "duplicate_jobs": sum(n - 1 for n in jobs_per_stage.values() if n > 1),
                "jobs_total": sum(jobs_per_stage.values()),
                "job_creates_answered_already_exists": conflicts,
                "lost_status": lost,
                "command": "python benchmarks/operator_failover.py " + " ".join(sys.argv[1:]),
            }
            report_results(RESULTS, results)
        finally:
            for replica in replicas:
                replica.stop()


if __name__ == "__main__":
    main()
