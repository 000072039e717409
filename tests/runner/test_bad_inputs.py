"""Bad inputs: each gets its documented exit code and a message naming the problem and the fix."""

from __future__ import annotations

import json
import shutil
from unittest import mock

import pytest
from qjob_api.runner import ExitCode, RunnerConfig
from qjob_runner import run

from .helpers import runner_config


def _run(tmp_path, model_path, calib, **over):
    out = tmp_path / "out"
    cfg = RunnerConfig.model_validate(
        runner_config(
            model={"path": str(model_path)}, calibration={"dataset": {"path": str(calib)}}, outputDir=str(out), **over
        )
    )
    result = run(cfg)
    assert result.outcome == "Failed"
    assert "Fix:" in (result.message or ""), result.message
    # nothing that looks finished
    assert not (out / "manifest.json").exists() and not (out / "hf").exists()
    assert not list(out.parent.glob(".out.staging-*"))
    assert json.loads((out / "result.json").read_text())["outcome"] == "Failed"
    return result


def test_missing_model_folder(tmp_path, calib_jsonl):
    r = _run(tmp_path, tmp_path / "nope", calib_jsonl)
    assert r.exit_code == ExitCode.INVALID_INPUT and r.failed_step == "resolve"
    assert "does not exist" in r.message and "spec.model.pvc" in r.message


def test_corrupt_safetensors(tmp_path, tiny_llama, calib_jsonl):
    bad = tmp_path / "model"
    shutil.copytree(tiny_llama, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated upload
    r = _run(tmp_path, bad, calib_jsonl)
    assert r.exit_code == ExitCode.INVALID_INPUT
    assert "corrupt" in r.message and "re-upload" in r.message


def test_garbage_safetensors(tmp_path, tiny_llama, calib_jsonl):
    bad = tmp_path / "model"
    shutil.copytree(tiny_llama, bad)
    (bad / "model.safetensors").write_bytes(b"this is not a safetensors file at all" * 10)
    r = _run(tmp_path, bad, calib_jsonl)
    assert r.exit_code == ExitCode.INVALID_INPUT and "safetensors" in r.message


def test_missing_tokenizer(tmp_path, tiny_llama, calib_jsonl):
    bad = tmp_path / "model"
    shutil.copytree(tiny_llama, bad)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bad / f).unlink(missing_ok=True)
    r = _run(tmp_path, bad, calib_jsonl)
    assert r.exit_code == ExitCode.INVALID_INPUT
    assert "no tokenizer" in r.message and "tokenizer.json" in r.message


def test_unsupported_format_for_target(tmp_path, tiny_llama, calib_jsonl):
    r = _run(tmp_path, tiny_llama, calib_jsonl, quantization={"format": "w4a8_awq"}, targetArchitectures=["blackwell"])
    assert r.exit_code == ExitCode.INVALID_CONFIG and r.reason == "InvalidConfig"
    assert "W4A8 AWQ needs Ada or Hopper" in r.message and "blackwell" in r.message and "spec.engines" in r.message


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_without_cuda(tmp_path, tiny_llama, calib_jsonl, fmt):
    with mock.patch("torch.cuda.is_available", return_value=False):
        r = _run(tmp_path, tiny_llama, calib_jsonl, quantization={"format": fmt}, targetArchitectures=["blackwell"])
    assert r.exit_code == ExitCode.INVALID_CONFIG
    assert "needs a CUDA GPU" in r.message and "GPU node" in r.message


def test_remote_code_refused(tmp_path, tiny_llama, calib_jsonl):
    bad = tmp_path / "model"
    shutil.copytree(tiny_llama, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (bad / "config.json").write_text(json.dumps(cfg))
    r = _run(tmp_path, bad, calib_jsonl)
    assert r.exit_code == ExitCode.INVALID_CONFIG and "trustRemoteCode" in r.message


def test_missing_calibration_file(tmp_path, tiny_llama):
    r = _run(tmp_path, tiny_llama, tmp_path / "missing.jsonl")
    assert r.exit_code == ExitCode.INVALID_INPUT and "calibration file" in r.message


def test_exclusions_that_exclude_everything(tmp_path, tiny_llama, calib_jsonl):
    r = _run(tmp_path, tiny_llama, calib_jsonl, quantization={"format": "fp8", "excludeModules": ["*"]})
    assert r.exit_code == ExitCode.INVALID_CONFIG and "excludeModules" in r.message


def test_hub_offline_not_cached(tmp_path, calib_jsonl, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    out = tmp_path / "out"
    cfg = RunnerConfig.model_validate(
        runner_config(
            model={"hfRepo": "qjob-test/does-not-exist"},
            calibration={"dataset": {"path": str(calib_jsonl)}},
            outputDir=str(out),
        )
    )
    r = run(cfg)
    assert r.exit_code == ExitCode.INVALID_INPUT
    assert "HF_HUB_OFFLINE" in r.message and "spec.model.pvc" in r.message


def test_cuda_oom_is_retryable(tmp_path, tiny_llama, calib_jsonl):
    import torch

    def boom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with mock.patch("modelopt.torch.quantization.quantize", side_effect=boom):
        r = _run(tmp_path, tiny_llama, calib_jsonl)
    assert r.exit_code == ExitCode.OUT_OF_MEMORY and r.reason == "OOMKilled" and "batchSize" in r.message
