"""``make demo``: the whole product on this machine, end to end.

1. a real local control plane (etcd, kube-apiserver, scheduler, controller-manager built from the
   Go module proxy) with simulated Ada/Hopper/Blackwell GPU nodes (kwok);
2. ``helm install`` of the chart; the chart's operator pod (and later every runner pod) is run as a
   local process by the development pod runner (qjob_dev.podrunner) with the pod's own ServiceAccount;
3. tiny models and calibration text on a volume; sample QuantizationJobs applied with kubectl;
4. an invalid job refused by the apiserver, and a job no node can run, with its reason;
5. jobs watched to Succeeded; artifacts, status and metrics shown.

The cluster stays up afterwards (``KUBECONFIG=.cluster/kubeconfig``); ``make demo-down`` removes it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .localcluster import REPO_ROOT as ROOT
from .localcluster import LocalCluster, free_ports
from .podrunner import PodRunner

CLUSTER_DIR = ROOT / ".cluster"
NAMESPACE = "qjob-demo"
OPERATOR_NS = "qjob-system"
EXTERNAL = "localcluster.qjob.dev/external"
GOOD_JOBS = ["tiny-llama-fp8", "tiny-llama-int4-awq", "minilm-fp8-onnx"]
UNPLACEABLE = "needs-640gi-gpus"


def step(n: int, text: str) -> None:
    print(f"\n\033[1m[{n}/7] {text}\033[0m", flush=True)


class Demo:
    def __init__(self) -> None:
        self.cluster = LocalCluster(CLUSTER_DIR)
        self.work = CLUSTER_DIR / "demo"
        self.runner = None

    def kubectl(self, *args: str, check: bool = True, echo: bool = True) -> subprocess.CompletedProcess:
        if echo:
            print(f"$ kubectl {' '.join(args)}", flush=True)
        proc = self.cluster.run_kubectl(*args, check=False)
        if check and proc.returncode != 0:
            raise SystemExit(f"kubectl {' '.join(args)} failed:\n{proc.stderr}")
        return proc

    # ------------------------------------------------------------------------------------ steps

    def control_plane(self) -> None:
        step(1, "local control plane with simulated GPU nodes")
        # A first run builds the binaries from the Go module proxy and says so (about 25 minutes).
        self.cluster.up(timeout=180)
        print(
            self.kubectl(
                "get",
                "nodes",
                "-L",
                "nvidia.com/gpu.product,nvidia.com/gpu.compute.major,nvidia.com/gpu.compute.minor,nvidia.com/gpu.count",
                echo=True,
            ).stdout
        )

    def install_chart(self) -> None:
        step(2, "helm install the operator (its pod runs as a local process: qjob_dev.podrunner)")
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        venv_bin = str(Path(sys.executable).parent)
        self.runner = PodRunner(
            self.cluster.kubeconfig,
            self.work / "pods",
            bin_dirs=[venv_bin],
            max_parallel=2,
            extra_env={"QJOB_TORCH_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
        ).start()
        self.metrics_port, health_port = free_ports(2)
        values = {
            "podLabels": {EXTERNAL: "true"},
            "metrics": {"port": self.metrics_port},
            "healthPort": health_port,
            "runner": {"podLabels": {EXTERNAL: "true"}, "image": {"repository": "qjob-runner", "tag": "dev"}},
            "image": {"repository": "qjob-operator", "tag": "dev"},
        }
        values_file = self.work / "values.yaml"
        values_file.write_text(json.dumps(values))
        cmd = [
            str(self.cluster.helm),
            "upgrade",
            "--install",
            "qjob-operator",
            str(ROOT / "charts" / "qjob-operator"),
            "--namespace",
            OPERATOR_NS,
            "--create-namespace",
            "--kubeconfig",
            str(self.cluster.kubeconfig),
            "-f",
            str(values_file),
            "--wait",
            "--timeout",
            "3m",
        ]
        print(
            f"$ helm upgrade --install qjob-operator charts/qjob-operator -n {OPERATOR_NS} --create-namespace "
            f"-f {values_file.relative_to(ROOT)} --wait",
            flush=True,
        )
        subprocess.run(cmd, check=True)
        print(self.kubectl("get", "pods,svc", "-n", OPERATOR_NS, echo=True).stdout)

    def prepare_data(self) -> Path:
        step(3, f"namespace {NAMESPACE}: a volume with tiny models and calibration text")
        from .tiny_models import make_tiny_llama, minilm_folder, pydoc_paragraphs

        self.kubectl("create", "namespace", NAMESPACE, check=False, echo=False)
        volume = self.work / "volume"
        volume.mkdir(parents=True, exist_ok=True)
        manifests = [
            {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": "qjob-demo-volume"},
                "spec": {
                    "capacity": {"storage": "20Gi"},
                    "accessModes": ["ReadWriteMany"],
                    "storageClassName": "",
                    "persistentVolumeReclaimPolicy": "Retain",
                    "hostPath": {"path": str(volume)},
                    "claimRef": {"namespace": NAMESPACE, "name": "demo-volume"},
                },
            },
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": "demo-volume", "namespace": NAMESPACE},
                "spec": {
                    "accessModes": ["ReadWriteMany"],
                    "storageClassName": "",
                    "volumeName": "qjob-demo-volume",
                    "resources": {"requests": {"storage": "20Gi"}},
                },
            },
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "calibration-text", "namespace": NAMESPACE},
                "data": {"samples.jsonl": "\n".join(json.dumps({"text": t}) for t in pydoc_paragraphs()[:300])},
            },
        ]
        path = self.work / "volume.yaml"
        path.write_text("\n---\n".join(json.dumps(m) for m in manifests))
        self.kubectl("apply", "-f", str(path), echo=False)
        print(
            "building a tiny Llama (trained a few steps on Python's own docs) and copying all-MiniLM-L6-v2 ...",
            flush=True,
        )
        make_tiny_llama(volume / "models" / "tiny-llama", train_steps=30)
        shutil.copytree(minilm_folder(), volume / "models" / "all-MiniLM-L6-v2", dirs_exist_ok=True)
        print(f"volume {volume.relative_to(ROOT)} (PVC demo-volume): models/tiny-llama, models/all-MiniLM-L6-v2")
        return volume

    def apply_jobs(self) -> None:
        step(4, "kubectl apply the sample QuantizationJobs")
        print(self.kubectl("apply", "-n", NAMESPACE, "-f", str(Path(__file__).with_name("demo_jobs.yaml"))).stdout)

    def invalid_job(self) -> bool:
        step(5, "an invalid job: NVFP4 for Hopper (NVFP4 kernels exist on Blackwell only)")
        proc = self.kubectl(
            "apply", "-n", NAMESPACE, "-f", str(ROOT / "examples" / "invalid-nvfp4-on-hopper.yaml"), check=False
        )
        print(proc.stderr.strip())
        return proc.returncode != 0 and "NVFP4 needs Blackwell" in proc.stderr

    def watch(self, timeout: float = 1500) -> dict:
        step(6, "watching the jobs (kubectl get qjob)")
        deadline, last, objs = time.monotonic() + timeout, "", {}
        while time.monotonic() < deadline:
            table = self.kubectl("get", "qjob", "-n", NAMESPACE, "-o", "wide", echo=False).stdout
            if table != last:
                print(f"--- {time.strftime('%H:%M:%S')}\n{table}", flush=True)
                last = table
            items = json.loads(self.kubectl("get", "qjob", "-n", NAMESPACE, "-o", "json", echo=False).stdout)["items"]
            objs = {o["metadata"]["name"]: o for o in items}
            if all((o.get("status") or {}).get("phase") in ("Succeeded", "Failed") for o in objs.values()) and objs:
                break
            time.sleep(3)
        return objs

    def results(self, objs: dict, volume: Path) -> bool:
        step(7, "results")
        from qjob_cli.main import format_status

        for obj in objs.values():
            print(format_status(obj))
            print()
        metrics_text = ""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
                metrics_text = resp.read().decode()
        except OSError as exc:
            print(f"(metrics not reachable: {exc})")
        metrics_file = self.work / "metrics.txt"
        metrics_file.write_text(metrics_text)
        print("metrics (operator, Prometheus format):")
        for line in metrics_text.splitlines():
            if line.startswith(
                ("qjob_jobs", "qjob_failures_total", "qjob_gpu_seconds_total", "qjob_stage_duration_seconds_count")
            ):
                print(f"  {line}")
        ok = all((objs.get(n, {}).get("status") or {}).get("phase") == "Succeeded" for n in GOOD_JOBS)
        unplaceable = objs.get(UNPLACEABLE, {}).get("status") or {}
        ok = ok and unplaceable.get("phase") == "Failed" and unplaceable.get("reason") == "NoMatchingNodes"
        qjob = Path(sys.executable).parent / "qjob"
        print(f"""
