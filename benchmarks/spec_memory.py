"""Operator memory with the largest specs the CRD accepts (issue 9, finding 4d: before the spec was
bounded, 10 specs of 1.16 MiB added ~75 MiB to the operator's RSS).

  python benchmarks/spec_memory.py [--jobs 100] [--kubeconfig PATH]

On a fresh local cluster: the operator's RSS when idle, after N small QuantizationJobs and after N
large ones (every scheduling map and list and excludeModules full, keys, values and paths at their
maxLength: ~52 KB of JSON; the schema's bound, which adds up every alternative of the spec at once,
is 122 KB, see tests/unit/test_spec_bounds.py). The jobs stay unfinished (their pods wait for nodes that do not exist),
so the operator keeps reconciling them. Figures are printed and written to
benchmarks/results/spec_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from kubernetes import client
from qjob_dev.bench import RESULTS_DIR, control_plane, report_results, rss_mib
from qjob_dev.operator_process import OperatorProcess, operator_config
from qjob_dev.qjobs import GROUP, PLURAL, VERSION, make_job_namespace, qjob_manifest
from qjob_dev.waits import wait_for

RESULTS = RESULTS_DIR / "spec_memory.json"
#: The chart's default memory limit of the operator container.
LIMIT_MIB = 512


def small_spec() -> dict:
    return {
        "model": {"huggingFace": {"repo": "TinyLlama/TinyLlama-1.1B-Chat-v1.0"}},
        "quantization": {"format": "fp8"},
        "calibration": {"dataset": {"configMap": {"name": "calibration", "key": "samples.jsonl"}}},
        "output": {"pvc": {"claimName": "artifacts"}},
        # No node has this label: the pods wait, the job stays unfinished.
        "scheduling": {"nodeSelector": {"example.com/pool": "none"}},
        "runPolicy": {"pendingDeadlineSeconds": 86400},
    }


def _qualified(i: int, prefix_length: int = 253) -> str:
    """A distinct label/annotation key of the largest size (253-character prefix / 63-character name)."""
    prefix = ".".join(["p" * 63] * 3 + [f"{i:x}".rjust(61, "q")])[:prefix_length]
    return f"{prefix}/{f'{i:x}'.rjust(63, 'n')}"


def largest_spec() -> dict:
    """The small spec with the big lists and maps full, at their longest keys and values."""
    spec = small_spec()
    path = "/".join(["d" * 99] * 10)[:1024]
    spec["output"]["pvc"]["path"] = path
    spec["calibration"]["dataset"] = {"pvc": {"claimName": "c" * 253, "path": path}}
    spec["quantization"]["excludeModules"] = [f"{i:x}".rjust(256, "m") for i in range(64)]
    spec["scheduling"] = {
        "nodeSelector": {_qualified(i): "v" * 63 for i in range(16)},
        "podLabels": {_qualified(100 + i): "v" * 63 for i in range(32)},
        "podAnnotations": {_qualified(200 + i): "a" * 512 for i in range(8)},
        "tolerations": [
            {"key": _qualified(300 + i), "operator": "Equal", "value": "t" * 63, "effect": "NoSchedule"}
            for i in range(16)
        ],
    }
    return spec


def settled_rss(pid: int, seconds: float = 20) -> float:
    """RSS once it stops growing (sampled every second, highest of the last window)."""
    samples = [rss_mib(pid)]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(1)
        samples.append(rss_mib(pid))
    return max(samples[-5:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--kubeconfig", help="use this running cluster instead of starting one")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="qjob-spec-memory-"))
    with control_plane(workdir, args.kubeconfig) as (cluster, api):
        custom = client.CustomObjectsApi(api)
        namespaces = {
            kind: make_job_namespace(api, f"spec-memory-{kind}-{int(time.time())}") for kind in ("small", "largest")
        }
        operator = OperatorProcess(
            kubeconfig=cluster.kubeconfig, workdir=workdir, config=operator_config(namespaces=list(namespaces.values()))
        )
        try:
            operator.start()
            pid = operator.proc.pid
            results: dict = {"jobs": args.jobs, "operator_idle_rss_mib": round(settled_rss(pid, 10), 1)}
            before = results["operator_idle_rss_mib"]
            for kind, make in (("small", small_spec), ("largest", largest_spec)):
                ns, spec = namespaces[kind], make()
                for i in range(args.jobs):
                    if kind == "largest":  # a folder of its own (a shared one fails all but the first)
                        path = spec["output"]["pvc"]["path"]
                        spec["output"]["pvc"]["path"] = path[: -len(str(i))] + str(i)
                    custom.create_namespaced_custom_object(
                        GROUP, VERSION, ns, PLURAL, qjob_manifest(f"{kind}-{i}", spec)
                    )
                stored = custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, f"{kind}-0")

                def reconciled(ns=ns):
                    items = custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]
                    return sum(bool((i.get("status") or {}).get("phase")) for i in items) == args.jobs

                wait_for(reconciled, timeout=300, interval=2, what=f"{args.jobs} {kind} jobs reconciled")
                rss = round(settled_rss(pid), 1)
                items = custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]
                results[kind] = {
                    "spec_json_bytes": len(json.dumps(stored["spec"], separators=(",", ":"))),
                    "operator_rss_mib": rss,
                    "added_mib_per_job": round((rss - before) / args.jobs, 3),
                    "phases": sorted({(i.get("status") or {}).get("phase") for i in items}),
                }
                before = rss
                print(json.dumps({kind: results[kind]}), flush=True)
            per_job = results["largest"]["added_mib_per_job"]
            results["largest_jobs_to_reach_limit"] = (
                int((LIMIT_MIB - results["operator_idle_rss_mib"]) / per_job) if per_job > 0 else None
            )
            results["limit_mib"] = LIMIT_MIB
            results["machine"] = {"cores": os.cpu_count()}
            results["command"] = "python benchmarks/spec_memory.py " + " ".join(sys.argv[1:])
            report_results(RESULTS, results)
        finally:
            operator.stop()


if __name__ == "__main__":
    main()
