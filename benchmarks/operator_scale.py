"""Operator throughput, API cost, reconcile latency and memory on the local control plane.

  make bench   (or: python benchmarks/operator_scale.py [--jobs 500] [--rounds 3] [--memory-jobs 2000]
                [--nodes 5000] [--out RESULTS.json] [--baseline RESULTS.json])

In one run, on one freshly started local cluster (real apiserver/etcd/scheduler/controllers,
kwok nodes), with the operator running under the chart's own RBAC (a ServiceAccount token) and
the chart's defaults:

0. N QuantizationJob creates alone, before the operator starts: the operator phase cannot be faster.
1.-2. ROUNDS rounds, alternating which goes first, of the same two phases, each into a fresh
   namespace that is deleted (and gone) before the next phase: direct, N batch/v1 Jobs (the very
   Jobs the operator would build, minus its labels and owner); operator, N QuantizationJobs.
   Both are timed alike: from the first create to the arrival of the last Job (one metadata-only
   watch of the namespace's Jobs, the first Job of each QuantizationJob). Creates are raw requests
   of one client one after another in both; pods are held Running in both (kwok neither completes
   nor fails them), so the pods' lifecycle is the same work in both phases. The figure of merit is
   the median over the rounds of direct seconds / operator seconds (goal >= 0.5); the machine is
   shared, so each round's phases are seconds apart and the median of the rounds is reported.
3. API requests per job lifecycle: the apiserver's audit log, requests made by the operator's
   identity, for one two-stage job alone and for LIFECYCLE such jobs competing for the Hopper
   GPUs, from creation to Succeeded (kwok completes the pods).
4. operator resident memory and reconcile latency with M QuantizationJobs in the cluster (N run
   to Succeeded, the rest suspended), then the same with NODES more (simulated, not kwok-run)
   GPU nodes in the node index.

Figures are printed and written to benchmarks/results/operator_scale.json. With --baseline (the
results file of a run of another revision, e.g. main's, made in the same sitting: the machine is
shared, so only figures of one sitting compare), a before/after table is printed and saved too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import urllib3
from kubernetes import client
from qjob_api.v1alpha1 import QuantizationJobSpec
from qjob_dev import localcluster
from qjob_dev.bench import RESULTS_DIR, control_plane, report_results, rss_mib
from qjob_dev.localcluster import HOLD_ANNOTATION, TERMINATION_MESSAGE_ANNOTATION
from qjob_dev.operator_process import OperatorProcess, chart_identity, operator_config
from qjob_dev.qjobs import (
    GROUP,
    PLURAL,
    VERSION,
    make_artifacts_pvc,
    make_calibration_configmap,
    qjob_manifest,
    runner_summary,
)
from qjob_dev.waits import wait_for
from qjob_operator.builders import QuantizationJobRef, build_job
from qjob_operator.config import OperatorConfig
from qjob_operator.plan import plan_stages

RESULTS = RESULTS_DIR / "operator_scale.json"


def spec(suspend: bool = False, engines: list | None = None, hold: bool = False) -> dict:
    """A one-stage job; ``hold``: its pods stay Running (kwok neither completes nor fails them)."""
    return {
        "model": {"huggingFace": {"repo": "TinyLlama/TinyLlama-1.1B-Chat-v1.0"}},
        "quantization": {"format": "fp8"},
        "calibration": {"dataset": {"configMap": {"name": "calibration", "key": "samples.jsonl"}}, "samples": 64},
        "engines": engines if engines is not None else [],
        "output": {"pvc": {"claimName": "artifacts"}},
        "resources": {"cpu": "100m", "memory": "256Mi"},
        "runPolicy": {"suspend": suspend},
        # kwok ends the pods as the runner does: exit 0 with a summary naming an artifact
        "scheduling": {
            "podAnnotations": {
                TERMINATION_MESSAGE_ANNOTATION: runner_summary(),
                **({HOLD_ANNOTATION: "true"} if hold else {}),
            }
        },  # fmt: skip
    }


def direct_job(name: str, parsed: QuantizationJobSpec, stage) -> dict:
    """The Job the operator would build, minus what makes it the operator's (owner, qjob.dev
    labels): the operator must not see these at all."""
    job = build_job(QuantizationJobRef(name, "unused", "0" * 8), parsed, stage, OperatorConfig())
    job["metadata"].pop("ownerReferences")
    job["metadata"].pop("namespace", None)
    for meta in (job["metadata"], job["spec"]["template"]["metadata"]):
        meta["labels"] = {k: v for k, v in meta["labels"].items() if not k.startswith("qjob.dev/")}
    return job


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_snapshot(cluster: localcluster.LocalCluster, operator: OperatorProcess) -> dict[str, float]:
    """CPU seconds used so far by each control-plane process and the operator."""
    state = json.loads((cluster.dir / "state.json").read_text())
    pids = {name: p["pid"] for name, p in state["processes"].items()}
    pids["operator"] = operator.proc.pid
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


def cpu_used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: round(after[name] - before[name], 1) for name in after}


def namespace(core: client.CoreV1Api, name: str) -> str:
    core.create_namespace({"metadata": {"name": name}})
    wait_for(lambda: core.read_namespaced_service_account("default", name), timeout=60)
    return name


def histogram_quantile(metrics: str, name: str, q: float) -> float | None:
    """Prometheus' histogram_quantile over one unlabelled histogram in a /metrics text."""
    buckets = []
    for line in metrics.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if bound == "+Inf" else float(bound), float(line.rsplit(" ", 1)[1])))
    total = buckets[-1][1] if buckets else 0
    if not total:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-9)
        lower, below = bound, count
    return lower