Artifacts:      {volume.relative_to(ROOT)}/{NAMESPACE}/<job>/   (PVC demo-volume)
Status:         KUBECONFIG=.cluster/kubeconfig {self.cluster.kubectl} get qjob -n {NAMESPACE}
                KUBECONFIG=.cluster/kubeconfig {qjob} status tiny-llama-fp8 -n {NAMESPACE}
Events:         KUBECONFIG=.cluster/kubeconfig {self.cluster.kubectl} get events -n {NAMESPACE}
Metrics:        {metrics_file.relative_to(ROOT)} (scraped from the operator's :{self.metrics_port}/metrics)
Pod logs:       {(self.work / "pods").relative_to(ROOT)}/<namespace>/<pod>/container.log
Tear down:      make demo-down
""")
        return ok

    def run(self) -> int:
        started = time.monotonic()
        try:
            self.control_plane()
            self.install_chart()
            volume = self.prepare_data()
            self.apply_jobs()
            refused = self.invalid_job()
            objs = self.watch()
            ok = self.results(objs, volume) and refused
        finally:
            if self.runner:
                self.runner.stop()
        print(f"demo {'succeeded' if ok else 'FAILED'} in {time.monotonic() - started:.0f}s")
        return 0 if ok else 1


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(Demo().run())
