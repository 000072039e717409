"""The CLI end to end, resume after calibration, the termination message, status reporting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from qjob_api.runner import RunnerConfig, RunnerResult
from qjob_api.v1alpha1 import RunnerReport
from qjob_runner import run
from qjob_runner.reporting import KubernetesSink, Reporter, make_reporter

from .helpers import runner_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_cli_end_to_end(tmp_path, tiny_llama, calib_jsonl):
    out = tmp_path / "out"
    config = tmp_path / "runner.json"
    config.write_text(
        json.dumps(
            runner_config(
                model={"path": str(tiny_llama)},
                quantization={"format": "int8_smoothquant"},
                calibration={"dataset": {"path": str(calib_jsonl)}},
                outputDir=str(out),
            )
        )
    )
    term = tmp_path / "termination-log"
    env = {**os.environ, "QJOB_TERMINATION_LOG": str(term), "QJOB_TORCH_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "qjob_runner", "--config", str(config), "--result", str(tmp_path / "r.json")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    result = RunnerResult.model_validate_json((tmp_path / "r.json").read_text())
    assert result.outcome == "Succeeded" and result.quality.metric == "perplexity"
    assert set(result.step_seconds) == {
        "resolve",
        "load",
        "data",
        "baseline",
        "quantize",
        "evaluate",
        "export",
        "serving",
        "report",
    }
    msg = json.loads(term.read_text())
    assert msg["outcome"] == "Succeeded" and len(term.read_bytes()) <= 4096
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["effectiveConfig"]["runner"]["quantization"]["format"] == "int8_smoothquant"
    assert manifest["effectiveConfig"]["modelopt"]["algorithm"]
    assert "gpus" in manifest and manifest["versions"]["torch"]
    assert not [p for p in out.parent.iterdir() if ".staging-" in p.name]


def test_cli_bad_config_exit_2(tmp_path):
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({"job": "x"}))
    term = tmp_path / "term"
    p = subprocess.run(
        [sys.executable, "-m", "qjob_runner", "--config", str(cfg)],
        capture_output=True,
        text=True,
        env={**os.environ, "QJOB_TERMINATION_LOG": str(term)},
        timeout=120,
    )
    assert p.returncode == 2
    assert json.loads(term.read_text())["reason"] == "InvalidConfig"


@pytest.mark.slow
def test_resume_skips_calibration(tmp_path, tiny_llama, calib_jsonl):
    from unittest import mock

    out = tmp_path / "out"
    cfg = RunnerConfig.model_validate(
        runner_config(
            model={"path": str(tiny_llama)},
            quantization={"format": "int4_awq"},
            calibration={"dataset": {"path": str(calib_jsonl)}},
            outputDir=str(out),
        )
    )
    # First attempt: calibrates, then the pod "dies" during export.
    with mock.patch("qjob_runner.steps.export.export_hf", side_effect=ConnectionResetError("node drained")):
        first = run(cfg)
    assert first.exit_code == 75 and first.failed_step == "export"
    assert not (out / "manifest.json").exists() and list((out / ".qjob-work").glob("calibrated-*.pt"))
    # Retry: restores the calibrated state; mtq.quantize must not run again.
    with mock.patch("modelopt.torch.quantization.quantize", side_effect=AssertionError("calibrated again")):
        second = run(cfg)
    assert second.outcome == "Succeeded", second.message
    assert "calibration skipped" in second.message
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resumedFromCalibrationState"] is True
    # the restored model is the calibrated one: same quality as a fresh calibration
    fresh = run(cfg.model_copy(update={"output_dir": str(tmp_path / "fresh")}))
    assert fresh.quality.quantized == pytest.approx(second.quality.quantized, rel=1e-4)


class _Recorder(BaseHTTPRequestHandler):
    calls: list = []

    def do_PATCH(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).calls.append(
            (
                self.path,
                self.headers["Content-Type"],
                self.headers.get("Authorization"),
                json.loads(body),
                time.monotonic(),
            )
        )
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *a):
        pass


def test_kubernetes_reporter_patches_status_throttled(tmp_path, monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "t",
                "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
                "users": [{"name": "u", "user": {"token": "secret-token"}}],
                "contexts": [{"name": "t", "context": {"cluster": "c", "user": "u", "namespace": "team-a"}}],
            }
        )
    )
    monkeypatch.setenv("QJOB_KUBECONFIG", str(kubeconfig))
    from qjob_api.runner import Reporting

    rep = make_reporter(
        Reporting(kind="kubernetes", namespace="team-a", name="llama-fp8"), "quantize", min_interval=0.5
    )
    assert isinstance(rep.sinks[0], KubernetesSink)
    for i in range(50):  # a burst of updates ...
        rep.update(step="calibrate", percent=i, message=f"batch {i}")
        time.sleep(0.01)
    rep.close()
    server.shutdown()
    calls = _Recorder.calls
    assert 1 <= len(calls) <= 4, len(calls)  # ... throttled, plus the final one
    path, ctype, auth, body, _ = calls[-1]
    assert path == "/apis/qjob.dev/v1alpha1/namespaces/team-a/quantizationjobs/llama-fp8/status"
    assert ctype == "application/merge-patch+json" and auth == "Bearer secret-token"
    report = RunnerReport.model_validate(body["status"]["runnerReports"]["quantize"])
    assert report.percent == 49 and report.message == "batch 49"


def test_reporter_never_raises_when_api_unreachable(monkeypatch, tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "current-context": "t",
                "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:9"}}],
                "users": [{"name": "u", "user": {}}],
                "contexts": [{"name": "t", "context": {"cluster": "c", "user": "u"}}],
            }
        )
    )
    monkeypatch.setenv("QJOB_KUBECONFIG", str(kubeconfig))
    from qjob_api.runner import Reporting

    rep = make_reporter(Reporting(kind="kubernetes", namespace="n", name="j"), "quantize", min_interval=0.1)
    rep.update(step="load", percent=5, message="x")
    rep.close(timeout=5)  # logs a warning, does not raise


def test_reporter_without_cluster_is_log_only():
    from qjob_api.runner import Reporting

    rep = make_reporter(Reporting(kind="kubernetes", namespace="n", name="j"), "quantize")
    assert isinstance(rep, Reporter) and rep.sinks == []