def latency(operator: OperatorProcess) -> dict:
    """Reconcile time (the operator's own work) and the wait of status writes for their turn,
    p50/p99 over the whole run so far (histogram_quantile over the operator's histograms)."""
    text = operator.metrics()
    figures = {}
    for name, metric in (("reconcile", "qjob_reconcile_duration_seconds"),
                         ("status_write_wait", "qjob_status_write_wait_seconds")):  # fmt: skip
        for q in (0.5, 0.99):
            value = histogram_quantile(text, metric, q)
            figures[f"{name}_seconds_p{int(q * 100)}"] = None if value is None else round(value, 4)
    return figures


def first_job_latency(custom, batch, ns: str) -> dict:
    """Seconds from each QuantizationJob's creation to its first Job's (1 s timestamp resolution)."""
    created = {
        o["metadata"]["name"]: o["metadata"]["creationTimestamp"]
        for o in custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]
    }
    seconds = sorted(
        (j.metadata.creation_timestamp - parse(created[j.metadata.labels["qjob.dev/job-name"]])).total_seconds()
        for j in batch.list_namespaced_job(ns, label_selector="qjob.dev/stage=quantize").items
    )
    return {
        "create_to_first_job_seconds_p50": statistics.median(seconds),
        "create_to_first_job_seconds_p99": seconds[min(len(seconds) - 1, int(0.99 * len(seconds)))],
    }


def parse(timestamp: str):
    from datetime import datetime

    return datetime.fromisoformat(timestamp.replace("Z", "+00:00"))


def watch_creates(api, namespace: str, label_selector: str = "") -> Callable[[int], float]:
    """Watches a namespace's Jobs (metadata only) from now on; the returned function waits until
    `count` distinct Jobs were seen and gives the monotonic time the last of them arrived. Both
    throughput phases are timed by it, so both end at the same thing: the last Job's creation."""
    accept = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
    path = f"/apis/batch/v1/namespaces/{namespace}/jobs"
    params = [("labelSelector", label_selector)] if label_selector else []
    listed = api.call_api(path, "GET", query_params=[*params, ("limit", 1)], header_params={"Accept": accept},
                          auth_settings=["BearerToken"], _preload_content=False,
                          _return_http_data_only=True)  # fmt: skip
    version = json.loads(listed.data)["metadata"]["resourceVersion"]
    seen: dict[str, float] = {}
    done = threading.Event()
    wanted = [0]

    def run() -> None:
        stream = api.call_api(
            path, "GET",
            query_params=[*params, ("watch", "true"), ("resourceVersion", version), ("timeoutSeconds", 1800)],
            header_params={"Accept": accept.replace("List", "")}, auth_settings=["BearerToken"],
            _preload_content=False, _return_http_data_only=True,
        )  # fmt: skip
        with contextlib.suppress(urllib3.exceptions.ProtocolError):  # the namespace's deletion ends it
            for line in stream:
                event = json.loads(line)
                if event["type"] == "ADDED":
                    seen.setdefault(event["object"]["metadata"]["name"], time.monotonic())
                    if wanted[0] and len(seen) >= wanted[0]:
                        done.set()

    threading.Thread(target=run, daemon=True).start()

    def last_created(count: int, timeout: float = 1200) -> float:
        wanted[0] = count
        if len(seen) < count and not done.wait(timeout):
            raise TimeoutError(f"{len(seen)} of {count} Jobs created in {namespace} after {timeout}s")
        return max(seen.values())

    return last_created


