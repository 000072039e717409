"""Progress reporting: log lines always; in a cluster also the QuantizationJob's status.

``Reporter.update()`` is cheap and never raises. The Kubernetes sink runs in a background thread
that sends the *latest* report at most once every ``min_interval`` seconds (plus a final one on
``close()``), so a slow or unreachable API server never slows or fails the run.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import ssl
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from qjob_api.runner import Reporting
from qjob_api.v1alpha1 import GROUP, PLURAL, VERSION, Artifact, Quality, RunnerReport

log = logging.getLogger("qjob_runner.report")

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
KUBECONFIG_ENV = "QJOB_KUBECONFIG"


@dataclass
class ProgressState:
    step: str | None = None
    percent: float = 0.0
    eta_seconds: float | None = None
    message: str | None = None
    artifacts: list[Artifact] = field(default_factory=list)
    quality: Quality | None = None
    step_seconds: dict[str, float] = field(default_factory=dict)

    def to_report(self) -> RunnerReport:
        return RunnerReport(
            step=self.step,
            percent=max(0, min(100, int(self.percent))),
            eta_seconds=None if self.eta_seconds is None else int(self.eta_seconds),
            message=self.message,
            artifacts=list(self.artifacts),
            quality=self.quality,
            step_seconds={k: round(v, 3) for k, v in self.step_seconds.items()},
            updated_at=datetime.now(UTC),
        )


class Sink:
    def send(self, report: RunnerReport, final: bool) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


class Reporter:
    """Collects progress of one runner stage and forwards it to the sinks."""

    def __init__(self, stage: str, sinks: list[Sink] | None = None, min_interval: float = 2.0):
        self.stage = stage
        self.state = ProgressState()
        self.sinks = sinks or []
        self._threads = [_ThrottledSender(s, min_interval) for s in self.sinks]
        self._last_logged = ""

    def update(
        self,
        step: str | None = None,
        percent: float | None = None,
        message: str | None = None,
        eta_seconds: float | None = None,
    ) -> None:
        try:
            if step is not None:
                self.state.step = step
            if percent is not None:
                self.state.percent = percent
            if message is not None:
                self.state.message = message
            self.state.eta_seconds = eta_seconds
            line = f"[{self.stage}] {self.state.step or '-'} {int(self.state.percent):3d}% {self.state.message or ''}"
            if line != self._last_logged:
                log.info(line)
                self._last_logged = line
            self._push(final=False)
        except Exception:  # noqa: BLE001 - reporting never fails the run
            log.exception("progress update failed")

    def step_done(self, step: str, seconds: float) -> None:
        self.state.step_seconds[step] = seconds
        self._push(final=False)

    def add_artifact(self, artifact: Artifact) -> None:
        self.state.artifacts.append(artifact)

    def set_quality(self, quality: Quality) -> None:
        self.state.quality = quality

    def _push(self, final: bool) -> None:
        if not self._threads:
            return
        report = self.state.to_report()
        for t in self._threads:
            t.offer(report, final)

    def close(self, timeout: float = 15.0) -> None:
        """Send the final report and stop the sender threads (waits at most ``timeout``)."""
        try:
            self._push(final=True)
            deadline = time.monotonic() + timeout
            for t in self._threads:
                t.stop(max(0.0, deadline - time.monotonic()))
        except Exception:  # noqa: BLE001
            log.exception("closing reporter failed")


class _ThrottledSender:
    """Background thread holding only the newest report; sends at most every ``interval`` s."""

    def __init__(self, sink: Sink, interval: float):
        self.sink = sink
        self.interval = interval
        self._pending: tuple[RunnerReport, bool] | None = None
        self._cond = threading.Condition()
        self._stopping = False
        self._last_sent = 0.0
        self._thread = threading.Thread(target=self._loop, name="qjob-reporter", daemon=True)
        self._thread.start()

    def offer(self, report: RunnerReport, final: bool) -> None:
        with self._cond:
            self._pending = (report, final)
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._stopping:
                    self._cond.wait()
                if self._pending is None and self._stopping:
                    return
                report, final = self._pending  # type: ignore[misc]
                wait = self._last_sent + self.interval - time.monotonic()
                if wait > 0 and not final and not self._stopping:
                    self._cond.wait(timeout=wait)  # newer reports may replace this one meanwhile
                    continue
                self._pending = None
            try:
                self.sink.send(report, final)
            except Exception as exc:  # noqa: BLE001 - log and continue
                log.warning("progress report not delivered: %s", exc)
            self._last_sent = time.monotonic()

    def stop(self, timeout: float) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)
        self.sink.close()


# ------------------------------------------------------------------------------ kubernetes sink


@dataclass
class ApiEndpoint:
    server: str
    ssl_context: ssl.SSLContext | None
    token: str | None = None


def _endpoint_from_service_account() -> ApiEndpoint | None:
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    token_file = SERVICE_ACCOUNT_DIR / "token"
    if not host or not token_file.exists():
        return None
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6
    ctx = ssl.create_default_context(cafile=str(SERVICE_ACCOUNT_DIR / "ca.crt"))
    return ApiEndpoint(f"https://{host}:{port}", ctx, token_file.read_text().strip())


def _endpoint_from_kubeconfig(path: str) -> ApiEndpoint:
    import yaml

    doc = yaml.safe_load(Path(path).read_text())
    base = Path(path).parent
    ctx_name = doc.get("current-context")
    contexts = {c["name"]: c["context"] for c in doc.get("contexts", [])}
    context = contexts.get(ctx_name) or next(iter(contexts.values()))
    cluster = {c["name"]: c["cluster"] for c in doc.get("clusters", [])}[context["cluster"]]
    user = {u["name"]: u.get("user") or {} for u in doc.get("users", [])}.get(context.get("user"), {})
    server = cluster["server"].rstrip("/")
    ssl_ctx = None
    if server.startswith("https"):
        ssl_ctx = ssl.create_default_context()
        if cluster.get("insecure-skip-tls-verify"):
            ssl_ctx.check_hostname = False
            ssl_ctx.verify_mode = ssl.CERT_NONE
        elif cluster.get("certificate-authority-data"):
            ssl_ctx.load_verify_locations(cadata=base64.b64decode(cluster["certificate-authority-data"]).decode())
        elif cluster.get("certificate-authority"):
            ssl_ctx.load_verify_locations(cafile=str(base / cluster["certificate-authority"]))

        def material(key: str) -> str | None:
            if user.get(f"{key}-data"):
                f = tempfile.NamedTemporaryFile("wb", delete=False, suffix=".pem")  # noqa: SIM115
                f.write(base64.b64decode(user[f"{key}-data"]))
                f.close()
                os.chmod(f.name, 0o600)
                return f.name
            return str(base / user[key]) if user.get(key) else None

        cert, key = material("client-certificate"), material("client-key")
        if cert:
            ssl_ctx.load_cert_chain(cert, key)
    token = user.get("token")
    if not token and user.get("tokenFile"):
        token = Path(user["tokenFile"]).read_text().strip()
    return ApiEndpoint(server, ssl_ctx, token)


class KubernetesSink(Sink):
    """JSON merge patch of ``status.runnerReports.<stage>`` on the job's status subresource."""

    def __init__(self, namespace: str, name: str, stage: str, endpoint: ApiEndpoint, timeout: float = 10.0):
        self.url = f"{endpoint.server}/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status"
        self.endpoint = endpoint
        self.stage = stage
        self.timeout = timeout

    @classmethod
    def from_environment(cls, reporting: Reporting, stage: str) -> KubernetesSink | None:
        namespace = reporting.namespace or _own_namespace()
        if not (namespace and reporting.name):
            log.warning("reporting kind kubernetes needs namespace and name; status will not be patched")
            return None
        try:
            if os.environ.get(KUBECONFIG_ENV):
                endpoint = _endpoint_from_kubeconfig(os.environ[KUBECONFIG_ENV])
            else:
                endpoint = _endpoint_from_service_account()
        except Exception as exc:  # noqa: BLE001
            log.warning("cannot read Kubernetes credentials (%s); status will not be patched", exc)
            return None
        if endpoint is None:
            log.warning("no in-cluster ServiceAccount and no %s; status will not be patched", KUBECONFIG_ENV)
            return None
        return cls(namespace, reporting.name, stage, endpoint)

    def body(self, report: RunnerReport) -> bytes:
        payload = {"status": {"runnerReports": {self.stage: report.to_api()}}}
        return json.dumps(payload).encode()

    def send(self, report: RunnerReport, final: bool) -> None:
        req = urllib.request.Request(self.url, data=self.body(report), method="PATCH")
        req.add_header("Content-Type", "application/merge-patch+json")
        req.add_header("Accept", "application/json")
        if self.endpoint.token:
            req.add_header("Authorization", f"Bearer {self.endpoint.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self.endpoint.ssl_context) as resp:
                resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode(errors="replace")
            raise RuntimeError(f"PATCH {self.url}: HTTP {exc.code} {detail}") from None


def _own_namespace() -> str | None:
    f = SERVICE_ACCOUNT_DIR / "namespace"
    return f.read_text().strip() if f.exists() else None


def make_reporter(reporting: Reporting, stage: str, min_interval: float = 2.0) -> Reporter:
    sinks: list[Sink] = []
    if reporting.kind == "kubernetes":
        sink = KubernetesSink.from_environment(reporting, stage)
        if sink:
            sinks.append(sink)
    return Reporter(stage, sinks, min_interval=min_interval)
