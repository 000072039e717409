"""Prometheus metrics: prefixed names, base units, and no per-object labels (labels are bounded
sets: phase, format, architecture, stage kind, reason)."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from qjob_api.v1alpha1 import PHASES, TERMINAL_PHASES, Phase

from .fetch import FETCH_STAGE
from .plan import QUANTIZE_STAGE
from .status import parse_time

# `*_created` series (one per counter and histogram child) only double what scrapers store.
disable_created_metrics()

_DURATION_BUCKETS = (30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400)
_PENDING_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600)


class _PhaseCollector(Collector):
    """``qjob_jobs{phase}`` computed at scrape time from the operator's in-memory view, so it is
    right after a restart without replaying history."""

    def __init__(self, phases: Callable[[], Iterable[str]]):
        self._phases = phases

    def collect(self):
        family = GaugeMetricFamily("qjob_jobs", "QuantizationJobs by phase.", labels=["phase"])
        tally = Tally(self._phases())
        for phase in PHASES:
            family.add_metric([phase], tally.get(phase, 0))
        yield family


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # The standard process_*, python_info and python_gc_* series (memory, CPU, open fds), which
        # the default registry would have carried.
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            r.register(collector)
        self.job_duration = Histogram(
            "qjob_job_duration_seconds",
            "Time from creation to Succeeded or Failed.",
            ["format", "outcome"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.stage_duration = Histogram(
            "qjob_stage_duration_seconds",
            "Wall time of a finished stage, from its first pod start.",
            ["stage", "format", "architecture", "outcome"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.pending = Histogram(
            "qjob_stage_pending_seconds",
            "Time a stage's Job waited for its first pod to start.",
            ["stage", "architecture"],
            buckets=_PENDING_BUCKETS,
            registry=r,
        )
        self.failures = Counter("qjob_failures_total", "Failed QuantizationJobs by reason.", ["reason"], registry=r)
        self.gpu_seconds = Counter(
            "qjob_gpu_seconds_total",
            "GPU time used by finished stages (GPUs x wall time).",
            ["architecture"],
            registry=r,
        )
        self.reconcile_errors = Counter(
            "qjob_reconcile_errors_total", "Reconciles that raised an error (retried).", registry=r
        )
        self.reconcile_duration = Histogram(
            "qjob_reconcile_duration_seconds",
            "Time spent in one reconcile (it never waits for a status write's turn: the job is queued).",
            buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 5),
            registry=r,
        )
        self.status_write_wait = Histogram(
            "qjob_status_write_wait_seconds",
            "Time a status write waited for its turn (Job creates first, statusWritesPerSecond).",
            buckets=(0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.api_requests = Counter(
            "qjob_api_requests_total", "Kubernetes API requests the operator made, by verb.", ["verb"], registry=r
        )
        self.reports = Counter(
            "qjob_runner_reports_total",
            "Runner progress reports at the report endpoint, by outcome (accepted, unauthenticated, "
            "forbidden, invalid, standby).",
            ["outcome"],
            registry=r,
        )

    def watch_phases(self, phases: Callable[[], Iterable[str]]) -> None:
        self.registry.register(_PhaseCollector(phases))

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)

    def observe_transition(
        self,
        *,
        fmt: str,
        created: datetime | None,
        old: dict[str, Any],
        new: dict[str, Any],
        gpus: int,
        job_created: dict[str, datetime | None],
        node_architecture: Callable[[str | None], str],
    ) -> None:
        """Record what finished (or started) between two statuses, once, on the reconcile that saw it."""
        before = {s["name"]: s for s in old.get("stages") or []}
        for stage in new.get("stages") or []:
            prior = before.get(stage["name"], {})
            arch = stage.get("architecture") or node_architecture(stage.get("node"))
            kind = stage["name"] if stage["name"] in (QUANTIZE_STAGE, FETCH_STAGE) else "build"
            started = parse_time(stage.get("startTime"))
            if started and not prior.get("startTime") and job_created.get(stage["name"]):
                self.pending.labels(kind, arch).observe(
                    max(0.0, (started - job_created[stage["name"]]).total_seconds())
                )
            if stage.get("phase") in TERMINAL_PHASES and prior.get("phase") != stage["phase"]:
                end = parse_time(stage.get("completionTime"))
                if started and end:
                    seconds = max(0.0, (end - started).total_seconds())
                    self.stage_duration.labels(kind, fmt, arch, stage["phase"].lower()).observe(seconds)
                    if kind != FETCH_STAGE:  # the fetch pod holds no GPU
                        self.gpu_seconds.labels(arch).inc(seconds * gpus)
        if new.get("phase") in TERMINAL_PHASES and old.get("phase") != new["phase"]:
            if new["phase"] == Phase.FAILED:
                self.failures.labels(new.get("reason") or "Unknown").inc()
            done = parse_time(new.get("completionTime"))
            if created and done:
                self.job_duration.labels(fmt, new["phase"].lower()).observe(max(0.0, (done - created).total_seconds()))
