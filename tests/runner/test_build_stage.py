"""Build stages on a machine without TensorRT / TensorRT-LLM / GPU: clear, classified failures."""

from __future__ import annotations

import builtins
import json
from unittest import mock

from qjob_api.runner import ExitCode, RunnerConfig
from qjob_runner import run
from qjob_runner.steps.data import CPU_BATCH_SIZE

from .helpers import runner_config


def _finished_quantize_output(tmp_path, kind="onnx"):
    out = tmp_path / "out"
    if kind == "onnx":
        (out / "onnx").mkdir(parents=True)
        (out / "onnx" / "model.onnx").write_bytes(b"not really onnx")
    else:
        (out / "hf").mkdir(parents=True)
    (out / "manifest.json").write_text(json.dumps({"complete": True}))
    return out


def _build_cfg(out, arch="hopper", task="encoder"):
    return RunnerConfig.model_validate(
        runner_config(
            stage=f"build-{arch}",
            model={"path": "/unused", "task": task},
            quantization={"format": "fp8"},
            calibration={"dataset": {"path": "/unused"}},
            export={"formats": ["onnx"] if task == "encoder" else ["hf"]},
            engine={"architecture": arch},
            outputDir=str(out),
        )
    )


def test_build_without_gpu_is_retryable(tmp_path):
    out = _finished_quantize_output(tmp_path)
    with mock.patch("torch.cuda.is_available", return_value=False):
        r = run(_build_cfg(out))
    assert r.exit_code == ExitCode.TRANSIENT and "no CUDA GPU" in r.message
    assert (out / "result-build-hopper.json").exists() and not (out / "engines" / "hopper").exists()


def _fake_gpu(major, minor):
    return [
        mock.patch("torch.cuda.is_available", return_value=True),
        mock.patch("torch.cuda.get_device_capability", return_value=(major, minor)),
    ]


def test_build_on_wrong_architecture(tmp_path):
    out = _finished_quantize_output(tmp_path)
    p1, p2 = _fake_gpu(8, 9)
    with p1, p2:
        r = run(_build_cfg(out, "hopper"))
    assert r.exit_code == ExitCode.INVALID_CONFIG and "8.9 (ada)" in r.message and "node labels" in r.message


def test_build_without_tensorrt(tmp_path):
    out = _finished_quantize_output(tmp_path)
    real_import = builtins.__import__

    def no_tensorrt(name, *a, **k):
        if name == "tensorrt" or name.startswith("tensorrt."):
            raise ImportError("No module named 'tensorrt'")
        return real_import(name, *a, **k)

    p1, p2 = _fake_gpu(9, 0)
    with p1, p2, mock.patch("builtins.__import__", side_effect=no_tensorrt):
        r = run(_build_cfg(out, "hopper"))
    assert r.exit_code == ExitCode.INVALID_CONFIG and "TensorRT is not installed in this image" in r.message
    assert not list((out / "engines").glob("*")) or not (out / "engines" / "hopper").exists()


def test_llm_build_without_tensorrt_llm(tmp_path, monkeypatch):
    monkeypatch.delenv("QJOB_TRTLLM_PYTHON", raising=False)
    out = _finished_quantize_output(tmp_path, kind="hf")
    p1, p2 = _fake_gpu(9, 0)
    with p1, p2, mock.patch("qjob_runner.steps.build.trtllm_python", return_value=None):
        r = run(_build_cfg(out, "hopper", task="causal-lm"))
    assert r.exit_code == ExitCode.INVALID_CONFIG and "TensorRT-LLM is not installed" in r.message


def test_build_before_quantize_finished(tmp_path):
    out = tmp_path / "out"
    (out / "onnx").mkdir(parents=True)
    p1, p2 = _fake_gpu(9, 0)
    with p1, p2:
        r = run(_build_cfg(out, "hopper"))
    assert r.exit_code == ExitCode.INVALID_INPUT and "run the quantize stage first" in r.message


def test_batch_size_zero_on_cpu_uses_small_fixed_batch(tiny_llama, calib_jsonl, tmp_path):
    cfg = RunnerConfig.model_validate(
        runner_config(
            model={"path": str(tiny_llama)},
            quantization={"format": "int8"},
            calibration={"dataset": {"path": str(calib_jsonl)}, "batchSize": 0},
            evaluation={"enabled": False},
            outputDir=str(tmp_path / "out"),
        )
    )
    r = run(cfg)
    assert r.outcome == "Succeeded", r.message
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["metrics"]["calibration"]["batch_size"] == CPU_BATCH_SIZE and r.quality is None


def test_artifact_uris_use_output_uri(tiny_llama, calib_jsonl, tmp_path):
    cfg = RunnerConfig.model_validate(
        runner_config(
            model={"path": str(tiny_llama)},
            quantization={"format": "int8"},
            calibration={"dataset": {"path": str(calib_jsonl)}, "samples": 8},
            evaluation={"enabled": False},
            outputDir=str(tmp_path / "out"),
            outputUri="pvc://models/team-a/llama-int8",
        )
    )
    r = run(cfg)
    assert r.outcome == "Succeeded", r.message
    assert {a.uri for a in r.artifacts} == {
        "pvc://models/team-a/llama-int8/hf",
        "pvc://models/team-a/llama-int8/manifest.json",
    }
