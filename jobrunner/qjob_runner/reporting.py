"""Progress reporting: log lines always; in a cluster also the operator's report endpoint.

``Reporter.update()`` is cheap and never raises. The operator sink runs in a background thread
that sends the *latest* report at most once every ``min_interval`` seconds (plus a final one on
``close()``), so a slow or unreachable operator never slows or fails the run. Reports carry
progress only: artifacts and quality reach the operator in the termination message.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from qjob_api.runner import Reporting
from qjob_api.v1alpha1 import Artifact, Quality, RunnerReport

log = logging.getLogger("qjob_runner.report")


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


# -------------------------------------------------------------------------------- operator sink


class OperatorSink(Sink):
    """POSTs each report to the operator's report endpoint (HTTPS, the CA from the RunnerConfig)
    with the pod's projected report token, read anew each time (the kubelet rotates it). The
    token is for the endpoint's audience only: the runner holds no Kubernetes API credential."""

    RETRIES = 3  # a standby replica answers 503; a new connection may reach the active one

    def __init__(self, url: str, ssl_context: ssl.SSLContext, token_path: Path, timeout: float = 10.0):
        self.url, self.ssl_context, self.token_path, self.timeout = url, ssl_context, token_path, timeout

    @classmethod
    def from_reporting(cls, reporting: Reporting) -> OperatorSink | None:
        if not reporting.url:
            log.warning("reporting kind operator needs a url; progress goes to the log only")
            return None
        ctx = ssl.create_default_context(cadata=reporting.ca_cert) if reporting.ca_cert else None
        return cls(reporting.url, ctx or ssl.create_default_context(), Path(reporting.token_path))

    def send(self, report: RunnerReport, final: bool) -> None:
        body = report.model_dump_json(by_alias=True, exclude_none=True).encode()
        for attempt in range(self.RETRIES):
            req = urllib.request.Request(self.url, data=body, method="POST")
            req.add_header("Content-Type", "application/json")
            req.add_header("Authorization", f"Bearer {self.token_path.read_text().strip()}")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout, context=self.ssl_context) as resp:
                    resp.read()
                return
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:300].decode(errors="replace")
                if exc.code != 503 or attempt == self.RETRIES - 1:
                    raise RuntimeError(f"POST {self.url}: HTTP {exc.code} {detail}") from None


def make_reporter(reporting: Reporting, stage: str, min_interval: float = 2.0) -> Reporter:
    sinks: list[Sink] = []
    if reporting.kind == "operator" and (sink := OperatorSink.from_reporting(reporting)):
        sinks.append(sink)
    return Reporter(stage, sinks, min_interval=min_interval)