def throughput_round(api, core, cluster, operator, kind: str, name: str, jobs: int, manifests: list) -> dict:
    """One phase: `jobs` creates (Jobs directly, or QuantizationJobs) into a fresh namespace, timed
    from the first create to the last Job's arrival; the namespace is deleted and gone afterwards,
    so the next phase starts on a quiet cluster."""
    ns = namespace(core, name)
    if kind == "operator":
        make_artifacts_pvc(api, ns)
        make_calibration_configmap(api, ns)
    last_created = watch_creates(api, ns, "qjob.dev/stage=quantize" if kind == "operator" else "")
    path = (
        f"/apis/batch/v1/namespaces/{ns}/jobs"
        if kind == "direct"
        else f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}"
    )
    cpu0, requests0 = cpu_snapshot(cluster, operator), operator_requests(operator)
    t0 = time.monotonic()
    created_s = post_all(api, path, manifests)
    seconds = last_created(jobs) - t0
    result = {
        "phase": kind,
        "seconds_to_last_job": round(seconds, 2),
        "jobs_per_second": round(jobs / seconds, 1),
        "create_seconds": round(created_s, 2),
        "cpu_seconds": cpu_used(cpu0, cpu_snapshot(cluster, operator)),
        "operator_requests": dict(operator_requests(operator) - requests0),
    }
    if kind == "operator":
        result.update(first_job_latency(client.CustomObjectsApi(api), client.BatchV1Api(api), ns))
    delete_namespace(core, ns)
    print(json.dumps(result), flush=True)
    return result


def operator_requests(operator: OperatorProcess) -> Counter:
    """The operator's API requests so far, by verb (its qjob_api_requests_total counter)."""
    counts: Counter = Counter()
    for line in operator.metrics().splitlines():
        if line.startswith("qjob_api_requests_total{"):
            counts[line.split('verb="', 1)[1].split('"', 1)[0]] = int(float(line.rsplit(" ", 1)[1]))
    return counts


def post_all(api, path: str, manifests: list[dict]) -> float:
    """Creates the objects one after another, as raw requests (no client-side model
    (de)serialisation in any timing); returns the seconds taken."""
    t0 = time.monotonic()
    for manifest in manifests:
        api.call_api(path, "POST", body=manifest, header_params={"Content-Type": "application/json"},
                     auth_settings=["BearerToken"], _preload_content=False, _return_http_data_only=True)  # fmt: skip
    return time.monotonic() - t0


def delete_namespace(core: client.CoreV1Api, name: str) -> None:
    """Deletes a namespace and waits until it is gone (its pods terminated): the next phase starts quiet."""
    core.delete_namespace(name, propagation_policy="Background")
    wait_for(lambda: not [n for n in core.list_namespace().items if n.metadata.name == name],
             timeout=900, interval=2, what=f"namespace {name} deleted")  # fmt: skip


def add_nodes(core: client.CoreV1Api, count: int) -> None:
    """Simulated GPU nodes for the node index only: no kwok annotation (nothing runs them, the
    node controller taints them not-ready), the labels GPU feature discovery sets."""
    kinds = [
        ("NVIDIA-H100-80GB-HBM3", "hopper", "9", "0", "81559"),
        ("NVIDIA-L40S", "ada", "8", "9", "46068"),
        ("NVIDIA-B200", "blackwell", "10", "0", "183359"),
        ("NVIDIA-A100-SXM4-80GB", "ampere", "8", "0", "81920"),
    ]

    def make(i: int) -> None:
        product, family, major, minor, memory = kinds[i % len(kinds)]
        labels = {
            "kubernetes.io/hostname": f"sim-{i}",
            "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.product": product,
            "nvidia.com/gpu.family": family,
            "nvidia.com/gpu.compute.major": major,
            "nvidia.com/gpu.compute.minor": minor,
            "nvidia.com/gpu.memory": memory,
            "nvidia.com/gpu.count": "8",
            "node.kubernetes.io/instance-type": f"sim-{family}",
            "topology.kubernetes.io/zone": f"zone-{i % 3}",
        }
        core.create_node({"metadata": {"name": f"sim-{i}", "labels": labels},
                          "spec": {"taints": [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}]}})  # fmt: skip

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(make, range(count)))


