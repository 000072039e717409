"""Fault suite: the operator and the control plane killed under running jobs.

  python benchmarks/fault_suite.py [--jobs 20] [--kills 20]

On a freshly started local control plane (real etcd, apiserver, scheduler, controllers; kwok
nodes whose pods run a few seconds and exit like the runner):

1. operator: N two-stage jobs; the operator is killed with SIGKILL K times at random points
   and started again each time;
2. apiserver: kill -9 of kube-apiserver while jobs run, started again on the same etcd;
3. etcd: kill -9 of etcd while jobs run, started again on the same data;
4. node: the node under a running stage is deleted; the Job's next pod runs elsewhere.

Throughout, a poller records every Job (by uid) and every status it sees. Reported: duplicate
Jobs (a second Job for one job's stage: work run twice; goal 0), lost status fields (a field once
written that disappears or changes: startTime, a stage's startTime, artifacts, completionTime, a
terminal phase; goal 0), jobs not finished, and the time to recover after each fault (from the
operator process starting to every unfinished job reconciled once; from the apiserver or etcd
serving again to the next status the operator writes). Figures are printed and written
to benchmarks/results/fault_suite.json.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import re
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from kubernetes import client
from qjob_dev.bench import RESULTS_DIR, control_plane, report_results
from qjob_dev.localcluster import HOLD_ANNOTATION as HOLD
from qjob_dev.localcluster import RUN_DURATION_ANNOTATION
from qjob_dev.operator_process import OperatorProcess, operator_config
from qjob_dev.qjobs import GROUP, PLURAL, VERSION, basic_spec, make_job_namespace, qjob_manifest
from qjob_dev.waits import wait_for

RESULTS = RESULTS_DIR / "fault_suite.json"
TERMINAL = {"Succeeded", "Failed"}


def spec(run_seconds: float, hold: bool = False) -> dict[str, Any]:
    """A two-stage job whose pods run ``run_seconds`` and succeed; ``hold``: they stay Running until released."""
    annotations = {RUN_DURATION_ANNOTATION: f"{run_seconds}s", **({HOLD: "true"} if hold else {})}
    return basic_spec(scheduling={"podAnnotations": annotations})


class Poller(threading.Thread):
    """Lists Jobs and QuantizationJobs twice a second; keeps every Job uid and the first value of
    every status field that must never change once written."""

    KEPT = ("startTime", "completionTime")

    def __init__(self, api: client.ApiClient, namespace: str):
        super().__init__(daemon=True)
        self.batch, self.custom, self.ns = client.BatchV1Api(api), client.CustomObjectsApi(api), namespace
        self.job_uids: dict[tuple[str, str], set[str]] = {}
        self.first: dict[tuple[str, str], Any] = {}  # (job, field) -> first value seen
        self.lost: list[str] = []
        self.statuses: dict[str, dict] = {}
        self.last_change = time.monotonic()
        self.stop = threading.Event()

    def _check(self, name: str, field: str, value: Any) -> None:
        key = (name, field)
        if key not in self.first:
            if value not in (None, [], ""):
                self.first[key] = value
        elif value != self.first[key] and not (field == "artifacts" and len(value or []) >= len(self.first[key])):
            self.lost.append(f"{name}: {field} was {self.first[key]!r}, now {value!r}")
            self.first[key] = value

    def poll(self) -> None:
        for job in self.batch.list_namespaced_job(self.ns, label_selector="qjob.dev/stage").items:
            labels = job.metadata.labels
            key = (
                labels.get("qjob.dev/job-name") or labels.get("qjob.dev/quantization-job", "?"),
                labels["qjob.dev/stage"],
            )
            self.job_uids.setdefault(key, set()).add(job.metadata.uid)
        for item in self.custom.list_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL)["items"]:
            name, status = item["metadata"]["name"], item.get("status") or {}
            if status != self.statuses.get(name):
                self.statuses[name] = status
                self.last_change = time.monotonic()
            for field in self.KEPT:
                self._check(name, field, status.get(field))
            self._check(name, "artifacts", status.get("artifacts"))
            if status.get("phase") in TERMINAL:
                self._check(name, "phase", status["phase"])
            for stage in status.get("stages") or []:
                self._check(name, f"stages[{stage['name']}].startTime", stage.get("startTime"))

    def run(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(Exception):  # the apiserver is down on purpose at times
                self.poll()
            time.sleep(0.5)

    def duplicates(self) -> list[str]:
        return [f"{j}/{s}: {len(u)} Jobs" for (j, s), u in sorted(self.job_uids.items()) if len(u) > 1]

    def recovery_after(self, since: float, timeout: float = 120) -> float | None:
        """Seconds from ``since`` to the next status change (None: none within the timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.last_change > since:
                return round(self.last_change - since, 2)
            time.sleep(0.1)
        return None


def reconciles(operator: OperatorProcess) -> float:
    """Reconciles the operator process finished since it started."""
    match = re.search(r"^qjob_reconcile_duration_seconds_count (\S+)$", operator.metrics(), re.M)
    return float(match.group(1)) if match else 0.0


def create_jobs(custom, ns: str, prefix: str, count: int, run_seconds: float) -> list[str]:
    names = [f"{prefix}-{i}" for i in range(count)]
    for name in names:
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, qjob_manifest(name, spec(run_seconds)))
    return names


def wait_finished(poller: Poller, names: list[str], timeout: float) -> float:
    t0 = time.monotonic()
    wait_for(
        lambda: all((poller.statuses.get(n) or {}).get("phase") in TERMINAL for n in names),
        timeout=timeout,
        interval=0.5,
        what=f"{len(names)} jobs finished",
    )
    return round(time.monotonic() - t0, 1)


