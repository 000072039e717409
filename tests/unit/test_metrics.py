"""The operator's Prometheus exposition: process metrics present, no `_created` twins."""

from __future__ import annotations

from prometheus_client import generate_latest
from qjob_operator.metrics import Metrics


def test_exposition_has_process_metrics_and_no_created_series():
    metrics = Metrics()
    metrics.failures.labels("OOMKilled").inc()
    metrics.reconcile_duration.observe(0.2)
    text = generate_latest(metrics.registry).decode()
    assert "process_resident_memory_bytes" in text and "process_cpu_seconds_total" in text
    assert "python_info" in text
    assert 'qjob_failures_total{reason="OOMKilled"} 1.0' in text
    assert "_created" not in text
