"""Layer-wise calibration (the re-plan after an OOM may turn it on): per-layer checkpoints in
the work folder, which ModelOpt's detect_resume_point reads to resume at the last finished layer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from qjob_api.runner import RunnerConfig
from qjob_dev.tiny_models import make_tiny_llama
from qjob_runner.pipeline import run

from .helpers import as_bytes, checkpoint_tensors, runner_config

LAYERS = 8


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory) -> Path:
    """The tiny Llama with 8 decoder layers: room to stop a calibration half-way."""
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "deep-llama", layers=LAYERS)


def _layerwise_config(model: Path, calib_jsonl: Path, out: Path, **calibration) -> dict:
    return runner_config(
        model={"path": str(model)},
        calibration={"dataset": {"path": str(calib_jsonl)}, "layerwise": True, **calibration},
        evaluation={"enabled": False},
        outputDir=str(out),
        jobUid="uid-1",
    )


def _checkpoints(out: Path) -> Path:
    (folder,) = (out / ".qjob-work" / "layerwise").iterdir()  # one job uid + config
    return folder


def test_layerwise_calibration_checkpoints_every_layer(tiny_llama, calib_jsonl, tmp_path):
    from modelopt.torch.quantization.utils.layerwise_calib import detect_resume_point

    result = run(RunnerConfig.model_validate(_layerwise_config(tiny_llama, calib_jsonl, tmp_path / "out")))
    assert result.outcome == "Succeeded", result.message
    checkpoints = _checkpoints(tmp_path / "out")
    assert checkpoints.name.startswith("uid-1-")
    assert sorted(p.name for p in checkpoints.glob("layer_*")) == ["layer_0000", "layer_0001"]
    manifest = json.loads((checkpoints / "manifest.json").read_text())
    assert (manifest["last_completed_layer"], manifest["num_layers"]) == (1, 2)
    assert detect_resume_point(str(checkpoints)) is None  # complete: nothing to resume


def test_a_killed_layerwise_calibration_resumes_at_the_next_layer(deep_llama, calib_jsonl, tmp_path):
    """The process is killed (SIGKILL, as an eviction or the OOM killer would) after layer k's
    checkpoint; the retry calibrates layers k+1.. only, and exports what an uninterrupted run does."""
    cfg = _layerwise_config(deep_llama, calib_jsonl, tmp_path / "out", samples=128, sequenceLength=256)
    config = tmp_path / "runner.json"
    config.write_text(json.dumps(cfg))
    env = {**os.environ, "QJOB_TORCH_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "qjob_runner", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    manifest = tmp_path / "out" / ".qjob-work" / "layerwise"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and first.poll() is None:
        done = [json.loads(m.read_text()).get("last_completed_layer", -1) for m in manifest.glob("*/manifest.json")]
        if done and done[0] >= 2:
            first.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert first.wait(30) == -signal.SIGKILL, "the first attempt finished before it could be killed"
    checkpoints = _checkpoints(tmp_path / "out")
    stopped_after = json.loads((checkpoints / "manifest.json").read_text())["last_completed_layer"]
    assert 2 <= stopped_after < LAYERS - 1
    assert not (tmp_path / "out" / "manifest.json").exists()

    retry_started = time.time()
    retry = subprocess.run(
        [sys.executable, "-m", "qjob_runner", "--config", str(config)], env=env, capture_output=True, text=True
    )
    assert retry.returncode == 0, retry.stderr[-3000:]
    assert f"resuming layerwise calibration from layer {stopped_after + 1}/{LAYERS}" in retry.stdout + retry.stderr
    # Layers up to k kept the first attempt's checkpoint files; only the later ones were written again.
    written = {int(d.name[-4:]): max(f.stat().st_mtime for f in d.iterdir()) for d in checkpoints.glob("layer_*")}
    assert sorted(written) == list(range(LAYERS))
    assert all(written[i] < retry_started for i in range(stopped_after + 1))
    assert all(written[i] > retry_started for i in range(stopped_after + 1, LAYERS))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["metrics"]["layerwise"]["start_layer"] == stopped_after + 1
    assert any(f"resumed at layer {stopped_after + 1} of {LAYERS}" in n for n in manifest["notes"])

    # The resumed calibration is the uninterrupted one: same checkpoint, tensor for tensor.
    whole = run(RunnerConfig.model_validate({**cfg, "outputDir": str(tmp_path / "whole"), "jobUid": "uid-2"}))
    assert whole.outcome == "Succeeded", whole.message
    resumed, uninterrupted = checkpoint_tensors(tmp_path / "out" / "hf"), checkpoint_tensors(tmp_path / "whole" / "hf")
    assert sorted(resumed) == sorted(uninterrupted)
    assert all(as_bytes(resumed[k]).equal(as_bytes(uninterrupted[k])) for k in resumed)