def comparison_table(baseline: dict, current: dict) -> str:
    def get(results: dict, *path):
        for key in path:
            if not isinstance(results, dict) or key not in results:
                return None
            results = results[key]
        return results

    def rounds_text(results: dict):
        ratios = get(results, "throughput", "ratios")
        return "/".join(f"{r:.2f}" for r in ratios) if ratios else None

    def per_lifecycle(results: dict, index: int):
        runs = results.get("api_requests_per_lifecycle") or []
        return runs[index]["requests_per_job"] if len(runs) > index else None

    rows = [
        ("throughput ratio operator/direct (500 jobs, median)", get(baseline, "throughput", "ratio_operator_to_direct"),
         get(current, "throughput", "ratio_operator_to_direct"), ">= 0.5"),
        ("... each round", rounds_text(baseline), rounds_text(current), ""),
        ("operator jobs/s", get(baseline, "throughput", "operator_jobs_per_second"),
         get(current, "throughput", "operator_jobs_per_second"), ""),
        ("direct jobs/s (same run)", get(baseline, "throughput", "direct_jobs_per_second"),
         get(current, "throughput", "direct_jobs_per_second"), ""),
        ("ratio bound: direct / QuantizationJob creates alone", get(baseline, "throughput", "best_possible_ratio"),
         get(current, "throughput", "best_possible_ratio"), ""),
        ("operator API writes per 2-stage lifecycle, alone", per_lifecycle(baseline, 0), per_lifecycle(current, 0),
         "<= 8"),
        ("... with 50 jobs competing for GPUs", per_lifecycle(baseline, 1), per_lifecycle(current, 1), ""),
        ("operator RSS MiB, 2,000 jobs", get(baseline, "memory", "operator_rss_mib"),
         get(current, "memory", "operator_rss_mib"), "<= 150"),
        ("operator RSS MiB, 2,000 jobs + 5,000 nodes", get(baseline, "memory_with_nodes", "operator_rss_mib"),
         get(current, "memory_with_nodes", "operator_rss_mib"), "<= 150"),
        ("reconcile p50 s, 2,000 jobs", get(baseline, "memory", "reconcile_seconds_p50"),
         get(current, "memory", "reconcile_seconds_p50"), ""),
        ("reconcile p99 s, 2,000 jobs", get(baseline, "memory", "reconcile_seconds_p99"),
         get(current, "memory", "reconcile_seconds_p99"), ""),
    ]  # fmt: skip
    lines = [f"{'figure':<52} {'before':>16} {'after':>16}  goal", "-" * 96]
    lines += [
        f"{name:<52} {'-' if a is None else a:>16} {'-' if b is None else b:>16}  {goal}" for name, a, b, goal in rows
    ]
    return "\n".join(lines)


