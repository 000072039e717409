"""A real local Kubernetes control plane with simulated (kwok) GPU nodes.

Runs etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok as local processes
(binaries built from the Go module proxy by ``hack/localcluster/build.sh``), creates the nodes of
``hack/localcluster/topology.yaml`` and writes an admin kubeconfig.

    python -m qjob_dev.localcluster up     [--dir .cluster] [--topology FILE]
    python -m qjob_dev.localcluster status [--dir .cluster]
    python -m qjob_dev.localcluster down   [--dir .cluster]

(``make cluster-up|status|down`` run these with ``PYTHONPATH=hack``: stdlib + PyYAML only.)
Importable::

    from qjob_dev.localcluster import LocalCluster
    c = LocalCluster(Path("/tmp/x")).up()
    ... c.kubeconfig, c.kubectl, c.helm ...
    c.down()

All ports are picked free at start, so several clusters (different --dir) can run at once.
Environment: QJOB_K8S_BIN_DIR (use existing binaries), QJOB_CACHE (binary cache root).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
#: build.sh, its Go modules, the node topology and the kwok Stage files
DATA = REPO_ROOT / "hack" / "localcluster"
DEFAULT_DIR = REPO_ROOT / ".cluster"
DEFAULT_TOPOLOGY = DATA / "topology.yaml"
STAGE_FILES = [DATA / "stages" / "nodes.yaml", DATA / "stages" / "pods.yaml"]

SERVICE_CIDR = "10.96.0.0/16"
KUBERNETES_SERVICE_IP = "10.96.0.1"
POD_CIDR = "10.244.0.0/16"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
KWOK_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")
# Pod annotations telling kwok how a simulated pod ends (hack/localcluster/stages/pods.yaml).
FAIL_EXIT_CODE_ANNOTATION = "localcluster.qjob.dev/fail-exit-code"
TERMINATION_MESSAGE_ANNOTATION = "localcluster.qjob.dev/termination-message"
TERMINATED_REASON_ANNOTATION = "localcluster.qjob.dev/terminated-reason"
HOLD_ANNOTATION = "localcluster.qjob.dev/hold"
RUN_DURATION_ANNOTATION = "localcluster.qjob.dev/run-duration"

# Start order; down() stops them in reverse.
COMPONENTS = ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"]


class ClusterError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"localcluster: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# helpers


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (all sockets held open until every port is chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def proc_start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot) of a live, non-zombie process; None otherwise."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def proc_rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def openssl(*args: str, cwd: Path) -> None:
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise ClusterError(f"openssl {' '.join(args)} failed: {r.stderr.strip()}")


def b64file(p: Path) -> str:
    return base64.b64encode(p.read_bytes()).decode()


# ---------------------------------------------------------------------------------------------


class LocalCluster:
    """One local control plane, all of its state under ``dir``."""

    def __init__(
        self,
        dir: Path | str = DEFAULT_DIR,
        topology: Path | str = DEFAULT_TOPOLOGY,
        bin_dir: Path | str | None = None,
        audit: bool = False,
    ) -> None:
        self.dir = Path(dir).resolve()
        # Audit log of every request (JSON lines, logs/audit.log): benchmarks count API calls
        # per client identity with it.
        self.audit = audit
        self.topology = Path(topology)
        self._bin_dir = Path(bin_dir) if bin_dir else None
        self._procs: dict[str, subprocess.Popen] = {}
        self._attached: Path | None = None

    @classmethod
    def attach(cls, kubeconfig: Path | str) -> LocalCluster:
        """A cluster that already runs (e.g. ``make cluster-up``), known by its admin kubeconfig."""
        kc = Path(kubeconfig).resolve()
        cluster = cls(kc.parent)
        cluster._attached = kc
        return cluster

    # -- paths ---------------------------------------------------------------------------------
    @property
    def kubeconfig(self) -> Path:
        return self._attached or self.dir / "kubeconfig"

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    @property
    def pki(self) -> Path:
        return self.dir / "pki"

    @property
    def bin_dir(self) -> Path:
        if self._bin_dir is None:
            st = self._read_state()
            if st and Path(st["bin_dir"]).is_dir():
                self._bin_dir = Path(st["bin_dir"])
            else:
                self._bin_dir = locate_binaries()
        return self._bin_dir

    @property
    def kubectl(self) -> Path:
        return self.bin_dir / "kubectl"

    @property
    def helm(self) -> Path:
        return self.bin_dir / "helm"

    @property
    def server(self) -> str:
        if self._attached:
            cfg = yaml.safe_load(self._attached.read_text())
            ctx = next(c for c in cfg["contexts"] if c["name"] == cfg["current-context"])["context"]
            return next(c for c in cfg["clusters"] if c["name"] == ctx["cluster"])["cluster"]["server"]
        st = self._read_state()
        if not st:
            raise ClusterError(f"no cluster in {self.dir}")
        return f"https://127.0.0.1:{st['ports']['apiserver']}"

    @property
    def version(self) -> str:
        return pinned_k8s_version()

    def run_kubectl(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.kubectl), f"--kubeconfig={self.kubeconfig}", *args],
            check=check, capture_output=True, text=True, **kw,
        )  # fmt: skip

    # -- state ---------------------------------------------------------------------------------
    def _read_state(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None

    def _write_state(self, st: dict[str, Any]) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(st, indent=2) + "\n")
        tmp.replace(self.state_file)

    @contextlib.contextmanager
    def _lock(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # -- HTTP to the apiserver (admin client certificate) ----------------------------------------
    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return ctx

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        timeout: float = 10,
    ) -> tuple[int, Any]:
        """Admin request to the apiserver; returns (status, decoded JSON or text)."""
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.server + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", content_type)
        req.add_header("Accept", "application/json")
        try:
            with urllib.request.urlopen(req, context=self._ssl_context(), timeout=timeout) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def _healthy(self) -> bool:
        st = self._read_state()
        if not st:
            return False
        for name in COMPONENTS:
            p = st["processes"].get(name)
            if not p or proc_start_time(p["pid"]) != p["start_time"]:
                return False
        try:
            code, _ = self.request("GET", "/readyz", timeout=3)
        except (OSError, ssl.SSLError):
            return False
        return code == 200

    # -- up --------------------------------------------------------------------------------------
    def up(self, timeout: float = 120) -> LocalCluster:
        with self._lock():
            if self._healthy():
                log(f"reusing running cluster in {self.dir} ({self.server})")
                return self
            if self._read_state():
                log(f"stale or unhealthy cluster state in {self.dir}; cleaning it up")
                self._down_locked()
            bin_dir = self.bin_dir  # may build (slow, once)
            t0 = time.monotonic()
            try:
                self._start(bin_dir, timeout)
            except BaseException:
                log(f"start failed; logs are in {self.dir / 'logs'}")
                self._stop_processes()
                raise
            log(f"cluster up in {time.monotonic() - t0:.1f}s: {self.server}")
            log(f"export KUBECONFIG={self.kubeconfig}")
            return self

    def _audit_args(self) -> list[str]:
        if not self.audit:
            return []
        policy = self.dir / "config" / "audit-policy.yaml"
        policy.write_text(
            json.dumps(
                {
                    "apiVersion": "audit.k8s.io/v1",
                    "kind": "Policy",
                    "omitStages": ["RequestReceived"],
                    "rules": [{"level": "Metadata"}],
                }
            )
        )
        return [
            f"--audit-policy-file={policy}",
            f"--audit-log-path={self.dir / 'logs' / 'audit.log'}",
            "--audit-log-format=json",
            "--audit-log-mode=batch",
            "--audit-log-maxsize=0",
        ]

    def _start(self, bin_dir: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for sub in ("pki", "etcd", "logs", "config", "kwok-home"):
            p = self.dir / sub
            if p.exists():
                shutil.rmtree(p)
            p.mkdir(parents=True)
        (self.dir / "etcd").chmod(0o700)
        etcd_client, etcd_peer, apiserver, kcm, sched = free_ports(5)
        ports = {
            "etcd_client": etcd_client,
            "etcd_peer": etcd_peer,
            "apiserver": apiserver,
            "kube_controller_manager": kcm,
            "kube_scheduler": sched,
        }
        state: dict[str, Any] = {
            "dir": str(self.dir),
            "bin_dir": str(bin_dir),
            "ports": ports,
            "processes": {},
            "started_at": time.time(),
        }
        self._write_state(state)
        self._make_pki()
        server = f"https://127.0.0.1:{apiserver}"
        self._write_kubeconfig(self.kubeconfig, server, "admin")
        for user in ("kube-controller-manager", "kube-scheduler", "kwok"):
            self._write_kubeconfig(self.dir / "config" / f"{user}.kubeconfig", server, user)

        pki, cfg = self.pki, self.dir / "config"
        etcd_url = f"http://127.0.0.1:{etcd_client}"
        peer_url = f"http://127.0.0.1:{etcd_peer}"
        cmds = {
            "etcd": [
                "--name=qjob-local",
                f"--data-dir={self.dir / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=qjob-local={peer_url}",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
            "kube-apiserver": [
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={apiserver}",
                f"--cert-dir={pki}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                "--authorization-mode=Node,RBAC",
                f"--service-account-issuer={SA_ISSUER}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--disable-admission-plugins=ServiceAccount",
                # As OpenShift: setting blockOwnerDeletion needs update on the owner's finalizers.
                "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
                "--endpoint-reconciler-type=none",
                "--allow-privileged=true",
                f"--requestheader-client-ca-file={pki / 'front-proxy-ca.crt'}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
                f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
                "--profiling=false",
                "--v=1",
                *self._audit_args(),
            ],
            "kube-controller-manager": [
                f"--kubeconfig={cfg / 'kube-controller-manager.kubeconfig'}",
                f"--authentication-kubeconfig={cfg / 'kube-controller-manager.kubeconfig'}",
                f"--authorization-kubeconfig={cfg / 'kube-controller-manager.kubeconfig'}",
                "--bind-address=127.0.0.1",
                f"--secure-port={kcm}",
                f"--cert-dir={pki / 'kcm-serving'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                "--use-service-account-credentials=true",
                f"--cluster-signing-cert-file={pki / 'ca.crt'}",
                f"--cluster-signing-key-file={pki / 'ca.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--leader-elect=false",
                "--kube-api-qps=100",
                "--kube-api-burst=200",
                "--profiling=false",
                "--v=1",
            ],
            "kube-scheduler": [
                f"--kubeconfig={cfg / 'kube-scheduler.kubeconfig'}",
                f"--authentication-kubeconfig={cfg / 'kube-scheduler.kubeconfig'}",
                f"--authorization-kubeconfig={cfg / 'kube-scheduler.kubeconfig'}",
                "--bind-address=127.0.0.1",
                f"--secure-port={sched}",
                f"--cert-dir={pki / 'scheduler-serving'}",
                "--leader-elect=false",
                "--profiling=false",
                "--v=1",
            ],
            "kwok": [
                f"--kubeconfig={cfg / 'kwok.kubeconfig'}",
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=" + "=".join(KWOK_NODE_ANNOTATION),
                "--node-lease-duration-seconds=40",
                f"--cidr={POD_CIDR}",
                *[f"--config={p}" for p in STAGE_FILES],
            ],
        }
        state["commands"] = cmds  # restart() starts a component again exactly as here
        self._spawn("etcd", bin_dir, cmds["etcd"], state)
        self._wait(lambda: port_in_use(etcd_client), deadline, "etcd to listen")
        self._spawn("kube-apiserver", bin_dir, cmds["kube-apiserver"], state)

        def readyz() -> bool:
            self._check_alive()
            try:
                return self.request("GET", "/readyz", timeout=3)[0] == 200
            except (OSError, ssl.SSLError):
                return False

        # The controller-manager and scheduler exit if their RBAC roles are not bootstrapped yet,
        # so they start once /readyz (which includes the RBAC bootstrap hook) passes.
        self._wait(readyz, deadline, "kube-apiserver /readyz")
        for name in COMPONENTS[2:]:
            self._spawn(name, bin_dir, cmds[name], state)
        self._create_nodes()
        self._wait(self._nodes_ready, deadline, "simulated nodes Ready")
        self._wait(
            lambda: (
                self._check_alive()
                or self.request("GET", "/api/v1/namespaces/default/serviceaccounts/default")[0] == 200
            ),
            deadline,
            "the default ServiceAccount (kube-controller-manager)",
        )
        self._wait(
            lambda: self._check_alive() or self._component_healthy(sched),
            deadline,
            "kube-scheduler /healthz",
        )
        state["ready_seconds"] = round(time.time() - state["started_at"], 2)
        self._write_state(state)

    def _spawn(self, name: str, bin_dir: Path, args: list[str], state: dict[str, Any]) -> None:
        env = dict(os.environ)
        env.pop("KUBECONFIG", None)
        if name == "kwok":
            env["HOME"] = str(self.dir / "kwok-home")  # ignore a user's ~/.kwok/kwok.yaml
        with open(self.dir / "logs" / f"{name}.log", "ab") as logf:  # the child keeps its own handle
            p = subprocess.Popen(
                [str(bin_dir / name), *args],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                env=env,
                start_new_session=True,  # own process group; survives the caller's Ctrl-C
            )
        self._procs[name] = p
        state["processes"][name] = {
            "pid": p.pid,
            "pgid": p.pid,
            "start_time": proc_start_time(p.pid),
            "log": str(self.dir / "logs" / f"{name}.log"),
        }
        (self.dir / "pids").mkdir(exist_ok=True)
        (self.dir / "pids" / f"{name}.pid").write_text(f"{p.pid}\n")
        self._write_state(state)

    def restart(self, name: str, timeout: float = 120) -> float:
        """kill -9 one component (as a crash or node loss would) and start it again with the same
        flags and data; returns the seconds until it serves again (fault tests)."""
        with self._lock():
            state = self._read_state()
            proc = state["processes"][name]
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc["pgid"], signal.SIGKILL)
            popen = self._procs.pop(name, None)
            if popen is not None:
                popen.wait(timeout=10)
            while proc_start_time(proc["pid"]) == proc["start_time"]:
                time.sleep(0.05)
            started = time.monotonic()
            self._spawn(name, Path(state["bin_dir"]), state["commands"][name], state)
            deadline = started + timeout
            if name == "etcd":
                self._wait(lambda: port_in_use(state["ports"]["etcd_client"]), deadline, "etcd to listen")

            def serving() -> bool:
                try:
                    return self.request("GET", "/readyz", timeout=3)[0] == 200
                except (OSError, ssl.SSLError):
                    return False

            self._wait(serving, deadline, "kube-apiserver /readyz")
            return time.monotonic() - started

    def _check_alive(self) -> bool:
        """Raise if a process we started has exited (with the tail of its log). Returns False."""
        for name, p in self._procs.items():
            if p.poll() is not None:
                tail = (self.dir / "logs" / f"{name}.log").read_text(errors="replace")[-3000:]
                raise ClusterError(f"{name} exited with code {p.returncode}; log tail:\n{tail}")
        return False

    @staticmethod
    def _wait(pred, deadline: float, what: str) -> None:
        while True:
            if pred():
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out waiting for {what}")
            time.sleep(0.1)

    def _component_healthy(self, port: int) -> bool:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # self-signed serving cert of the component
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", context=ctx, timeout=2) as r:
                return r.status == 200
        except (OSError, ssl.SSLError):
            return False

    # -- PKI -------------------------------------------------------------------------------------
    def _make_pki(self) -> None:
        pki = self.pki
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        for ca, cn in (("ca", "qjob-localcluster-ca"), ("front-proxy-ca", "qjob-front-proxy-ca")):
            openssl("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.crt",
                    "-days", "3650", "-subj", f"/CN={cn}",
                    "-addext", "basicConstraints=critical,CA:TRUE",
                    "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
                    cwd=pki)  # fmt: skip
        certs = {
            # name: (subject, extensions[, signing CA])
            "apiserver": (
                "/CN=kube-apiserver",
                "extendedKeyUsage=serverAuth\nsubjectAltName="
                f"IP:127.0.0.1,IP:{KUBERNETES_SERVICE_IP},DNS:localhost,DNS:kubernetes,"
                "DNS:kubernetes.default,DNS:kubernetes.default.svc,"
                "DNS:kubernetes.default.svc.cluster.local",
            ),
            "admin": ("/O=system:masters/CN=qjob-localcluster-admin", "extendedKeyUsage=clientAuth"),
            "kube-controller-manager": (
                "/CN=system:kube-controller-manager",
                "extendedKeyUsage=clientAuth",
            ),
            "kube-scheduler": ("/CN=system:kube-scheduler", "extendedKeyUsage=clientAuth"),
            # kwok patches node and pod status, leases, deletes pods: give it cluster-admin rights
            "kwok": ("/O=system:masters/CN=kwok-controller", "extendedKeyUsage=clientAuth"),
            # aggregation layer / request-header authentication (as kubeadm sets it up)
            "front-proxy-client": (
                "/CN=front-proxy-client",
                "extendedKeyUsage=clientAuth",
                "front-proxy-ca",
            ),
        }
        for name, (subj, ext, *signer) in certs.items():
            ca = signer[0] if signer else "ca"
            (pki / f"{name}.ext").write_text(
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n" + ext + "\n"
            )
            openssl("req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                    "-subj", subj, cwd=pki)  # fmt: skip
            openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
                    "-CAcreateserial", "-days", "3650", "-out", f"{name}.crt",
                    "-extfile", f"{name}.ext", cwd=pki)  # fmt: skip
        # service-account token signing key pair
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                "-out", "sa.key", cwd=pki)  # fmt: skip
        openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)
        for p in pki.glob("*.key"):
            p.chmod(0o600)

    def _write_kubeconfig(self, path: Path, server: str, user: str) -> None:
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "qjob-local",
                    "cluster": {
                        "server": server,
                        "certificate-authority-data": b64file(self.pki / "ca.crt"),
                    },
                }
            ],
            "users": [
                {
                    "name": user,
                    "user": {
                        "client-certificate-data": b64file(self.pki / f"{user}.crt"),
                        "client-key-data": b64file(self.pki / f"{user}.key"),
                    },
                }
            ],
            "contexts": [{"name": "qjob-local", "context": {"cluster": "qjob-local", "user": user}}],
            "current-context": "qjob-local",
            "preferences": {},
        }
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        path.chmod(0o600)

    # -- nodes -----------------------------------------------------------------------------------
    def node_manifests(self) -> list[dict[str, Any]]:
        return topology_nodes(yaml.safe_load(self.topology.read_text()))

    def _create_nodes(self) -> None:
        for node in self.node_manifests():
            code, body = self.request("POST", "/api/v1/nodes", node)
            if code == 409:
                continue
            if code != 201:
                raise ClusterError(f"creating node {node['metadata']['name']}: {code} {body}")
            if not body.get("status", {}).get("capacity"):
                patch = {"status": node["status"]}
                code, body = self.request(
                    "PATCH",
                    f"/api/v1/nodes/{node['metadata']['name']}/status",
                    patch,
                    content_type="application/merge-patch+json",
                )
                if code != 200:
                    raise ClusterError(f"patching node status: {code} {body}")

    def _nodes_ready(self) -> bool:
        self._check_alive()
        want = {n["metadata"]["name"] for n in self.node_manifests()}
        code, body = self.request("GET", "/api/v1/nodes")
        if code != 200:
            return False
        ready = set()
        for n in body.get("items", []):
            for c in n.get("status", {}).get("conditions", []) or []:
                if c["type"] == "Ready" and c["status"] == "True":
                    ready.add(n["metadata"]["name"])
        return want <= ready

    # -- down ------------------------------------------------------------------------------------
    def down(self, keep_logs: bool = False) -> None:
        with self._lock():
            self._down_locked(keep_logs)
        with contextlib.suppress(OSError):
            (self.dir / ".lock").unlink()
            self.dir.rmdir()  # only if nothing else is left (logs kept / foreign files)

    def _down_locked(self, keep_logs: bool = False) -> None:
        self._stop_processes()
        for name in ("pki", "etcd", "config", "kwok-home", "pids", "kubeconfig", "state.json"):
            p = self.dir / name
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        if not keep_logs:
            shutil.rmtree(self.dir / "logs", ignore_errors=True)

    def _stop_processes(self) -> None:
        st = self._read_state() or {"processes": {}, "ports": {}}
        procs = st["processes"]
        # Clients first (all at once), then the apiserver, then etcd: an apiserver whose etcd is
        # already gone takes much longer to shut down. SIGTERM goes to the whole process group;
        # SIGKILL after 15 s.
        for group in (["kwok", "kube-scheduler", "kube-controller-manager"], ["kube-apiserver"], ["etcd"]):
            live = {
                n: procs[n] for n in group if n in procs and proc_start_time(procs[n]["pid"]) == procs[n]["start_time"]
            }  # (a pid whose start time differs was reused by something else: leave it alone)
            for p in live.values():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p["pgid"], signal.SIGTERM)
            deadline = time.monotonic() + 15
            for name, p in live.items():
                popen = self._procs.get(name)
                while proc_start_time(p["pid"]) == p["start_time"]:
                    if popen is not None:
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            popen.wait(timeout=0.05)
                    else:
                        time.sleep(0.05)
                    if time.monotonic() > deadline:
                        log(f"{name} (pid {p['pid']}) ignored SIGTERM for 15 s; killing it")
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(p["pgid"], signal.SIGKILL)
                        deadline = time.monotonic() + 5
                if popen is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        popen.wait(timeout=1)  # reap
        self._procs.clear()
        ports = list(st.get("ports", {}).values())
        t = time.monotonic()
        while any(port_in_use(p) for p in ports) and time.monotonic() - t < 10:
            time.sleep(0.1)
        busy = [p for p in ports if port_in_use(p)]
        if busy:
            log(f"warning: ports still in use after down: {busy}")

    # -- status ----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        st = self._read_state()
        if not st:
            return {"dir": str(self.dir), "running": False}
        out: dict[str, Any] = {
            "dir": str(self.dir),
            "kubeconfig": str(self.kubeconfig),
            "server": self.server,
            "bin_dir": st["bin_dir"],
            "ports": st["ports"],
            "processes": {},
        }
        total = 0
        for name in COMPONENTS:
            p = st["processes"].get(name)
            alive = bool(p) and proc_start_time(p["pid"]) == p["start_time"]
            rss = proc_rss_kib(p["pid"]) if alive else 0
            total += rss
            out["processes"][name] = {
                "pid": p["pid"] if p else None,
                "alive": alive,
                "rss_mib": round(rss / 1024, 1),
            }
        out["rss_total_mib"] = round(total / 1024, 1)
        out["healthy"] = self._healthy()
        if out["healthy"]:
            _, ver = self.request("GET", "/version")
            out["version"] = ver.get("gitVersion") if isinstance(ver, dict) else ver
            _, nodes = self.request("GET", "/api/v1/nodes")
            out["nodes"] = {
                n["metadata"]["name"]: next(
                    (c["status"] for c in n["status"].get("conditions", []) if c["type"] == "Ready"),
                    "Unknown",
                )
                for n in nodes.get("items", [])
            }
        out["running"] = out["healthy"]
        return out


# ---------------------------------------------------------------------------------------------


def topology_nodes(topo: dict[str, Any]) -> list[dict[str, Any]]:
    """Node manifests for a topology document (see topology.yaml)."""
    nodes = []
    for pool in topo["pools"]:
        for i in range(int(pool.get("count", 1))):
            name = f"{pool['name']}-{i}"
            labels = {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": pool.get("arch", "amd64"),
                "beta.kubernetes.io/os": "linux",
                "beta.kubernetes.io/arch": pool.get("arch", "amd64"),
                "node.kubernetes.io/instance-type": pool.get("instanceType", pool["name"]),
                "type": "kwok",
                "localcluster.qjob.dev/pool": pool["name"],
            }
            capacity = {
                "cpu": str(pool.get("cpu", "32")),
                "memory": str(pool.get("memory", "256Gi")),
                "pods": str(pool.get("pods", 110)),
                "ephemeral-storage": str(pool.get("ephemeralStorage", "2Ti")),
            }
            gpu = pool.get("gpu")
            if gpu:
                labels.update(
                    {
                        "nvidia.com/gpu.present": "true",
                        "nvidia.com/gpu.family": str(gpu["family"]),
                        "nvidia.com/gpu.product": str(gpu["product"]),
                        "nvidia.com/gpu.compute.major": str(gpu["computeMajor"]),
                        "nvidia.com/gpu.compute.minor": str(gpu["computeMinor"]),
                        "nvidia.com/gpu.memory": str(gpu["memoryMiB"]),
                        "nvidia.com/gpu.count": str(gpu["count"]),
                    }
                )
                capacity["nvidia.com/gpu"] = str(gpu["count"])
            labels.update({k: str(v) for k, v in (pool.get("labels") or {}).items()})
            nodes.append(
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": name,
                        "labels": labels,
                        "annotations": {
                            KWOK_NODE_ANNOTATION[0]: KWOK_NODE_ANNOTATION[1],
                            "node.alpha.kubernetes.io/ttl": "0",
                        },
                    },
                    "spec": {"taints": pool.get("taints") or []},
                    "status": {
                        "capacity": capacity,
                        "allocatable": dict(capacity),
                        "nodeInfo": {
                            "architecture": pool.get("arch", "amd64"),
                            "operatingSystem": "linux",
                            "kubeletVersion": "fake",
                            "kubeProxyVersion": "fake",
                            "containerRuntimeVersion": "kwok",
                            "kernelVersion": "kwok",
                            "osImage": "kwok",
                            "bootID": "",
                            "machineID": "",
                            "systemUUID": "",
                        },
                    },
                }
            )
    return nodes


def token_kubeconfig(admin_kubeconfig: Path | str, token: str, path: Path | str, namespace: str | None = None) -> Path:
    """A kubeconfig for the same cluster as ``admin_kubeconfig`` that authenticates with a bearer
    token (e.g. a ServiceAccount token from the TokenRequest API), so RBAC applies to it."""
    admin = yaml.safe_load(Path(admin_kubeconfig).read_text())
    context = next(c for c in admin["contexts"] if c["name"] == admin["current-context"])["context"]
    cluster = next(c for c in admin["clusters"] if c["name"] == context["cluster"])
    user_context = {"cluster": cluster["name"], "user": "token", **({"namespace": namespace} if namespace else {})}
    path = Path(path)
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "token",
                "clusters": [cluster],
                "users": [{"name": "token", "user": {"token": token}}],
                "contexts": [{"name": "token", "context": user_context}],
            },
            sort_keys=False,
        )
    )
    path.chmod(0o600)
    return path


def pinned_k8s_version() -> str:
    """The Kubernetes version build.sh builds."""
    return re.search(r"^K8S_VERSION=(\S+)", (DATA / "build.sh").read_text(), re.M).group(1)


def locate_binaries() -> Path:
    """Run build.sh (builds into the cache once; honours QJOB_K8S_BIN_DIR) and return the dir."""
    r = subprocess.run(["bash", str(DATA / "build.sh")], stdout=subprocess.PIPE, stderr=None, text=True)
    if r.returncode != 0:
        raise ClusterError(f"hack/localcluster/build.sh failed with exit code {r.returncode}")
    lines = r.stdout.strip().splitlines()
    if not lines:
        raise ClusterError("hack/localcluster/build.sh printed no binary directory")
    return Path(lines[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["up", "down", "status", "binaries"])
    ap.add_argument("--dir", default=str(DEFAULT_DIR), help="cluster state dir (default .cluster)")
    ap.add_argument("--topology", default=str(DEFAULT_TOPOLOGY))
    ap.add_argument("--timeout", type=float, default=120, help="seconds to wait for readiness")
    ap.add_argument("--keep-logs", action="store_true", help="down: keep <dir>/logs")
    a = ap.parse_args(argv)
    c = LocalCluster(a.dir, a.topology)
    try:
        if a.command == "binaries":
            print(locate_binaries())
        elif a.command == "up":
            c.up(timeout=a.timeout)
            print(c.kubeconfig)
        elif a.command == "down":
            c.down(keep_logs=a.keep_logs)
            log(f"cluster in {c.dir} stopped")
        else:
            st = c.status()
            print(json.dumps(st, indent=2))
            return 0 if st.get("running") else 1
    except ClusterError as e:
        log(f"error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
