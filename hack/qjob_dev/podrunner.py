"""Development harness: runs runner pods as local processes, standing in for a GPU node's kubelet.

NOT a production path. It exists so the real operator, the real control plane and the real
jobrunner can be tested end to end on a machine without GPUs or a container runtime.

It watches pods labelled ``localcluster.qjob.dev/external=true`` (kwok leaves those alone) that
the real scheduler has bound to a simulated node, and for each one does what a kubelet would:

- volumes: a PVC is resolved to its bound PersistentVolume, whose ``hostPath`` is used as the
  local folder (the local cluster provisions PVs that way); ConfigMap and Secret volumes are
  written to files; emptyDirs are fresh folders. Mount paths are mapped to those folders by
  rewriting the mount-path prefixes in the container's command, args and env values, and in the
  files projected from ConfigMaps (the runner's config carries in-pod paths) — no root, no mounts.
- identity: projected ``serviceAccountToken`` volume sources get a token from the TokenRequest
  API for the pod's ServiceAccount with the source's audience and expiry, bound to the pod (as
  the kubelet does), written to the source's path. Unless the pod sets
  ``automountServiceAccountToken: false``, the process also gets an API token (bound to the pod)
  as a kubeconfig in ``KUBECONFIG``; RBAC applies as in a real cluster. Processes run on this
  machine, so endpoints on loopback (the operator's report endpoint in tests) are reachable.
- env: literal values, ``secretKeyRef`` / ``configMapKeyRef`` (read as the kubelet would) and
  ``fieldRef`` (node name, pod name, namespace).
- status: Running when the process starts; Succeeded/Failed with the exit code and the
  termination message (the file at ``terminationMessagePath``, else the log tail with
  ``FallbackToLogsOnError``) when it ends. Deleting the pod kills the process.

Usage: ``python -m qjob_dev.podrunner --kubeconfig K --workdir DIR`` (runs until Ctrl-C),
or ``PodRunner(...).start()`` from Python (tests, the demo).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from .localcluster import token_kubeconfig

log = logging.getLogger("podrunner")

EXTERNAL_LABEL = "localcluster.qjob.dev/external"
MESSAGE_LIMIT = 4096


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class PathMap:
    """Mount path -> local folder. One regex pass, longest mount path first, whole path
    components only, so a local folder that itself contains a mount path (``/tmp/...``) is
    never rewritten twice."""

    def __init__(self) -> None:
        self._map: dict[str, str] = {}

    def add(self, pod_path: str, local: Path) -> None:
        self._map[pod_path.rstrip("/") or "/"] = str(local)

    def rewrite(self, text: str) -> str:
        if not self._map:
            return text
        alternatives = "|".join(re.escape(p) for p in sorted(self._map, key=len, reverse=True))
        pattern = re.compile(rf"(?<![\w./-])({alternatives})(?=/|$|[^\w.-])")
        return pattern.sub(lambda m: self._map[m.group(1)], text)


class PodRunner:
    def __init__(
        self,
        kubeconfig: str | Path,
        workdir: str | Path,
        bin_dirs: list[str] | None = None,
        max_parallel: int = 2,
        extra_env: dict[str, str] | None = None,
        label_selector: str = f"{EXTERNAL_LABEL}=true",
    ):
        self.kubeconfig = str(kubeconfig)
        self.workdir = Path(workdir)
        self.bin_dirs = bin_dirs or [str(Path(sys.executable).parent)]
        self.extra_env = extra_env or {}
        self.label_selector = label_selector  # must include the external label: kwok runs the rest
        self.api = config.new_client_from_config(config_file=self.kubeconfig)
        self.core = client.CoreV1Api(self.api)
        self._slots = threading.Semaphore(max_parallel)
        self._procs: dict[str, subprocess.Popen] = {}
        self._seen: set[str] = set()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watch: watch.Watch | None = None

    # ------------------------------------------------------------------------------ lifecycle

    def start(self) -> PodRunner:
        thread = threading.Thread(target=self._watch_loop, name="podrunner-watch", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._watch:
            self._watch.stop()
        for proc in list(self._procs.values()):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        for thread in self._threads:
            thread.join(timeout=10)

    def _watch_loop(self) -> None:
        while not self._stop.is_set():
            self._watch = watch.Watch()
            try:
                for event in self._watch.stream(
                    self.core.list_pod_for_all_namespaces, label_selector=self.label_selector, timeout_seconds=60
                ):
                    self._on_event(event["type"], event["object"])
                    if self._stop.is_set():
                        return
            except Exception:  # noqa: BLE001 - a broken watch is re-established
                if not self._stop.is_set():
                    log.exception("pod watch failed; restarting")
                    time.sleep(1)

    def _on_event(self, kind: str, pod: client.V1Pod) -> None:
        uid = pod.metadata.uid
        if kind == "DELETED" or pod.metadata.deletion_timestamp:
            proc = self._procs.get(uid)
            if proc and proc.poll() is None:
                log.info("pod %s/%s deleted: stopping its process", pod.metadata.namespace, pod.metadata.name)
                os.killpg(proc.pid, signal.SIGTERM)
            return
        if uid in self._seen or not pod.spec.node_name or pod.status.phase != "Pending":
            return
        self._seen.add(uid)
        thread = threading.Thread(target=self._run_pod, args=(pod,), name=f"pod-{pod.metadata.name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    # ------------------------------------------------------------------------------- one pod

    def _volumes(self, pod: client.V1Pod, root: Path) -> dict[str, Path]:
        ns = pod.metadata.namespace
        folders: dict[str, Path] = {}
        for vol in pod.spec.volumes or []:
            if vol.persistent_volume_claim:
                pvc = self.core.read_namespaced_persistent_volume_claim(vol.persistent_volume_claim.claim_name, ns)
                pv = self.core.read_persistent_volume(pvc.spec.volume_name)
                if not pv.spec.host_path:
                    raise RuntimeError(f"PV {pv.metadata.name} is not a hostPath volume; the harness cannot map it")
                folders[vol.name] = Path(pv.spec.host_path.path)
                folders[vol.name].mkdir(parents=True, exist_ok=True)
            elif vol.config_map or vol.secret or vol.projected:
                target = root / "volumes" / vol.name
                target.mkdir(parents=True, exist_ok=True)
                folders[vol.name] = target
            else:  # emptyDir and anything else: a fresh folder
                folders[vol.name] = root / "volumes" / vol.name
                folders[vol.name].mkdir(parents=True, exist_ok=True)
        return folders

    def _project(self, pod: client.V1Pod, folders: dict[str, Path], paths: PathMap) -> None:
        """Writes ConfigMap/Secret volume files (after the path map is complete: their text is rewritten)."""
        ns = pod.metadata.namespace
        for vol in pod.spec.volumes or []:
            if vol.config_map:
                data = self.core.read_namespaced_config_map(vol.config_map.name, ns).data or {}
                items = {i.key: i.path for i in vol.config_map.items} if vol.config_map.items else {k: k for k in data}
                for key, rel in items.items():
                    (folders[vol.name] / rel).write_text(paths.rewrite(data[key]))
            elif vol.secret:
                import base64

                data = self.core.read_namespaced_secret(vol.secret.secret_name, ns).data or {}
                for key, value in data.items():
                    (folders[vol.name] / key).write_bytes(base64.b64decode(value))
            elif vol.projected:
                for source in vol.projected.sources or []:
                    if sat := source.service_account_token:
                        token = self._token(pod, [sat.audience] if sat.audience else [], sat.expiration_seconds)
                        (folders[vol.name] / sat.path).write_text(token)

    def _env(self, pod: client.V1Pod, container: client.V1Container, paths: PathMap) -> dict[str, str]:
        import base64

        ns = pod.metadata.namespace
        env = {
            "PATH": os.pathsep.join([*self.bin_dirs, os.environ.get("PATH", "")]),
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        }
        for var in container.env or []:
            if var.value is not None:
                env[var.name] = paths.rewrite(var.value)
            elif var.value_from and var.value_from.secret_key_ref:
                ref = var.value_from.secret_key_ref
                env[var.name] = base64.b64decode(self.core.read_namespaced_secret(ref.name, ns).data[ref.key]).decode()
            elif var.value_from and var.value_from.config_map_key_ref:
                ref = var.value_from.config_map_key_ref
                env[var.name] = self.core.read_namespaced_config_map(ref.name, ns).data[ref.key]
            elif var.value_from and var.value_from.field_ref:
                field = var.value_from.field_ref.field_path
                env[var.name] = {
                    "spec.nodeName": pod.spec.node_name,
                    "metadata.name": pod.metadata.name,
                    "metadata.namespace": ns,
                    "status.podIP": "127.0.0.1",
                }.get(field, "")
        return env

    def _token(self, pod: client.V1Pod, audiences: list[str], expiration: int | None = None) -> str:
        """A token of the pod's ServiceAccount bound to the pod, as the kubelet requests it
        (empty audiences: the apiserver's own)."""
        spec: dict[str, Any] = {
            "expirationSeconds": expiration or 3600,
            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod.metadata.name, "uid": pod.metadata.uid},
        }
        if audiences:
            spec["audiences"] = audiences
        return self.core.create_namespaced_service_account_token(
            pod.spec.service_account_name or "default", pod.metadata.namespace, {"spec": spec}
        ).status.token

    def _kubeconfig(self, pod: client.V1Pod, root: Path) -> Path:
        """The pod's API identity, as the kubelet would mount it (bound to the pod)."""
        token = self._token(pod, [])
        return token_kubeconfig(self.kubeconfig, token, root / "kubeconfig", pod.metadata.namespace)

    def _set_status(self, pod: client.V1Pod, status: dict[str, Any]) -> None:
        try:
            self.core.patch_namespaced_pod_status(pod.metadata.name, pod.metadata.namespace, {"status": status})
        except ApiException as exc:
            if exc.status != 404:
                raise

    def _run_pod(self, pod: client.V1Pod) -> None:
        name = f"{pod.metadata.namespace}/{pod.metadata.name}"
        container = pod.spec.containers[0]
        root = self.workdir / pod.metadata.namespace / f"{pod.metadata.name}-{pod.metadata.uid[:8]}"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        started = now()
        try:
            folders = self._volumes(pod, root)
            paths = PathMap()
            for mount in container.volume_mounts or []:
                paths.add(mount.mount_path, folders[mount.name] / (mount.sub_path or ""))
            termination_log = root / "termination-log"
            paths.add(container.termination_message_path or "/dev/termination-log", termination_log)
            self._project(pod, folders, paths)
            env = self._env(pod, container, paths)
            # The pod's API identity, for clients that fall back to a kubeconfig when they find no
            # in-cluster token (the operator's pod); none for pods that opt out (runner pods).
            if pod.spec.automount_service_account_token is not False:
                env["KUBECONFIG"] = str(self._kubeconfig(pod, root))
            argv = [paths.rewrite(a) for a in [*(container.command or []), *(container.args or [])]]
            argv[0] = shutil.which(argv[0], path=env["PATH"]) or argv[0]
        except Exception as exc:  # noqa: BLE001 - report like a kubelet that cannot set up a pod
            log.exception("cannot set up %s", name)
            self._finish(pod, started, 128, "ContainerCannotRun", str(exc))
            return
        # Only GPU work queues for a slot (it is what the machine has little of); other pods,
        # like the operator's own, start at once.
        wants_gpu = any(k.endswith("/gpu") for k in ((container.resources.limits or {}) if container.resources else {}))
        with self._slots if wants_gpu else contextlib.nullcontext():
            if self._stop.is_set():
                return
            log.info("running %s on simulated node %s: %s", name, pod.spec.node_name, " ".join(argv))
            self._set_status(
                pod,
                {
                    "phase": "Running",
                    "startTime": started,
                    "hostIP": "127.0.0.1",
                    "podIP": "127.0.0.1",
                    "conditions": [
                        {"type": t, "status": "True", "lastTransitionTime": started}
                        for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")
                    ],
                    "containerStatuses": [
                        {
                            "name": container.name,
                            "image": container.image,
                            "imageID": "",
                            "ready": True,
                            "started": True,
                            "restartCount": 0,
                            "state": {"running": {"startedAt": started}},
                        }
                    ],
                },
            )
            with open(root / "container.log", "wb") as out:
                proc = subprocess.Popen(
                    argv, env=env, cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
                self._procs[pod.metadata.uid] = proc
                code = proc.wait()
        message = termination_log.read_text(errors="replace")[:MESSAGE_LIMIT] if termination_log.exists() else ""
        if not message and code != 0 and container.termination_message_policy == "FallbackToLogsOnError":
            message = (root / "container.log").read_text(errors="replace")[-2048:]
        log.info("%s exited with %d", name, code)
        self._finish(pod, started, code, "Completed" if code == 0 else "Error", message)

    def _finish(self, pod: client.V1Pod, started: str, code: int, reason: str, message: str) -> None:
        finished = now()
        container = pod.spec.containers[0]
        self._set_status(
            pod,
            {
                "phase": "Succeeded" if code == 0 else "Failed",
                "conditions": [
                    {"type": t, "status": "False", "reason": "PodCompleted", "lastTransitionTime": finished}
                    for t in ("Ready", "ContainersReady")
                ],
                "containerStatuses": [
                    {
                        "name": container.name,
                        "image": container.image,
                        "imageID": "",
                        "ready": False,
                        "started": False,
                        "restartCount": 0,
                        "state": {
                            "terminated": {
                                "exitCode": code,
                                "reason": reason,
                                "message": message,
                                "startedAt": started,
                                "finishedAt": finished,
                            }
                        },
                    }
                ],
            },
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--max-parallel", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s podrunner %(message)s")
    runner = PodRunner(args.kubeconfig, args.workdir, max_parallel=args.max_parallel).start()
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        runner.stop()


if __name__ == "__main__":
    main()