def outcome(poller: Poller, names: list[str]) -> dict[str, int]:
    phases = [(poller.statuses.get(n) or {}).get("phase") for n in names]
    return {"succeeded": phases.count("Succeeded"), "not_succeeded": len(names) - phases.count("Succeeded")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=9)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    workdir = Path(tempfile.mkdtemp(prefix="qjob-fault-"))
    print(f"logs: {workdir}", flush=True)  # kept afterwards, whatever the outcome
    results: dict[str, Any] = {"seed": args.seed}
    with control_plane(workdir, keep_logs=True) as (cluster, api):
        core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
        ns = make_job_namespace(api, "faults")
        operator = OperatorProcess(kubeconfig=cluster.kubeconfig, workdir=workdir, config=operator_config())
        try:
            operator.start()
            poller = Poller(api, ns)
            poller.start()

            # 1. the operator, killed at random points while every job runs (stages of 60 s)
            names = create_jobs(custom, ns, "kill", args.jobs, run_seconds=60)
            recoveries, kills_during = [], 0
            for _ in range(args.kills):
                time.sleep(rng.uniform(0.2, 4.0))
                operator.kill()
                time.sleep(rng.uniform(0.0, 1.0))
                unfinished = sum((poller.statuses.get(n) or {}).get("phase") not in TERMINAL for n in names)
                kills_during += unfinished > 0
                spawned = time.monotonic()
                operator.start()
                # Recovered: every unfinished job reconciled once by the new process.
                wait_for(lambda u=unfinished: reconciles(operator) >= u, timeout=120, interval=0.1, what="reconciled")
                recoveries.append(round(time.monotonic() - spawned, 2))
            after_last = wait_finished(poller, names, timeout=600)
            results["operator_kill"] = {
                "jobs": len(names),
                "kills": args.kills,
                **outcome(poller, names),
                "recovery_seconds_median": round(statistics.median(recoveries), 2),
                "recovery_seconds_max": max(recoveries),
                "kills_while_jobs_ran": kills_during,
                "finished_seconds_after_last_kill": after_last,
            }

            # 2 and 3. the apiserver, then etcd, killed while jobs run
            for component in ("kube-apiserver", "etcd"):
                names = create_jobs(custom, ns, component.removeprefix("kube-"), 5, run_seconds=4)
                wait_for(
                    lambda ns_=names: any((poller.statuses.get(n) or {}).get("startTime") for n in ns_), timeout=120
                )
                down = cluster.restart(component)
                back = time.monotonic()
                results[component] = {
                    "jobs": len(names),
                    "serving_again_seconds": round(down, 2),
                    "operator_recovery_seconds": poller.recovery_after(back, timeout=180),
                    "finished_seconds_after_restart": wait_finished(poller, names, timeout=600),
                    **outcome(poller, names),
                }

            # 4. the node under a running stage deleted
            custom.create_namespaced_custom_object(
                GROUP, VERSION, ns, PLURAL, qjob_manifest("node", spec(2, hold=True))
            )
            selector = "qjob.dev/stage=quantize,qjob.dev/job-name=node"

            def running_pods():
                pods = core.list_namespaced_pod(ns, label_selector=selector).items
                return [p for p in pods if p.status.phase == "Running" and not p.metadata.deletion_timestamp]

            [first] = wait_for(running_pods, timeout=120, what="quantize pod running")
            deleted_at = time.monotonic()
            core.delete_node(first.spec.node_name)
            [second] = wait_for(
                lambda: [p for p in running_pods() if p.metadata.uid != first.metadata.uid],
                timeout=300,
                interval=1,
                what="a new quantize pod running on another node",
            )
            replaced = round(time.monotonic() - deleted_at, 1)
            for pod in running_pods():
                core.patch_namespaced_pod(pod.metadata.name, ns, {"metadata": {"annotations": {HOLD: "false"}}})
            # the build stage's pod holds too
            wait_for(
                lambda: (
                    core.list_namespaced_pod(
                        ns, label_selector="qjob.dev/stage=build-hopper,qjob.dev/job-name=node"
                    ).items
                ),
                timeout=120,
            )
            for pod in core.list_namespaced_pod(
                ns, label_selector="qjob.dev/stage=build-hopper,qjob.dev/job-name=node"
            ).items:
                core.patch_namespaced_pod(pod.metadata.name, ns, {"metadata": {"annotations": {HOLD: "false"}}})
            finished = wait_finished(poller, ["node"], timeout=300)
            stages = {s["name"]: s for s in poller.statuses["node"].get("stages") or []}
            results["node_deleted"] = {
                "deleted_node": first.spec.node_name,
                "new_pod_node": second.spec.node_name,
                "new_pod_running_seconds": replaced,
                "quantize_attempts": stages.get("quantize", {}).get("attempts"),
                "finished_seconds_after_release": finished,
                **outcome(poller, ["node"]),
            }

            time.sleep(3)
            poller.stop.set()
            poller.join(timeout=5)
            results["duplicate_jobs"] = len(poller.duplicates())
            results["lost_status_fields"] = len(poller.lost)
            results["examples"] = {"duplicates": poller.duplicates()[:10], "lost": poller.lost[:10]}
            results["operator_starts"] = operator.starts
            report_results(RESULTS, results)
        finally:
            operator.stop()


if __name__ == "__main__":
    main()
