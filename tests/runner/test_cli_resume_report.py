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
from qjob_api.runner import Reporting, RunnerConfig, RunnerResult
from qjob_api.v1alpha1 import RunnerReport
from qjob_runner import run
from qjob_runner.reporting import OperatorSink, Reporter, make_reporter

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
    assert not (out / "manifest.json").exists() and list((out / ".qjob-work").glob("calibrated-*.safetensors"))
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
    """The operator's report endpoint as the runner sees it: HTTPS, POST, bearer token."""

    calls: list = []
    standby_answers = 0  # answer this many requests with 503, as a standby replica does

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if type(self).standby_answers > 0:
            type(self).standby_answers -= 1
            self.send_response(503)
            self.end_headers()
            return
        type(self).calls.append(
            (self.path, self.headers["Content-Type"], self.headers.get("Authorization"), json.loads(body))
        )
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *a):
        pass


@pytest.fixture
def endpoint(tmp_path):
    """A TLS server on loopback with a certificate from the operator's own CA maker."""
    from qjob_operator.certificates import generate

    _Recorder.calls, _Recorder.standby_answers = [], 0
    server = HTTPServer(("127.0.0.1", 0), _Recorder)
    certificate = generate("https://127.0.0.1")
    server.socket = certificate.server_context().wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    token = tmp_path / "token"
    token.write_text("token-1\n")
    url = f"https://127.0.0.1:{server.server_port}/v1/namespaces/team-a/quantizationjobs/llama-fp8/stages/quantize/progress"
    yield Reporting(kind="operator", url=url, ca_cert=certificate.ca_pem, token_path=str(token)), token
    server.shutdown()


def test_reporter_posts_to_the_operator_throttled(endpoint):
    reporting, token = endpoint
    rep = make_reporter(reporting, "quantize", min_interval=0.5)
    assert isinstance(rep.sinks[0], OperatorSink)
    for i in range(50):  # a burst of updates ...
        rep.update(step="calibrate", percent=i, message=f"batch {i}")
        time.sleep(0.01)
        if i == 25:
            token.write_text("token-2")  # the kubelet rotates the projected token
    rep.close()
    calls = _Recorder.calls
    assert 1 <= len(calls) <= 4, len(calls)  # ... throttled, plus the final one
    path, ctype, auth, body = calls[-1]
    assert path == "/v1/namespaces/team-a/quantizationjobs/llama-fp8/stages/quantize/progress"
    assert ctype == "application/json" and auth == "Bearer token-2"
    report = RunnerReport.model_validate(body)  # progress only: the model refuses anything else
    assert report.percent == 49 and report.message == "batch 49"


def test_reporter_retries_a_standby_replica(endpoint):
    reporting, _ = endpoint
    _Recorder.standby_answers = 2
    rep = make_reporter(reporting, "quantize", min_interval=0.1)
    rep.update(step="load", percent=5, message="x")
    rep.close(timeout=10)
    assert [RunnerReport.model_validate(c[3]).percent for c in _Recorder.calls] == [5]


def test_reporter_refuses_an_endpoint_it_cannot_verify(endpoint):
    from qjob_operator.certificates import generate

    reporting, _ = endpoint
    strange_ca = generate("https://127.0.0.1").ca_pem  # not the CA that signed the endpoint
    rep = make_reporter(reporting.model_copy(update={"ca_cert": strange_ca}), "quantize", min_interval=0.1)
    rep.update(step="load", percent=5, message="x")
    rep.close(timeout=5)  # logs a warning, does not raise
    assert _Recorder.calls == []


def test_reporter_never_raises_when_operator_unreachable(tmp_path):
    token = tmp_path / "token"
    token.write_text("t")
    url = "https://127.0.0.1:9/v1/namespaces/n/quantizationjobs/j/stages/quantize/progress"
    rep = make_reporter(Reporting(kind="operator", url=url, token_path=str(token)), "quantize", min_interval=0.1)
    rep.update(step="load", percent=5, message="x")
    rep.close(timeout=5)  # logs a warning, does not raise


def test_reporter_without_endpoint_is_log_only():
    rep = make_reporter(Reporting(kind="operator"), "quantize")
    assert isinstance(rep, Reporter) and rep.sinks == []