def audit_requests(audit_log: Path, user: str, namespace: str, since: float, until: float) -> Counter:
    """Requests by the operator about objects in one namespace in a time window, by verb and
    resource (watches and lists are shared by all jobs and counted apart)."""
    counts: Counter = Counter()
    for line in audit_log.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("stage") != "ResponseComplete" or entry["user"]["username"] != user:
            continue
        if (entry.get("objectRef") or {}).get("namespace") != namespace:
            continue
        when = time.mktime(time.strptime(entry["requestReceivedTimestamp"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
        if since - 1 <= when <= until + 1:
            ref = entry.get("objectRef") or {}
            resource = ref.get("resource", "?") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
            counts[(entry["verb"], resource)] += 1
    return counts


def lifecycle(api, custom, core, cluster, op_user: str, ns_name: str, jobs: int) -> dict:
    """Creates `jobs` two-stage QuantizationJobs (quantize, build-hopper), waits for all to
    succeed, and counts the operator's requests in that window from the audit log."""
    ns = namespace(core, ns_name)
    make_artifacts_pvc(api, ns)
    make_calibration_configmap(api, ns)
    start = time.time()
    for i in range(jobs):
        custom.create_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, qjob_manifest(f"l-{i}", spec(engines=[{"architecture": "hopper"}]))
        )

    def all_done() -> bool:
        items = custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]
        return sum((o.get("status") or {}).get("phase") == "Succeeded" for o in items) >= jobs

    wait_for(all_done, timeout=1200, interval=1, what=f"{jobs} lifecycle jobs Succeeded")
    time.sleep(3)
    per_kind = audit_requests(cluster.dir / "logs" / "audit.log", op_user, ns, start, time.time())
    total = sum(n for (verb, _), n in per_kind.items() if verb not in ("watch", "list"))
    return {
        "concurrent_jobs": jobs,
        "stages_per_job": 2,
        "requests_per_job": round(total / jobs, 2),
        "by_verb_resource": {f"{v} {r}": round(n / jobs, 2) for (v, r), n in sorted(per_kind.items())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3, help="alternating direct/operator rounds (median ratio)")
    parser.add_argument("--lifecycle", type=int, default=50, help="0: skip the API-request count")
    parser.add_argument("--memory-jobs", type=int, default=2000)
    parser.add_argument("--nodes", type=int, default=5000, help="simulated nodes added for the last memory figure")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results file")
    parser.add_argument(
        "--baseline", type=Path, help="results file of another revision's run, for a before/after table"
    )
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="qjob-bench-"))
    operator = None
    with control_plane(workdir, audit=True) as (cluster, api):
        try:
            core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
            op_kubeconfig, op_user = chart_identity(cluster, api, workdir)

            # 0. the user's QuantizationJob creates alone (no operator yet): what admission, schema
            #    and CEL validation cost; the operator phase cannot be faster than this.
            alone_ns = namespace(core, "bench-alone")
            alone_s = post_all(api, f"/apis/{GROUP}/{VERSION}/namespaces/{alone_ns}/{PLURAL}",
                               [qjob_manifest(f"a-{i}", spec(hold=True)) for i in range(args.jobs)])  # fmt: skip
            delete_namespace(core, alone_ns)
            # The chart's defaults (resyncSeconds 30), not the tests' quick resync.
            operator = OperatorProcess(
                kubeconfig=op_kubeconfig, workdir=workdir, config=operator_config(resyncSeconds=30)
            )
            operator.start()
            print(f"operator pid {operator.proc.pid}, log {operator.log_path}", flush=True)
            idle_rss = rss_mib(operator.proc.pid)
            results: dict = {
                "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
                "operator_idle_rss_mib": round(idle_rss, 1),
            }

            # 1.-2. direct Jobs and QuantizationJobs, alternating, ROUNDS of each
            parsed = QuantizationJobSpec.model_validate(spec(hold=True))
            stage = plan_stages(parsed, OperatorConfig())[0]
            direct_manifests = [direct_job(f"direct-{i}", parsed, stage) for i in range(args.jobs)]
            qjob_manifests = [qjob_manifest(f"q-{i}", spec(hold=True)) for i in range(args.jobs)]
            rounds = []
            for r in range(args.rounds):
                order = ("direct", "operator") if r % 2 == 0 else ("operator", "direct")
                phases = {
                    kind: throughput_round(api, core, cluster, operator, kind, f"bench-{kind}-{r}", args.jobs,
                                           direct_manifests if kind == "direct" else qjob_manifests)
                    for kind in order
                }  # fmt: skip
                ratio = phases["direct"]["seconds_to_last_job"] / phases["operator"]["seconds_to_last_job"]
                rounds.append({"round": r, "order": list(order), **phases, "ratio_operator_to_direct": round(ratio, 3)})
            if rounds:
                direct_s = statistics.median(r["direct"]["seconds_to_last_job"] for r in rounds)
                operator_s = statistics.median(r["operator"]["seconds_to_last_job"] for r in rounds)
                results["throughput"] = {
                    "jobs": args.jobs,
                    "rounds": args.rounds,
                    "ratio_operator_to_direct": statistics.median(r["ratio_operator_to_direct"] for r in rounds),
                    "ratios": [r["ratio_operator_to_direct"] for r in rounds],
                    "direct_seconds": direct_s,
                    "direct_jobs_per_second": round(args.jobs / direct_s, 1),
                    "operator_seconds_to_all_first_jobs": operator_s,
                    "operator_jobs_per_second": round(args.jobs / operator_s, 1),
                    "quantizationjob_creates_alone_seconds": round(alone_s, 2),
                    "best_possible_ratio": round(direct_s / alone_s, 3),
                    "by_round": rounds,
                }
                print(
                    json.dumps({k: v for k, v in results["throughput"].items() if k != "by_round"}, indent=2),
                    flush=True,
                )

            # 3. API requests per lifecycle: one job alone, then LIFECYCLE jobs competing for GPUs
            #    (waiting for a node is a user-visible state: it costs status writes and Events).
            lifecycle_jobs = 0
            if args.lifecycle:
                results["api_requests_per_lifecycle"] = [
                    lifecycle(api, custom, core, cluster, op_user, "bench-single", 1),
                    lifecycle(api, custom, core, cluster, op_user, "bench-lifecycle", args.lifecycle),
                ]
                lifecycle_jobs = args.lifecycle + 1
                print(json.dumps(results["api_requests_per_lifecycle"], indent=2), flush=True)

            # 4. memory with M QuantizationJobs: JOBS that run to Succeeded (their Jobs and pods stay in
            #    the indexes), the rest suspended (no pods, but in every index).
            with_children = args.jobs
            extra = max(0, args.memory_jobs - with_children - lifecycle_jobs)
            mem_ns = namespace(core, "bench-memory")
            make_artifacts_pvc(api, mem_ns)
            make_calibration_configmap(api, mem_ns)
            path = f"/apis/{GROUP}/{VERSION}/namespaces/{mem_ns}/{PLURAL}"
            post_all(api, path, [qjob_manifest(f"r-{i}", spec()) for i in range(with_children)])
            post_all(api, path, [qjob_manifest(f"m-{i}", spec(suspend=True)) for i in range(extra)])

            def settled() -> bool:
                items = custom.list_namespaced_custom_object(GROUP, VERSION, mem_ns, PLURAL)["items"]
                phases = Counter((o.get("status") or {}).get("phase") for o in items)
                return phases["Suspended"] >= extra and phases["Succeeded"] >= with_children

            wait_for(settled, timeout=1200, interval=5, what="memory jobs observed")
            time.sleep(5)
            results["memory"] = {
                "quantization_jobs": with_children + lifecycle_jobs + extra,
                "of_which_with_children": with_children + lifecycle_jobs,
                "operator_rss_mib": round(rss_mib(operator.proc.pid), 1),
                "operator_idle_rss_mib": round(idle_rss, 1),
                **latency(operator),
            }
            print(json.dumps(results["memory"], indent=2), flush=True)

            # 5. the same jobs with a large node index (every job's fit re-evaluated as nodes arrive)
            if args.nodes:
                t0 = time.monotonic()
                add_nodes(core, args.nodes)
                # a job that matches no node yet re-checks on every node change: the costly case
                unfit = spec(engines=[{"architecture": "blackwell"}])
                unfit["resources"]["minGpuMemory"] = "500Gi"
                custom.create_namespaced_custom_object(GROUP, VERSION, mem_ns, PLURAL, qjob_manifest("unfit", unfit))
                time.sleep(30)  # node controller taints, watch events, fit re-evaluations settle
                results["memory_with_nodes"] = {
                    "nodes_added": args.nodes,
                    "seconds_to_add_nodes": round(time.monotonic() - t0 - 30, 1),
                    "quantization_jobs": results["memory"]["quantization_jobs"] + 1,
                    "operator_rss_mib": round(rss_mib(operator.proc.pid), 1),
                    **latency(operator),
                }
                print(json.dumps(results["memory_with_nodes"], indent=2), flush=True)
            results["command"] = "python benchmarks/operator_scale.py " + " ".join(sys.argv[1:])
            if args.baseline:
                baseline = json.loads(args.baseline.read_text())
                results["before_after"] = {"baseline": str(args.baseline), "table": comparison_table(baseline, results)}
                print(results["before_after"]["table"])
            printed = ("throughput", "api_requests_per_lifecycle", "memory", "memory_with_nodes", "before_after")
            report_results(args.out, results, not_shown=printed)  # printed as they came
        finally:
            if operator:
                operator.stop()


if __name__ == "__main__":
    main()
